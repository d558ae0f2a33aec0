"""Teacher traces: sample the teacher on prompt files and store prompt + completion as token shards.

The teacher runs through gearshift's own decoding (its converted supernet's all-attention path, with CUDA
graphs on GPU). Prompts are deduplicated, sorted by length (less padding per batch), and each batch is written
as one shard together with the hashes of its prompts, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import token_ids
from ..data.tokens import TokenShardWriter


class PromptError(ValueError):
    """A prompt file that cannot be read or holds no prompts."""


@dataclass
class Prompt:
    text: str | None = None
    messages: list[dict] | None = None


def read_prompts(paths: Sequence[str | Path]) -> list[Prompt]:
    """Plain text (one prompt per line) or JSONL ({"prompt": ...} or {"messages": [...]}) files."""
    prompts: list[Prompt] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise PromptError(f"prompt file {path} not found")
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise PromptError(f"{path}: not a text file") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{path}:{n}: invalid JSON ({exc})") from None
                if "messages" in obj:
                    prompts.append(Prompt(messages=obj["messages"]))
                elif "prompt" in obj:
                    prompts.append(Prompt(text=str(obj["prompt"])))
                else:
                    raise PromptError(f"{path}:{n}: expected a 'prompt' or 'messages' field")
            else:
                prompts.append(Prompt(text=line.strip()))
    if not prompts:
        raise PromptError("no prompts in " + ", ".join(map(str, paths)))
    return prompts


def encode_prompt(prompt: Prompt, tokenizer, chat: bool) -> list[int]:
    if prompt.messages is not None or chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text}]
        return token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return list(tokenizer(prompt.text)["input_ids"])


def prompt_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]


def done_hashes(out: Path) -> set[str]:
    index = out / "index.json"
    if not index.exists():
        return set()
    return {h for shard in json.loads(index.read_text())["shards"] for h in shard.get("prompt_hashes", [])}


@torch.no_grad()
def generate_traces(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    out: str | Path,
    *,
    placement: str = "all-attention",
    max_new_tokens: int = 256,
    batch_size: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int = 0,
    chat: bool = False,
    max_prompt_tokens: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Sample completions for every (new, distinct) prompt; returns counts and tokens/s. ``show_progress``: a bar
    over the prompts on stderr (on a terminal; ``gearshift.clitools.progress``)."""
    from ..clitools import progress

    out = Path(out)
    limit = max_prompt_tokens or (model.config.max_position_embeddings - max_new_tokens)
    encoded = {}
    skipped_long = 0
    for p in prompts:
        ids = encode_prompt(p, tokenizer, chat)
        if len(ids) > limit:
            skipped_long += 1
            continue
        encoded.setdefault(prompt_hash(ids), ids)
    done = done_hashes(out)
    todo = sorted(((h, ids) for h, ids in encoded.items() if h not in done), key=lambda x: (len(x[1]), x[0]))
    eos = model.config.eos_ids()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    generated, start = 0, time.perf_counter()
    bar = progress(total=len(todo), desc="traces", unit="prompt", enabled=show_progress)
    with TokenShardWriter(out, vocab_size=model.config.vocab_size, shard_tokens=1 << 62) as writer, bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            seqs = model.generate(
                [ids for _, ids in batch],
                placement,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed + b,
                pad_token_id=pad,
            )
            width = max(len(ids) for _, ids in batch)
            for row, (_, ids) in zip(seqs.tolist(), batch, strict=True):
                completion = row[width:]
                for i, tok in enumerate(completion):  # cut after the first EOS (the rest is padding)
                    if tok in eos:
                        completion = completion[: i + 1]
                        break
                writer.add(ids + completion, prompt_len=len(ids))
                generated += len(completion)
            writer.flush(prompt_hashes=[h for h, _ in batch])
            bar.update(len(batch))
            bar.set_postfix(tokens=generated, refresh=False)
    elapsed = time.perf_counter() - start
    return {
        "prompts": len(prompts),
        "distinct": len(encoded),
        "already_done": len(encoded) - len(todo),
        "too_long": skipped_long,
        "new_sequences": len(todo),
        "generated_tokens": generated,
        "seconds": elapsed,
        "tokens_per_s": generated / max(elapsed, 1e-9),
    }
