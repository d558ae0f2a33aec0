"""Shared builders for the training tests: a tiny Llama teacher, its word-level tokenizer, token shards."""

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gearshift.data.tokens import TokenShardWriter
from gearshift.train.convert import convert_teacher

SPECIAL = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>", "<system>", "<end>"]
VOCAB = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIAL + [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def teacher(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a sharper teacher than the default init, so KL gaps are clearly measurable
        for name, p in model.named_parameters():
            if "proj" in name or "embed" in name:
                p.normal_(0, 0.25)
    return model


def supernet_dir(path: Path, window: int = 8) -> Path:
    model = convert_teacher(teacher(), window=window)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def shards(path: Path, n: int = 64, length: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with TokenShardWriter(path, vocab_size=VOCAB, shard_tokens=500) as w:
        for _ in range(n):
            w.add(rng.integers(len(SPECIAL), VOCAB, size=length), prompt_len=4)
    return path


def trace_shards(path: Path, supernet: Path, n: int = 48, new_tokens: int = 32, seed: int = 0) -> Path:
    """Teacher traces (the realistic distillation data): the teacher's own samples from short random prompts."""
    from gearshift.model import Supernet

    model = Supernet.from_pretrained(supernet)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(len(SPECIAL), VOCAB, size=4).tolist() for _ in range(n)]
    out = model.generate(
        prompts, "all-attention", max_new_tokens=new_tokens, temperature=1.0, seed=seed, eos_token_id=[]
    )
    with TokenShardWriter(path, vocab_size=VOCAB, shard_tokens=500) as w:
        for row in out.tolist():
            w.add(row, prompt_len=4)
    return path
