"""The CUDA training paths against the PyTorch reference (run on the GPU machine: ``pytest -m gpu``).

fla's varlen kernels (KDA; GDN natively or through KDA's kernel), flex attention over packed documents, compiled
blocks and the compiled fused loss: each must compute what the CPU path computes, forward and backward, within
bf16 noise. Shapes are SmolLM2's head shapes (head dim 64, 9 value / 3 key heads) so that the benchmark reuses
the kernels these tests compile.
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gearshift.ops import dispatch
from gearshift.ops.delta_rule import chunk_delta_rule
from gearshift.ops.documents import Documents

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA training paths (run on the GPU machine)"),
]


def documents(batch: int, length: int, seed: int = 0) -> Documents:
    """Rows of random documents (lengths 1 to ~length/2, the last cut by the row's end)."""
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(batch):
        cuts = np.cumsum(rng.integers(1, length // 2, size=length))
        labels.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return Documents.from_segments(torch.from_numpy(np.stack(labels)).cuda())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


HEADS = {"gdn": (3, 9, 64), "kda": (9, 9, 64), "gdn-via-kda": (3, 9, 64)}  # SmolLM2's GDN and KDA layers


@pytest.mark.parametrize("name", dispatch.KERNELS)
def test_fla_training_kernels_pass_their_gradient_check(name):
    """The check the dispatcher runs before a kernel trains (packed rows, bf16 against the fp32 reference)."""
    if name == "gdn" and dispatch._gdn_backward_broken_on(0):
        pytest.skip("fla refuses GDN's backward on this GPU and Triton (fla #640): GDN trains through KDA's kernel")
    agree, worst = dispatch._gradients_check(0, name, HEADS[name])
    print(f"{name}: lowest gradient cosine {worst:.5f}")
    assert agree and worst > 0.99


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_both_linear_mixers_train_on_a_kernel(per_channel):
    """The issue's requirement: GDN and KDA forward and backward through fla here, not the PyTorch path."""
    heads = HEADS["kda" if per_channel else "gdn"]
    kernel = dispatch.training_kernel(torch.device("cuda", 0), per_channel, heads)
    print(f"{'kda' if per_channel else 'gdn'} trains through fla's {kernel} kernel")
    assert kernel is not None


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_varlen_kernels_match_the_reference_at_layer_shapes(per_channel):
    """``delta_rule`` on packed bf16 rows (the training call) against the fp32 PyTorch chunk form: outputs and
    every input gradient."""
    b, t, d = 2, 1024, 64
    h, hv, _ = HEADS["kda" if per_channel else "gdn"]
    docs = documents(b, t)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(b, t, h, d, device="cuda", generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, t, h, d, device="cuda", generator=gen), dim=-1)
    v = torch.randn(b, t, hv, d, device="cuda", generator=gen)
    shape = (b, t, hv, d) if per_channel else (b, t, hv)
    g = F.logsigmoid(torch.randn(shape, device="cuda", generator=gen) + 3)
    beta = torch.rand(b, t, hv, device="cuda", generator=gen)
    w = torch.randn(b, t, hv, d, device="cuda", generator=gen)
    results = []
    for kind, fn in (
        (torch.float32, lambda *x: chunk_delta_rule(*x, d**-0.5, starts=docs.starts)[0]),
        (torch.bfloat16, lambda *x: dispatch.delta_rule(*x, d**-0.5, documents=docs)[0]),
    ):
        xs = [x.to(kind if i < 3 else torch.float32).clone().requires_grad_() for i, x in enumerate((q, k, v, g, beta))]
        o = fn(*xs)
        (o.float() * w).sum().backward()
        results.append([o.detach()] + [x.grad for x in xs])
    for label, want, got in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], *results, strict=True):
        print(f"{label}: relative max error {relative(got, want):.4f}, cosine {cosine(got, want):.5f}")
        assert cosine(got, want) > 0.995 and relative(got, want) < 0.05, label


@pytest.mark.parametrize("window", [None, 100, 5000])
def test_flex_attention_matches_the_dense_masked_path(window, monkeypatch):
    from gearshift.ops import attention

    b, t, h, hkv, d = 2, 1024, 9, 3, 64
    docs = documents(b, t, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, n, t, d, device="cuda", generator=gen, dtype=torch.bfloat16) for n in (h, hkv, hkv))
    outs = []
    for flex in (False, True):
        monkeypatch.setenv("GEARSHIFT_FLEX", "1" if flex else "0")
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = attention.document_attention(*xs, docs, window, d**-0.5)
        o.float().square().sum().backward()
        outs.append([o.detach()] + [x.grad for x in xs])
    for label, want, got in zip(["o", "dq", "dk", "dv"], *outs, strict=True):
        assert cosine(got, want) > 0.999 and relative(got, want) < 0.03, label


