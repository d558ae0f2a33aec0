"""Held-out perplexity and teacher-trace log-likelihood from token shards (``gearshift.data.tokens``).

A shard sequence's first ``prompt_len`` tokens are context only: for teacher traces this scores the teacher's
completion given its prompt (the paper's placement-quality target is the mean log-likelihood of teacher traces);
for plain text (``prompt_len`` 0) every token but the first is scored. Sequences longer than the model's context
are scored in rolling windows (``scoring.rolling_spans``), every scored token exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..data.tokens import ShardError, TokenShards
from ..placement import PlacementSpec
from .errors import EvalError
from .results import ResultRow, letters
from .scoring import Scorer, Span, rolling_spans
from .tasks import sample_indices


def shard_spans(
    shards: TokenShards, max_length: int, *, limit: int | None = None, seed: int = 0, stride: int | None = None
) -> tuple[list[Span], list[int]]:
    """Spans to score for a (seeded sample of the) shard sequences, and the sequence each span belongs to."""
    spans: list[Span] = []
    owners: list[int] = []
    for i in sample_indices(len(shards), limit, seed):
        seq = shards[i]
        tokens = seq.tokens.astype("int64").tolist()
        start = max(seq.prompt_len, 1)
        for span in rolling_spans(tokens, start, max_length, stride):
            spans.append(span)
            owners.append(i)
    return spans, owners


def evaluate_shards(
    scorer: Scorer,
    shards: str | Path | TokenShards,
    placement: PlacementSpec = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    stride: int | None = None,
) -> dict[str, float]:
    """Mean log-likelihood per scored token (``ll_per_token``), its perplexity, and the mean per sequence."""
    try:
        data = shards if isinstance(shards, TokenShards) else TokenShards(shards)
    except ShardError as exc:
        raise EvalError(str(exc)) from None
    vocab = scorer.model.config.vocab_size
    if data.vocab_size > vocab:
        raise EvalError(f"{data.path}: shards use a vocabulary of {data.vocab_size}, the model has {vocab}")
    spans, owners = shard_spans(data, scorer.max_length, limit=limit, seed=seed, stride=stride)
    if not spans:
        raise EvalError(f"{data.path}: the sampled sequences have no tokens to score (all prompt)")
    scores = scorer.score_spans(spans, placement)
    total = sum(s.logprob for s in scores)
    tokens = sum(s.tokens for s in scores)
    sequences = len(set(owners))
    return {
        "ll_per_token": total / tokens,
        "ppl": math.exp(-total / tokens),
        "ll_per_sequence": total / sequences,
        "tokens": tokens,
        "sequences": sequences,
    }


def shard_rows(
    scorer: Scorer,
    shards: Mapping[str, str | Path],
    placements: Mapping[str, PlacementSpec],
    *,
    limit: int | None = None,
    seed: int = 0,
    stride: int | None = None,
    show_progress: bool = False,
) -> list[ResultRow]:
    """Result rows with ``ll:<name>`` and ``ppl:<name>`` for every shard directory and placement."""
    from ..clitools import progress

    loaded = {}
    for name, path in shards.items():
        try:
            loaded[name] = TokenShards(path)
        except ShardError as exc:
            raise EvalError(str(exc)) from None
    rows = []
    with progress(total=len(placements) * len(loaded), desc="perplexity", unit="set", enabled=show_progress) as bar:
        for preset, placement in placements.items():
            row = ResultRow(preset, letters(scorer.model, placement))
            for name, data in loaded.items():
                m = evaluate_shards(scorer, data, placement, limit=limit, seed=seed, stride=stride)
                bar.update(1)
                row.scores[f"ll:{name}"] = m["ll_per_token"]
                row.scores[f"ppl:{name}"] = m["ppl"]
                row.details[f"shards:{name}"] = m
            rows.append(row)
    return rows
