"""Token log-probabilities for the API's ``logprobs``: computed by the engine only for the rows that ask for them.

The engine records, per token, its log-probability under the model's own distribution (the log-softmax of the
raw logits, before temperature or top-k/top-p filtering: what scoring and eval harnesses need) and the most
likely alternatives. The server turns them into OpenAI's two formats (``completion_logprobs`` and
``chat_logprobs``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class TokenLogprob(NamedTuple):
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the ``k`` most likely tokens and their log-probabilities, best first


def token_logprobs(logits: Tensor, tokens: Tensor | Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of ``tokens`` [N] under ``logits`` [N, vocab], and the ``top`` most likely tokens of each
    row: one log-softmax in float32 and one read-back."""
    if len(tokens) == 0:
        return []
    tokens = torch.as_tensor(tokens, device=logits.device)
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    ids = tokens.tolist()
    if top:
        values, index = lp.topk(min(top, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(index.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(ids)
    return [TokenLogprob(t, c, tp) for t, c, tp in zip(ids, chosen, tops, strict=True)]


def completion_logprobs(
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    strings: Callable[[Sequence[int]], list[str]],
    offsets: Sequence[int],
    k: int,
) -> dict:
    """OpenAI's completions format: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict of up to ``k``
    alternatives plus the token itself, as vLLM gives it) and ``text_offset``, for ``tokens``; an entry of None
    (the first prompt token: nothing before it predicts it) has a null log-probability. ``strings`` maps token
    ids to their text (one call for every id needed)."""
    ids = sorted({*tokens, *(i for e in entries if e is not None for i, _ in e.top[:k])})
    text = dict(zip(ids, strings(ids), strict=True))
    token_lps, tops = [], []
    for e in entries:
        if e is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_finite(e.logprob))
        alternatives = {text[i]: _finite(v) for i, v in e.top[:k]}
        alternatives.setdefault(text[e.token], _finite(e.logprob))
        tops.append(alternatives)
    return {
        "tokens": [text[t] for t in tokens],
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }


def chat_logprobs(entries: Sequence[TokenLogprob], strings: Callable[[Sequence[int]], list[str]], k: int) -> dict:
    """OpenAI's chat format: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    ids = sorted({t for e in entries for t in (e.token, *(i for i, _ in e.top[:k]))})
    text = dict(zip(ids, strings(ids), strict=True))

    def item(token: int, logprob: float) -> dict:
        s = text[token]
        return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode("utf-8", "replace"))}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top[:k]]} for e in entries]
    }


def _finite(x: float) -> float:
    """JSON has no -Infinity (nor NaN): a token the model gives no mass gets -9999, as vLLM reports it."""
    return x if x > -3.4e38 else -9999.0
