"""Placement toolkit: surrogate quality model, cost models, exact Pareto DP, metrics and plots.

Pure math (numpy / scipy / scikit-learn, matplotlib only for plots): nothing here imports torch, so placement
search runs anywhere the measurements can be read. Typical flow::

    ce = ClusterExpansion(n_layers, n_mixers, r=2).fit(P, quality)
    const, h, J = ce.to_dp_terms()
    frontier = pareto_frontier(const, h, J, cost.as_dp_costs(n_layers), cost_resolution=0.01)
"""

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

__all__ = [
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
