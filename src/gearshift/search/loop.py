"""Active learning: measure where the surrogate is unsure and where it claims the frontier is, refit, repeat.

Each round fits the surrogate to everything measured so far, runs the exact DP, and measures two kinds of new
placements: points spread along the predicted frontier (the placements the search would ship, so errors there
matter most) and the most uncertain placements of a stratified pool (exploration). Before they are fitted on,
the frontier points are an honest held-out test: the history records how far their predictions were off and
their Pareto regret against everything measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .cost_sources import CostTerms
from .fit import SurrogateFit, fit_table
from .measure import PlacementScorer, measure_placements
from .optimize import Constraints, optimize
from .presets import pareto_regret_of
from .sampling import stratified
from .space import PlaceError
from .table import MeasurementTable

__all__ = ["active_learning"]


def active_learning(
    scorer: PlacementScorer,
    table: MeasurementTable,
    costs: CostTerms,
    *,
    metric: str = "loglik",
    rounds: int = 3,
    n_uncertain: int = 8,
    n_frontier: int = 4,
    initial: int = 32,
    constraints: Constraints | None = None,
    r: int = 1,
    estimator: str = "auto",
    cv: int = 5,
    minimize: bool | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[SurrogateFit, list[dict[str, Any]]]:
    """Run ``rounds`` rounds; returns the final fit (on every measurement) and one history row per round."""
    if metric not in scorer.metric_names():
        raise PlaceError(f"metric {metric!r} is not measured by this scorer ({scorer.metric_names()})")
    if rounds < 0 or n_uncertain < 0 or n_frontier < 0 or (rounds and n_uncertain + n_frontier == 0):
        raise PlaceError("need rounds >= 0 and a positive number of placements per round")
    space = scorer.space
    if len(table.done) < max(initial, 3):
        start = stratified(space, max(initial, 3), seed)
        measure_placements(scorer, start, table, source="stratified", log=log)

    def refit() -> SurrogateFit:
        return fit_table(table, metric=metric, space=space, r=r, estimator=estimator, cv=cv, minimize=minimize)

    history = []
    fit = refit()
    for k in range(1, rounds + 1):
        result = optimize(fit, costs, constraints=constraints, n_presets=max(n_frontier, 1), prefix="frontier")
        front = [p.placement for p in result.presets][:n_frontier]
        predicted = dict(zip(front, fit.predict(front), strict=True)) if front else {}
        new = fit.propose(n_uncertain, frontier=front, exclude=sorted(table.done), seed=seed + k)
        if not new:
            if log:
                log(f"round {k}: nothing left to measure")
            break
        measure_placements(scorer, new, table, source=f"loop:{k}", log=log)
        measured = table.as_mapping(metric)
        errors = [measured[p] - predicted[p] for p in front if p in measured]
        regrets = pareto_regret_of(front, measured, costs, space, sign=fit.sign)
        fit = refit()
        row = {
            "round": k,
            "measured_total": len(measured),
            "new": len(new),
            "frontier": front,
            "frontier_mean_abs_error": float(np.mean(np.abs(errors))) if errors else None,
            "frontier_max_regret": max((g for g in regrets if g is not None), default=None),
            "cv": dict(fit.cv),
        }
        history.append(row)
        if log:
            err = row["frontier_mean_abs_error"]
            log(
                f"round {k}: {len(new)} new, {len(measured)} measured; frontier prediction error "
                f"{'n/a' if err is None else f'{err:.4g}'}, max regret {row['frontier_max_regret']}; {fit.summary()}"
            )
    return fit, history
