"""Placement toolkit: surrogate quality model, cost models, exact Pareto DP, metrics and plots.

Pure math (numpy / scipy / scikit-learn, matplotlib only for plots): nothing here imports torch, so placement
search runs anywhere the measurements can be read. Typical flow::

    ce = ClusterExpansion(n_layers, n_mixers, r=2).fit(P, quality)
    const, h, J = ce.to_dp_terms()
    frontier = pareto_frontier(const, h, J, cost.as_dp_costs(n_layers), cost_resolution=0.01)

Connected to the model (these load lazily: measuring and timing need torch): ``space`` (letters <-> indices,
checks against the layers), ``table`` (resumable JSONL measurements), ``measure`` (PlacementScorer),
``selection``, ``fit`` (SurrogateFit), ``costs`` (timed/modelled per-layer costs, CostTerms), ``optimize``
(constraints, frontier, presets), ``presets`` (presets.json, Pareto regret), ``loop`` (active learning),
``stability`` and ``cli`` (``gearshift place ...``). See docs/placement.md.
"""

from importlib import import_module

from .cost_model import AdditiveCost, RegressionCost, load_cost_model
from .dp import (
    Solution,
    best_under_budget,
    diverse,
    evaluate,
    pareto_frontier,
    placement_cost,
    placement_string,
)
from .metrics import kendall, pareto_front, pareto_regret, rank_stability, spearman, topk_overlap
from .plots import frontier_html, plot_effect_heatmap, plot_frontier
from .surrogate import ESTIMATORS, ClusterExpansion, FastARD, check_placements, stratified_placements

# name -> submodule, imported on first access (PEP 562)
_LAZY = {
    "PlaceError": "space",
    "PlacementSpace": "space",
    "MeasurementTable": "table",
    "TableError": "table",
    "PlacementMetric": "measure",
    "PlacementScorer": "measure",
    "load_sequences": "measure",
    "measure_placements": "measure",
    "parse_selection": "selection",
    "SurrogateFit": "fit",
    "fit_table": "fit",
    "write_effects": "fit",
    "CostTerms": "costs",
    "fit_regression": "costs",
    "modelled_costs": "costs",
    "timed_costs": "costs",
    "whole_model_times": "costs",
    "Constraints": "optimize",
    "parse_constraints": "optimize",
    "pareto_regret_of": "presets",
    "write_presets": "presets",
    "active_learning": "loop",
    "compare_tables": "stability",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "ESTIMATORS",
    "AdditiveCost",
    "ClusterExpansion",
    "FastARD",
    "RegressionCost",
    "Solution",
    "best_under_budget",
    "check_placements",
    "diverse",
    "evaluate",
    "frontier_html",
    "kendall",
    "load_cost_model",
    "pareto_front",
    "pareto_frontier",
    "pareto_regret",
    "placement_cost",
    "placement_string",
    "plot_effect_heatmap",
    "plot_frontier",
    "rank_stability",
    "spearman",
    "stratified_placements",
    "topk_overlap",
]
