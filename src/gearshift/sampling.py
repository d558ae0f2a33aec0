"""Next-token sampling from logits: temperature, top-k and top-p (nucleus), greedy below a threshold.

One set of functions for every caller: ``generation.generate`` draws with ``sample_next``; the serving engine
(``serve/sampler.py``) groups a batch's rows by their settings and draws each group with ``sample_candidates``
(no host sync) and ``redraw_wide``; speculative rounds filter with ``filter_logits`` and draw with ``draw``.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
