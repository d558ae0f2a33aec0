"""The simple generation loop: prefill once, then one token per step through the cache (sampling: ``sampling.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .placement import PlacementSpec
from .sampling import sample_next

if TYPE_CHECKING:
    from .model import Supernet


def pad_left(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (input_ids, attention_mask)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: Supernet,
    input_ids: Tensor | Sequence[Sequence[int]],
    placement: PlacementSpec = None,
    *,
    max_new_tokens: int = 32,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk: int | None = None,
    cuda_graph: bool | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Generate up to ``max_new_tokens`` per row; returns [B, prompt + generated] (prompt left-padded).

    Rows that reach an EOS token keep emitting ``pad_token_id`` until all rows are done. ``seed`` makes
    sampling reproducible. ``prefill_chunk`` bounds prefill memory by feeding the prompt in pieces.
    ``cuda_graph`` (default: on for CUDA) replays decode steps from a captured CUDA graph.
    ``on_token`` is called with each step's new tokens [B] as they are sampled (streaming output).
    """
    cfg = model.config
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    if not isinstance(input_ids, Tensor):
        input_ids, attention_mask = pad_left(input_ids, pad, model.device)
    input_ids = input_ids.to(model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)].unique().tolist()
        raise ValueError(f"token ids {bad[:5]} lie outside the model's vocabulary (0..{cfg.vocab_size - 1})")
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(model.device)
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
            f"({cfg.max_position_embeddings}); shorten the prompt or lower max_new_tokens"
        )
    eos = (
        cfg.eos_ids()
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    cache = model.new_cache(b, placement)
    cache.set_padding(mask)
    step = prefill_chunk or t
    for s in range(0, t, step):
        logits = model(input_ids[:, s : s + step], cache=cache, last_only=True)
    decode = lambda tok: model(tok[:, None], cache=cache)[:, -1]  # noqa: E731 - same shape as the graph's
    if (model.device.type == "cuda" if cuda_graph is None else cuda_graph) and max_new_tokens > 1:
        from .cuda_graphs import GraphDecoder

        decode = GraphDecoder(model, cache, capacity=cache.length + max_new_tokens).step
    out = [input_ids]
    logits = logits[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=model.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=model.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if len(eos):
            done |= torch.isin(token, eos_t)
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = decode(token.clamp(min=0))  # -1: no valid distribution (checked once, below)
    out = torch.cat(out, dim=1)
    if bool((out < 0).any()):
        raise ValueError("sampling met logits that are NaN or infinite: the model's output is not a distribution")
    return out
