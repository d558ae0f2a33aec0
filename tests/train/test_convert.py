"""Teacher conversion: tiny random Llama and Qwen2 teachers built here; all-FA reproduces the teacher."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen2ForCausalLM

from gearshift.model import Supernet
from gearshift.train.convert import convert_teacher
from gearshift.train.teacher import TeacherError, load_teacher


def tiny(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=3,
        vocab_size=101,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **kw,
    )
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so copying mistakes show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize(
    "teacher",
    [
        lambda: tiny(LlamaForCausalLM, LlamaConfig, rope_theta=5e4, tie_word_embeddings=True),
        lambda: tiny(
            LlamaForCausalLM,
            LlamaConfig,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=5e5,
        ),
        lambda: tiny(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=False),
    ],
    ids=["llama-tied", "llama3-rope", "qwen2-biases"],
)
def test_all_attention_reproduces_teacher(teacher, tmp_path):
    teacher = teacher()
    model = convert_teacher(teacher, window=8)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = teacher(ids).logits
        got = model(ids, "all-attention")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # and after an Apriel2 round trip
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = Supernet.from_pretrained(tmp_path)(ids, "all-attention")
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-4)
    # SWA is the same attention below its window
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :8], "all-sliding_window"), ref[:, :8], atol=1e-4, rtol=1e-4)


def test_initialisations_follow_dil_and_kil():
    teacher = tiny(LlamaForCausalLM, LlamaConfig)
    model = convert_teacher(teacher)
    gdn = model.blocks[0].mixer.mixers["gdn"]
    attn = teacher.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    from gearshift.layers.base import StepContext

    idx = torch.arange(5)
    with torch.no_grad():
        assert gdn(x, StepContext(idx, idx[None])).abs().max() == 0  # z = 0 gates the output to exactly 0
        kd = 2 * 16
        assert torch.equal(gdn.in_proj_qkvz.weight[kd : 2 * kd], attn.k_proj.weight)
        assert torch.equal(gdn.in_proj_qkvz.weight[:16], attn.q_proj.weight[:16])  # group 0 <- q head 0
        assert torch.equal(gdn.in_proj_qkvz.weight[16:32], attn.q_proj.weight[32:48])  # group 1 <- q head 2
        v = gdn.in_proj_qkvz.weight[2 * kd : 2 * kd + 64]
        assert torch.equal(v[16:32], attn.v_proj.weight[:16]) and torch.equal(v[32:48], attn.v_proj.weight[16:])
        kda = model.blocks[0].mixer.mixers["kda"]
        assert torch.equal(kda.k_proj.weight[16:32], attn.k_proj.weight[:16])
        assert torch.allclose(kda.A_log.exp(), torch.tensor(0.1))
        assert kda.q_conv.weight[:, 0, -1].eq(0.5).all() and kda.q_conv.weight[:, 0, :-1].eq(0).all()


def test_unsupported_teachers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(TeacherError, match="gpt2"):
        convert_teacher(gpt2)
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(tmp_path / "empty")
    with pytest.raises(TeacherError, match="unknown mixers"):
        convert_teacher(tiny(LlamaForCausalLM, LlamaConfig), mixers=("attention", "mamba"))
    mistral = MistralConfig()
    assert mistral.model_type == "mistral"


def test_load_teacher_from_directory(tmp_path):
    teacher = tiny(LlamaForCausalLM, LlamaConfig)
    teacher.save_pretrained(tmp_path)
    loaded, tokenizer = load_teacher(tmp_path)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, teacher(ids).logits)
    assert tokenizer is None
