"""Sampling and the simple generation loop: prefill once, then one token per step through the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .placement import PlacementSpec

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


# Temperatures below this sample greedily: dividing logits by them overflows float32 (1e-40 makes every logit
# +-inf and the softmax NaN), and the distribution they stand for is the argmax anyway (vLLM draws the same line).
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf. The most likely
    token always stays, however small ``top_p`` (1e-50 rounds to 0 in float32)."""
    logits = logits.float() / max(temperature, GREEDY_BELOW)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


# top-p sampling draws from the highest logits only: a partial selection of this many candidates per row (sorting
# a whole vocabulary row is the slowest part of a large-batch decode step on a GPU: 3.3 ms for 512 x 49k on the
# H200); rows whose nucleus does not fit among them are redrawn from the full sort, so the result is exact
NUCLEUS_CANDIDATES = 1024


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B] from logits [B, vocab]; temperature 0 (below GREEDY_BELOW) means greedy.

    Samples from the distribution of ``filter_logits`` (temperature, then top-k, then top-p). A row whose
    distribution is not one (NaN or infinite logits) gets token -1 (see ``draw``)."""
    tokens, wide = sample_candidates(logits, temperature, top_k, top_p, generator)
    return tokens if wide is None else redraw_wide(tokens, wide, logits, temperature, top_p, generator)


def sample_candidates(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``sample_next`` without its host sync: (tokens [B], wide). ``wide`` [B] bool marks the rows whose top-p
    nucleus is wider than the NUCLEUS_CANDIDATES candidates (None when no row can be): their tokens are not yet
    drawn from the right distribution until ``redraw_wide`` replaces them. Everything stays on the device, so an
    engine can launch more work before it learns whether any row needs the redraw. Rows without a valid
    distribution get token -1 (see ``draw``)."""
    if not (temperature >= 0 and 0 < top_p <= 1 and top_k >= 0):  # also refuses NaN
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if is_greedy(temperature):
        return logits.argmax(-1), None
    vocab = logits.shape[-1]
    if (not top_k or top_k >= vocab) and top_p >= 1.0:
        probs = (logits.float() / temperature).softmax(-1)
        return draw(probs, generator), None
    scaled = logits.float() / temperature
    k = min(vocab, top_k or NUCLEUS_CANDIDATES)
    values, ids = torch.topk(scaled, k, dim=-1)  # descending
    # candidate probabilities under the distribution being filtered: top-k's own softmax, else the full one
    total = torch.logsumexp(values if top_k else scaled, dim=-1, keepdim=True)
    probs = (values - total).exp()
    wide = None
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs  # mass strictly before each candidate (the top one always stays)
        drop = before >= top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
        if not top_k and k < vocab:
            wide = before[:, -1] + probs[:, -1] < top_p
    picked = draw(probs, generator)
    return ids.gather(-1, picked.clamp(min=0)[:, None]).squeeze(-1).masked_fill(picked < 0, -1), wide


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``probs`` [B, N] (``torch.multinomial``), or -1 for a row that is not a distribution
    (NaN, infinite, or all zero: what NaN or infinite logits give). multinomial raises on such a row on the CPU
    and trips a device-side assert on CUDA, which ends the whole process's CUDA context: one bad row must fail
    its own request, not every request. One reduction over the rows finds them; no host sync."""
    total = probs.sum(-1)
    bad = ~((total > 0) & total.isfinite())
    safe = torch.where(bad[:, None], torch.ones_like(probs), probs)
    return torch.multinomial(safe, 1, generator=generator).squeeze(-1).masked_fill(bad, -1)


def redraw_wide(
    tokens: Tensor,
    wide: Tensor,
    logits: Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Complete ``sample_candidates``: redraw the ``wide`` rows from the fully sorted nucleus (one host sync, to
    learn whether there are any). Returns ``tokens`` itself when there are none, else a corrected copy."""
    if not bool(wide.any()):
        return tokens
    rows = wide.nonzero().squeeze(1)
    full = filter_logits(logits[rows], temperature, 0, top_p).softmax(-1)
    tokens = tokens.clone()
    tokens[rows] = draw(full, generator)
    return tokens


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
