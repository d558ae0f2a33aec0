"""Rank stability: do two measurements of the same placements (two training checkpoints, two seeds, a cheap and
a full benchmark) order them the same way, overall and among the cheap placements presets are picked from?

Both tables are compared on the placements they share, in quality orientation (higher is better, so ``kl`` is
negated) because top-k means "the k best". Budgets default to cost quartiles of the shared placements.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cost_sources import CostTerms
from .fit import quality_sign
from .metrics import rank_stability
from .space import PlaceError
from .table import MeasurementTable

__all__ = ["compare_tables"]


def compare_tables(
    table_a: MeasurementTable | str | Path,
    table_b: MeasurementTable | str | Path,
    *,
    metric: str = "loglik",
    costs: CostTerms | None = None,
    budgets: Sequence[float] | None = None,
    k: int = 5,
    minimize: bool | None = None,
) -> dict[str, Any]:
    """Spearman, Kendall and top-k overlap (overall and per cost budget) of one metric in two tables."""
    a = table_a if isinstance(table_a, MeasurementTable) else MeasurementTable.read(table_a)
    b = table_b if isinstance(table_b, MeasurementTable) else MeasurementTable.read(table_b)
    if a.space is not None and b.space is not None:
        a.space.require_same(b.space, f"table {b.path}")
    sign = quality_sign(metric, minimize)
    qa = {p: sign * v for p, v in a.as_mapping(metric).items()}
    qb = {p: sign * v for p, v in b.as_mapping(metric).items()}
    shared = sorted(set(qa) & set(qb))
    if len(shared) < 2:
        raise PlaceError(f"{a.path} and {b.path} share {len(shared)} placements; need at least 2 to compare ranks")
    cost_map = None
    if costs is not None:
        space = a.space or b.space
        if space is None:
            raise PlaceError("cost budgets need tables with a header naming the model's mixers")
        totals = costs.total(space.encode(shared))
        cost_map = dict(zip(shared, totals.tolist(), strict=True))
        if budgets is None:
            budgets = sorted({float(q) for q in np.quantile(totals, [0.25, 0.5, 0.75, 1.0])})
    elif budgets:
        raise PlaceError("budgets need a cost model (--costs)")
    out = rank_stability({p: qa[p] for p in shared}, {p: qb[p] for p in shared}, costs=cost_map, budgets=budgets, k=k)
    out.update(metric=metric, k=k, only_a=len(set(qa) - set(qb)), only_b=len(set(qb) - set(qa)))
    return out
