"""Evaluation result documents: one row per placement (preset name, placement letters, score per task).

Every evaluation (tasks, NIAH, perplexity) writes the same shape, so the report can merge several runs and the
placement toolkit can read placement -> quality pairs without knowing which evaluation produced them::

    {"format": "gearshift-eval/1", "kind": "tasks", "baseline": "all-attention", "settings": {...},
     "rows": [{"preset": "fast", "placement": "GGKS", "scores": {"hellaswag": 0.31}, "details": {...}}]}

Score names: a task name (accuracy, its primary metric), ``niah_greedy`` / ``niah_ll`` (accuracy over the
grid), ``ll:<shards>`` (mean log-likelihood per token) and ``ppl:<shards>`` (perplexity, lower is better).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..placement import PlacementError, PlacementSpec, placement_letters
from .errors import EvalError

if TYPE_CHECKING:
    from ..model import Supernet

FORMAT = "gearshift-eval/1"
BASELINE = "all-attention"


@dataclass
class ResultRow:
    preset: str
    placement: str
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "placement": self.placement, "scores": self.scores, "details": self.details}


def higher_is_better(score: str) -> bool:
    return not score.startswith("ppl:")


def is_accuracy(score: str) -> bool:
    """Scores averaged into a preset's headline quality (likelihood scores are on another scale)."""
    return not score.startswith(("ppl:", "ll:"))


def placements_to_evaluate(
    model: Supernet, presets: Sequence[str] | None = None, *, baseline: bool = True
) -> dict[str, tuple[str, ...]]:
    """Name -> resolved placement: the all-attention baseline first (when every layer holds attention), then
    the given presets / letter strings, or every preset stored with the checkpoint when none are given."""
    out: dict[str, tuple[str, ...]] = {}
    if baseline:
        # a thinned checkpoint may lack attention in some layer: its results then stay absolute
        with contextlib.suppress(PlacementError):
            out[BASELINE] = model.resolve(BASELINE)
    for name in list(presets) if presets else list(model.presets):
        if name in out:
            continue
        out[name] = model.resolve(name)
    if not out:
        raise EvalError("nothing to evaluate: the checkpoint stores no presets; pass --preset NAME or a letter string")
    return out


def letters(model: Supernet, placement: PlacementSpec) -> str:
    return placement_letters(model.resolve(placement), model.config)


def document(kind: str, rows: Iterable[ResultRow], settings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": kind,
        "baseline": BASELINE,
        "settings": dict(settings),
        "rows": [r.as_dict() for r in rows],
    }


def write_document(path: str | Path, doc: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=float))
    return path


def read_rows(paths: Sequence[str | Path]) -> list[ResultRow]:
    """Rows of several result documents merged by preset name (later files add or overwrite scores)."""
    merged: dict[str, ResultRow] = {}
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EvalError(f"{p}: cannot read results ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise EvalError(f"{p}: not a gearshift evaluation result (format {FORMAT!r})")
        for raw in doc.get("rows", []):
            try:
                row = merged.setdefault(raw["preset"], ResultRow(raw["preset"], raw["placement"]))
                if row.placement != raw["placement"]:
                    raise EvalError(
                        f"{p}: preset {raw['preset']} has placement {raw['placement']}, elsewhere {row.placement}"
                    )
                row.scores.update({k: float(v) for k, v in raw["scores"].items()})
                row.details.update(raw.get("details", {}))
            except (KeyError, TypeError, AttributeError) as exc:
                raise EvalError(f"{p}: malformed result row ({exc})") from None
    return list(merged.values())
