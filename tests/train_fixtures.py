"""Shared builders for the training tests: a tiny Llama teacher, its word-level tokenizer, token shards."""

from pathlib import Path

import numpy as np

from gearshift.data.tokens import TokenShardWriter
from gearshift.demo import SPECIAL, tiny_teacher, tiny_tokenizer
from gearshift.train.convert import convert_teacher

VOCAB = 64


def tokenizer():
    return tiny_tokenizer(VOCAB)


def teacher(seed: int = 0):
    return tiny_teacher(VOCAB, hidden=32, layers=2, std=0.25, seed=seed)


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
