"""Measure placements of a supernet on held-out teacher traces: the quality numbers the surrogate is fitted to.

Per placement, over the non-prompt tokens of every sequence (a sequence's first token is never scored, nothing
predicts it):

- ``loglik``: mean log-likelihood per token of the traces (the paper's default search objective);
- ``kl``: mean KL(reference || placement) per token of the next-token distributions, the reference being the
  all-attention placement (or the one given); it isolates what the placement changed from what the teacher
  traces reward;
- ``agreement``: fraction of positions where the placement's most likely token is the reference's;
- any extra metric: a callable ``(model, placement) -> float`` (e.g. multiple-choice accuracy from
  ``gearshift.evals``), stored under its name.

Sequences are packed into right-padded batches (longest first, up to ``batch_tokens`` padded tokens), and logits
are computed only at scored positions (the [T, vocab] tensor of long prompts is never built). Every mixer is
causal and padding sits after every real token of its row, so the padded forward needs no attention mask: real
positions never see the padding (which keeps the fast unmasked attention path), and padded positions are never
scored. The reference's
log-probabilities are computed once and reused for every placement; with ``reference_topk`` only its top-k are
kept and KL is taken between the two distributions coarsened to those k tokens plus one "rest" bucket, which is
a lower bound of the exact KL (exact when k is the vocabulary) at a fraction of the memory.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..clitools import progress, progress_write
from ..data.tokens import TokenSequence, TokenShards
from ..placement import Placement, placement_letters
from .space import PlaceError, PlacementSpace
from .table import MeasurementTable

__all__ = [
    "PlacementMetric",
    "PlacementScorer",
    "load_sequences",
    "measure_placements",
]

# An extra quality number for one placement, e.g. multiple-choice accuracy; higher is better unless the user
# says otherwise when fitting. Called with the model and the resolved placement (a tuple of mixer names).
PlacementMetric = Callable[[Any, Placement], float]


def load_sequences(
    data: str | Path | TokenShards,
    *,
    limit: int | None = None,
    offset: int = 0,
    max_len: int | None = None,
) -> list[TokenSequence]:
    """Sequences ``offset .. offset + limit`` of a shard directory, truncated to ``max_len`` tokens.

    Sequences left with nothing to score (prompt only, or a single token) are dropped; raises ``PlaceError``
    when none is left, so an empty selection never reaches the model.
    """
    shards = data if isinstance(data, TokenShards) else TokenShards(data)
    if offset < 0 or (limit is not None and limit < 1):
        raise PlaceError(f"need offset >= 0 and limit >= 1, got offset={offset}, limit={limit}")
    stop = len(shards) if limit is None else min(len(shards), offset + limit)
    out = []
    for i in range(offset, stop):
        seq = shards[i]
        tokens = seq.tokens if max_len is None else seq.tokens[:max_len]
        if tokens.size - max(seq.prompt_len, 1) >= 1:
            out.append(TokenSequence(tokens, min(seq.prompt_len, tokens.size)))
    if not out:
        raise PlaceError(
            f"{shards.path}: no sequence in {offset}..{stop} has a token to score (after the prompt and within "
            f"max_len={max_len})"
        )
    return out


@dataclass
class _Batch:
    ids: Tensor  # [B, T] right-padded (with token 0)
    flat: Tensor  # [N] indices into B*T of the positions that predict a scored token
    targets: Tensor  # [N] the scored tokens


class PlacementScorer:
    """Scores placements of one model on fixed sequences (see the module docstring for the metrics)."""

    def __init__(
        self,
        model: Any,
        sequences: Sequence[TokenSequence],
        *,
        reference: str | Sequence[str] | None = None,
        kl: bool = True,
        agreement: bool = True,
        reference_topk: int | None = None,
        batch_tokens: int = 4096,
        max_batch: int = 64,
        extra_metrics: Mapping[str, PlacementMetric] | None = None,
        reference_memory_gb: float = 8.0,
        model_fingerprint: str | None = None,
    ) -> None:
        """``model_fingerprint`` (``gearshift.checkpoint.fingerprint`` of the checkpoint the model came from) goes
        into the table header, so that a table is never continued with another checkpoint's numbers."""
        if not sequences:
            raise PlaceError("no sequences to score placements on")
        if batch_tokens < 1 or max_batch < 1:
            raise PlaceError(f"batch_tokens and max_batch must be >= 1, got {batch_tokens}, {max_batch}")
        if reference_topk is not None and reference_topk < 1:
            raise PlaceError(f"reference_topk must be >= 1, got {reference_topk}")
        self.model = model
        self.model_fingerprint = model_fingerprint
        self.space = PlacementSpace.from_config(model.config)
        if reference is None:
            reference = self.space.reference_placement() or model.config.default_placement
        self.reference = model.resolve(reference)
        self.kl = kl
        self.agreement = agreement
        self.reference_topk = reference_topk
        self.extra_metrics = dict(extra_metrics or {})
        clash = {"loglik", "kl", "agreement", "tokens", "seconds", "placement"} & set(self.extra_metrics)
        if clash:
            raise PlaceError(f"extra metric names {sorted(clash)} clash with built-in record fields")
        vocab = model.config.vocab_size
        for i, s in enumerate(sequences):
            if s.tokens.size and int(s.tokens.max()) >= vocab:
                raise PlaceError(f"sequence {i} holds token id {int(s.tokens.max())} >= the model's vocab ({vocab})")
        self.max_len = max(int(s.tokens.size) for s in sequences)
        if self.max_len > model.config.max_position_embeddings:
            raise PlaceError(
                f"a sequence has {self.max_len} tokens, more than the model's context "
                f"({model.config.max_position_embeddings}); pass max_len"
            )
        self.n_sequences = len(sequences)
        self.fingerprint = _fingerprint(sequences)
        self._batches = self._pack(sequences, batch_tokens, max_batch)
        self.n_tokens = sum(int(b.targets.numel()) for b in self._batches)
        if self.n_tokens == 0:
            raise PlaceError("the sequences hold no token to score (prompts cover everything)")
        kept = vocab if reference_topk is None else min(reference_topk, vocab)
        need = self.n_tokens * kept * (4 if reference_topk is None else 12) / 1e9  # fp32 values (+ int64 indices)
        if (kl or agreement) and need > reference_memory_gb:
            raise PlaceError(
                f"the reference log-probs of {self.n_tokens} tokens x {kept} would take {need:.1f} GB on "
                f"{model.device} (limit {reference_memory_gb} GB): pass reference_topk (e.g. 256), score fewer "
                "sequences, or raise reference_memory_gb"
            )
        self._reference_cache: list[tuple[Tensor, Tensor | None]] | None = None

    def _pack(self, sequences: Sequence[TokenSequence], batch_tokens: int, max_batch: int) -> list[_Batch]:
        """Longest first, so each batch pads little; row order does not change any metric (token sums)."""
        order = sorted(range(len(sequences)), key=lambda i: -sequences[i].tokens.size)
        groups: list[list[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            if g and len(g) < max_batch and (len(g) + 1) * sequences[g[0]].tokens.size <= batch_tokens:
                g.append(i)  # the first row of a group is its longest: the padded width
            else:
                groups.append([i])
        device = self.model.device
        batches = []
        for g in groups:
            width = int(sequences[g[0]].tokens.size)
            ids = np.zeros((len(g), width), dtype=np.int64)
            flat, targets = [], []
            for row, i in enumerate(g):
                s = sequences[i]
                n = int(s.tokens.size)
                ids[row, :n] = s.tokens
                first = max(s.prompt_len, 1)
                pos = np.arange(first - 1, n - 1)
                flat.append(row * width + pos)
                targets.append(s.tokens[first:n].astype(np.int64))
            batches.append(
                _Batch(
                    ids=torch.from_numpy(ids).to(device),
                    flat=torch.from_numpy(np.concatenate(flat)).to(device),
                    targets=torch.from_numpy(np.concatenate(targets)).to(device),
                )
            )
        return batches

    # ------------------------------------------------------------------ scoring
    def header(self) -> dict[str, Any]:
        """What a measurement table records about this scorer (fields that must match to resume a table)."""
        return {
            "model": self.model_fingerprint,
            "space": self.space.to_json(),
            "data": {"fingerprint": self.fingerprint, "sequences": self.n_sequences, "tokens": self.n_tokens},
            "reference": placement_letters(self.reference, self.model.config),
            "reference_topk": self.reference_topk,
            "max_len": self.max_len,
            "dtype": str(self.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
            "metrics": self.metric_names(),
        }

    def metric_names(self) -> list[str]:
        names = ["loglik"] + (["kl"] if self.kl else []) + (["agreement"] if self.agreement else [])
        return names + list(self.extra_metrics)

    def _logprobs(self, placement: Placement, batch: _Batch) -> Tensor:
        """Float32 log-probabilities [N, vocab] at the batch's scored positions."""
        h = self.model(batch.ids, placement, return_hidden=True)  # causal: right padding needs no mask
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch.flat)
        return F.log_softmax(self.model.logits(h).float(), dim=-1)

    def _reference(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per batch: reference log-probs [N, vocab] (or top-k values [N, k]) and top-k indices (or None)."""
        if self._reference_cache is None:
            cache = []
            with torch.inference_mode():
                for b in self._batches:
                    lp = self._logprobs(self.reference, b)
                    if self.reference_topk is None or self.reference_topk >= lp.shape[-1]:
                        cache.append((lp, None))
                    else:
                        vals, idx = lp.topk(self.reference_topk, dim=-1)
                        cache.append((vals, idx))
            self._reference_cache = cache
        return self._reference_cache

    def score(self, placement: str | Sequence[str]) -> dict[str, float]:
        """Metrics of one placement (letters, mixer names or a preset), plus ``tokens`` and ``seconds``."""
        resolved = self.model.resolve(placement)
        start = time.perf_counter()
        refs = self._reference() if (self.kl or self.agreement) else None
        loglik = kl = agree = 0.0
        with torch.inference_mode():
            for i, b in enumerate(self._batches):
                lp = self._logprobs(resolved, b)
                loglik += float(lp.gather(1, b.targets[:, None]).sum())
                if refs is None:
                    continue
                ref, idx = refs[i]
                if self.kl:
                    kl += float(_kl(ref, idx, lp).sum())
                if self.agreement:
                    ref_top = ref.argmax(-1) if idx is None else idx[:, 0]
                    agree += float((lp.argmax(-1) == ref_top).sum())
        n = self.n_tokens
        out: dict[str, float] = {"loglik": loglik / n}
        if self.kl:
            out["kl"] = max(kl / n, 0.0)  # float noise can leave -1e-9 for identical distributions
        if self.agreement:
            out["agreement"] = agree / n
        for name, fn in self.extra_metrics.items():
            value = float(fn(self.model, resolved))
            if not math.isfinite(value):
                raise PlaceError(f"extra metric {name!r} returned {value} for {placement!r}")
            out[name] = value
        out["tokens"] = n
        out["seconds"] = time.perf_counter() - start
        return out


def _kl(ref: Tensor, idx: Tensor | None, lp: Tensor) -> Tensor:
    """Per-position KL(ref || lp); with top-k ``idx``, of the distributions coarsened to top-k + rest."""
    if idx is None:
        return (ref.exp() * (ref - lp)).sum(-1)
    q = lp.gather(1, idx)
    head = (ref.exp() * (ref - q)).sum(-1)
    p_rest = (-torch.expm1(torch.logsumexp(ref, -1))).clamp(min=0.0)
    q_rest = (-torch.expm1(torch.logsumexp(q, -1))).clamp(min=1e-30)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-30).log() - q_rest.log()), 0.0)
    return head + tail


def _fingerprint(sequences: Sequence[TokenSequence]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(np.int64([s.tokens.size, s.prompt_len]).tobytes())
        h.update(np.ascontiguousarray(s.tokens, dtype=np.uint32).tobytes())
    return h.hexdigest()[:16]


def measure_placements(
    scorer: PlacementScorer,
    placements: Sequence[str],
    table: MeasurementTable | None = None,
    *,
    source: str | None = None,
    log: Callable[[str], None] | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Score each placement not yet in ``table`` and append its record there as soon as it is measured.

    Returns the new records (``placement`` letters, the metrics, ``tokens``, ``seconds``, ``source``).
    Placements are validated against the model before anything runs. ``show_progress``: a progress bar on
    stderr (on a terminal; see ``gearshift.clitools.progress``).
    """
    wanted = list(dict.fromkeys(scorer.space.check(p) for p in placements))
    done = table.done if table is not None else set()
    todo = [p for p in wanted if p not in done]
    if log and len(todo) < len(wanted):
        log(f"{len(wanted) - len(todo)} of {len(wanted)} placements already measured, skipping them")
    bar = progress(total=len(todo), desc="measure", unit="placement", enabled=show_progress)
    try:
        return _measure(scorer, todo, table, source, log, bar)
    finally:
        bar.close()  # before anything else prints (an interrupt's message, the summary)


def _measure(scorer, todo, table, source, log, bar) -> list[dict[str, Any]]:
    out = []
    for k, p in enumerate(todo, start=1):
        record: dict[str, Any] = {"placement": p, **scorer.score(p)}
        if source is not None:
            record["source"] = source
        if table is not None:
            table.append(record)
        out.append(record)
        if log:
            shown = " ".join(f"{m}={record[m]:.4f}" for m in scorer.metric_names())
            line = f"[{k}/{len(todo)}] {p} {shown} ({record['seconds']:.2f}s)"
            if not bar.disable:
                progress_write(bar, line)  # above the bar, not through it
            else:
                log(line)
        bar.update(1)
    return out
