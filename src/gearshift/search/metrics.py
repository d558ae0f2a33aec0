"""Rank and frontier metrics for judging placement search against measurements.

Placement search is only useful if the surrogate ranks placements the way the benchmark does and if the
frontier it proposes is not beaten by placements we already measured, so these are the numbers we report.
Pure numpy/scipy: no model code involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray

__all__ = [
    "kendall",
    "pareto_front",
    "pareto_regret",
    "rank_stability",
    "spearman",
    "topk_overlap",
]


def _paired(a: ArrayLike, b: ArrayLike, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"need two score lists of equal length, got {x.size} and {y.size}")
    if x.size < min_n:
        raise ValueError(f"need at least {min_n} paired values, got {x.size}")
    return x, y


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation; nan when one side is constant (no ranking to compare)."""
    x, y = _paired(a, b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def kendall(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall tau-b; reads as the fraction of concordant minus discordant pairs, robust to ties."""
    x, y = _paired(a, b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.kendalltau(x, y).statistic)


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    # stable sort on the negated score: ties resolve by position, so the result is deterministic
    return np.argsort(-scores, kind="stable")[:k]


def topk_overlap(a: ArrayLike, b: ArrayLike, k: int) -> float:
    """Fraction of the k best items under ``a`` that are also among the k best under ``b`` (higher = better).

    This is what matters when only the top few placements will ever be shipped as presets.
    """
    x, y = _paired(a, b, min_n=1)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, x.size)
    shared = np.intersect1d(_top_indices(x, k), _top_indices(y, k))
    return shared.size / k


def pareto_front(costs: ArrayLike, qualities: ArrayLike) -> np.ndarray:
    """Indices of the non-dominated points (low cost, high quality), sorted by cost ascending.

    A point is dominated when another one is no more expensive and no worse, and strictly better in one of the
    two; exact duplicates do not dominate each other, so both are kept.
    """
    c = np.asarray(costs, dtype=float).ravel()
    q = np.asarray(qualities, dtype=float).ravel()
    if c.shape != q.shape:
        raise ValueError(f"costs and qualities differ in length: {c.size} vs {q.size}")
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    no_worse = (c[None, :] <= c[:, None]) & (q[None, :] >= q[:, None])
    strictly = (c[None, :] < c[:, None]) | (q[None, :] > q[:, None])
    dominated = (no_worse & strictly).any(axis=1)
    idx = np.flatnonzero(~dominated)
    order = np.lexsort((-q[idx], c[idx]))
    return idx[order]


def pareto_regret(
    chosen_cost: float | ArrayLike,
    chosen_quality: float | ArrayLike,
    measured_costs: ArrayLike,
    measured_qualities: ArrayLike,
    cost_tol: float = 0.0,
) -> float | np.ndarray:
    """Best measured quality at the same or lower cost, minus the chosen quality.

    ``>= 0`` means the chosen placement is worse than something already measured that costs no more
    (0 when the chosen placement is itself the best measured one); a negative value means it beats every
    measured placement in its cost range. ``nan`` when nothing measured costs at most ``chosen_cost +
    cost_tol``, since then there is nothing to regret against. Vectorised over the chosen points.
    """
    mc = np.asarray(measured_costs, dtype=float).ravel()
    mq = np.asarray(measured_qualities, dtype=float).ravel()
    if mc.shape != mq.shape:
        raise ValueError(f"measured costs and qualities differ in length: {mc.size} vs {mq.size}")
    cc = np.asarray(chosen_cost, dtype=float)
    cq = np.asarray(chosen_quality, dtype=float)
    if cc.shape != cq.shape:
        raise ValueError(f"chosen cost and quality differ in shape: {cc.shape} vs {cq.shape}")
    within = mc[None, :] <= cc.reshape(-1, 1) + cost_tol
    best = np.where(within, mq[None, :], -np.inf).max(axis=1, initial=-np.inf)
    regret = np.where(np.isfinite(best), best - cq.ravel(), np.nan)
    return float(regret[0]) if cc.ndim == 0 else regret.reshape(cc.shape)


def _align(
    table_a: Mapping[Any, float] | ArrayLike,
    table_b: Mapping[Any, float] | ArrayLike,
    costs: Mapping[Any, float] | ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(table_a, Mapping) != isinstance(table_b, Mapping):
        raise ValueError("table_a and table_b must both be mappings (placement -> score) or both arrays")
    if isinstance(table_a, Mapping):
        assert isinstance(table_b, Mapping)
        keys = sorted(set(table_a) & set(table_b), key=str)
        if len(keys) < 2:
            raise ValueError(f"the two tables share {len(keys)} placements; need at least 2 to compare")
        a = np.array([table_a[k] for k in keys], dtype=float)
        b = np.array([table_b[k] for k in keys], dtype=float)
        if costs is None:
            return a, b, None
        if not isinstance(costs, Mapping):
            raise ValueError("with mapping tables, costs must also be a mapping placement -> cost")
        missing = [k for k in keys if k not in costs]
        if missing:
            raise ValueError(f"costs lack {len(missing)} compared placements, e.g. {missing[0]!r}")
        return a, b, np.array([costs[k] for k in keys], dtype=float)
    a, b = _paired(table_a, table_b)
    if costs is None:
        return a, b, None
    if isinstance(costs, Mapping):
        raise ValueError("with array tables, costs must be an array aligned with them")
    c = np.asarray(costs, dtype=float).ravel()
    if c.shape != a.shape:
        raise ValueError(f"costs has {c.size} entries but the tables have {a.size}")
    return a, b, c


def rank_stability(
    table_a: Mapping[Any, float] | ArrayLike,
    table_b: Mapping[Any, float] | ArrayLike,
    costs: Mapping[Any, float] | ArrayLike | None = None,
    budgets: Sequence[float] | None = None,
    k: int = 5,
) -> dict[str, Any]:
    """Compare two measurements of the same placements (e.g. two seeds, or a cheap and a full benchmark).

    Tables are aligned arrays or mappings keyed by placement (compared on their shared keys). Returns
    ``spearman``, ``kendall``, ``n`` and ``topk_overlap``: a dict budget -> overlap of the top-k placements
    among those with cost <= budget (key ``None`` = all placements), because a ranking can be stable
    overall yet reshuffle exactly the cheap placements a preset would be picked from.
    """
    a, b, c = _align(table_a, table_b, costs)
    if budgets is not None and c is None:
        raise ValueError("budgets given without costs")
    overlaps: dict[float | None, float] = {None: topk_overlap(a, b, k)}
    for budget in budgets or ():
        assert c is not None
        sel = c <= budget
        overlaps[float(budget)] = topk_overlap(a[sel], b[sel], k) if sel.any() else float("nan")
    return {"spearman": spearman(a, b), "kendall": kendall(a, b), "n": int(a.size), "topk_overlap": overlaps}