def small_supernet(seed: int = 0):
    from gearshift.config import SupernetConfig
    from gearshift.model import Supernet

    cfg = SupernetConfig.uniform(
        num_layers=4, hidden_size=576, vocab_size=2048, heads=9, kv_heads=3, head_dim=64, intermediate_size=1536,
        window=1024, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
    )  # fmt: skip
    return Supernet.random(cfg, seed=seed, device="cuda", dtype=torch.float32)


def test_the_fast_training_step_computes_the_pytorch_paths_losses_and_gradients(monkeypatch):
    """Compiled blocks, fla kernels, flex attention and the compiled fused loss against the eager PyTorch path
    (PyTorch delta rule, dense masks, materialised logits), one distillation pass on the same packed batch,
    bf16 autocast both: the losses within bf16 noise, the gradients pointing the same way."""
    from gearshift.train.losses import activation_terms, kl_terms, linear_losses

    student, teacher = small_supernet(), small_supernet()
    teacher.requires_grad_(False)
    docs = documents(16, 2048, seed=2)  # the benchmark's batch: its compiled graphs are reused there
    ids = torch.randint(0, 2048, (16, 2049), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    mask = torch.ones(16, 2048, dtype=torch.bool, device="cuda")
    placement = "FSGK"
    results = {}
    for fast in (False, True):
        student.zero_grad()
        student.compile_blocks = teacher.compile_blocks = fast
        backend = "auto" if fast else "torch"
        monkeypatch.setenv("GEARSHIFT_FLEX", "1" if fast else "0")
        with dispatch.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            t_acts, s_acts = [], []
            with torch.no_grad():
                t_hidden = teacher(
                    ids[:, :-1], "all-attention", mixer_outputs=t_acts, documents=docs, return_hidden=True
                )
            if fast:
                head = functools.partial(
                    linear_losses, teacher_hidden=t_hidden, teacher_weight=teacher.output_weight, targets=None,
                    mask=mask, forward_kl=0.5, reverse_kl=1.0, compile=True,
                )  # fmt: skip
                logit_loss, _ = student(ids[:, :-1], placement, mixer_outputs=s_acts, documents=docs, output_fn=head)
            else:
                logits = student(ids[:, :-1], placement, mixer_outputs=s_acts, documents=docs)
                fkl, rkl = kl_terms(logits, teacher.logits(t_hidden), mask)
                logit_loss = 0.5 * fkl + rkl
            loss = logit_loss + 0.5 * activation_terms(s_acts, t_acts, mask).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[fast] = (float(loss), grads)
    (ref_loss, ref_grad), (loss, grad) = results[False], results[True]
    print(f"loss: PyTorch path {ref_loss:.5f}, fast path {loss:.5f}; gradient cosine {cosine(grad, ref_grad):.5f}")
    assert abs(loss - ref_loss) <= 0.02 * abs(ref_loss)
    assert cosine(grad, ref_grad) > 0.99


@pytest.mark.parametrize("mode", ["distill", "align"])
def test_trainer_runs_compiled_on_cuda(mode, tmp_path):
    """Real training steps (in-memory model, packed rows of random documents, the benchmark's 16 x 2048 batch):
    compiled without falling back, finite losses, FLOPs counted, and no recompilation once every graph exists
    (each batch brings new documents, block masks and cu_seqlens)."""
    from torch._dynamo.utils import counters

    from gearshift.model import _compiled_block, _compiled_mixer
    from gearshift.train.config import config_from_dict
    from gearshift.train.rows import pack
    from gearshift.train.trainer import Trainer

    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 2048, n), np.ones(n, bool)) for n in rng.integers(50, 1500, 160)]
    rows = pack(docs, 2048)
    cfg = config_from_dict({
        "model": "<in memory>", "output": str(tmp_path), "mode": mode, "data": {"train": ["<in memory>"]},
        "optim": {"steps": 10, "batch_size": 16, "warmup_steps": 1},
        "sampler": {"kind": "predefined", "placements": {"FSGK": 1.0}},
        "loss": {"activation": 0.5, "reverse_kl": 1.0, "forward_kl": 0.5}, "eval": {"every": 0},
        "checkpoint": {"every": 0},
    })  # fmt: skip
    trainer = Trainer(cfg, device="cuda", model=small_supernet(), rows=rows, log=lambda *a: None)
    assert trainer.compile
    steps = [trainer.train_step() for _ in range(2)]
    graphs = counters["stats"]["unique_graphs"]
    steps += [trainer.train_step() for _ in range(2)]
    print(f"{mode}: losses {[round(r['loss'], 4) for r in steps]}, {graphs} graphs compiled")
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled for new batches
    assert trainer.compile and all(np.isfinite(r["loss"]) for r in steps)
    assert not _compiled_block.compile_failed() and not _compiled_mixer.compile_failed()
    assert trainer.step_flops.total > 0
