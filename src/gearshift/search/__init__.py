"""Placement toolkit: surrogate quality model, cost models, exact Pareto DP, metrics and plots.

Pure math (numpy / scipy / scikit-learn, matplotlib only for plots): nothing here imports torch, so placement
search runs anywhere the measurements can be read. Typical flow::

    ce = ClusterExpansion(n_layers, n_mixers, r=2).fit(P, quality)
    const, h, J = ce.to_dp_terms()
    frontier = pareto_frontier(const, h, J, cost.as_dp_costs(n_layers), cost_resolution=0.01)

Connected to the model (these load lazily: measuring and timing need torch): ``space`` (letters <-> indices,
checks against the layers), ``table`` (resumable JSONL measurements), ``measure`` (PlacementScorer),
``sampling`` (stratified placements), ``fit`` (SurrogateFit), ``costs`` (timed/modelled per-layer costs,
CostTerms), ``optimize`` (constraints, frontier, presets), ``selection`` (what to measure next), ``presets``
(presets.json, Pareto regret), ``loop`` (active learning), ``stability`` and ``cli`` (``gearshift place ...``).
See docs/placement.md.
"""

from importlib import import_module

# name -> submodule, imported on first access (PEP 562): importing the package (as the command line does for
# every command) needs none of numpy's friends; each tool loads what it uses
_LAZY = {
    "AdditiveCost": "cost_model",
    "RegressionCost": "cost_model",
    "load_cost_model": "cost_model",
    "Solution": "dp",
    "best_under_budget": "dp",
    "diverse": "dp",
    "evaluate": "dp",
    "pareto_frontier": "dp",
    "placement_cost": "dp",
    "placement_string": "dp",
    "kendall": "metrics",
    "pareto_front": "metrics",
    "pareto_regret": "metrics",
    "rank_stability": "metrics",
    "spearman": "metrics",
    "topk_overlap": "metrics",
    "frontier_html": "plots",
    "plot_effect_heatmap": "plots",
    "plot_frontier": "plots",
    "ESTIMATORS": "surrogate",
    "ClusterExpansion": "surrogate",
    "FastARD": "surrogate",
    "check_placements": "surrogate",
    "stratified_placements": "surrogate",
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
    "CostTerms": "cost_sources",
    "fit_regression": "cost_sources",
    "modelled_costs": "cost_sources",
    "timed_costs": "cost_sources",
    "whole_model_times": "cost_sources",
    "Constraints": "optimize",
    "parse_constraints": "optimize",
    "pareto_regret_of": "presets",
    "remove_presets": "presets",
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


__all__ = sorted(_LAZY)
