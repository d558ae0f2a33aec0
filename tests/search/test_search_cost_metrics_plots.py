"""Cost models, ranking/frontier metrics and the plot writers."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from gearshift.search import (
    AdditiveCost,
    RegressionCost,
    Solution,
    frontier_html,
    kendall,
    load_cost_model,
    pareto_front,
    pareto_frontier,
    pareto_regret,
    plot_effect_heatmap,
    plot_frontier,
    rank_stability,
    spearman,
    stratified_placements,
    topk_overlap,
)

NAMES = ["attention", "sliding_window", "kda", "gdn"]
REL = np.array([1.0, 0.48, 0.21, 0.14])

# ------------------------------------------------------------------------------------------------ cost models


def test_additive_cost_per_mixer_and_per_layer(tmp_path) -> None:
    P = stratified_placements(20, 6, 4, 0)
    model = AdditiveCost(REL, mixer_names=NAMES, metadata={"batch": 8, "context": 32768, "note": "h200"})
    counts = np.stack([np.bincount(row, minlength=4) for row in P])
    assert np.allclose(model.predict(P), counts @ REL)
    assert model.as_dp_costs(6).shape == (6, 4) and np.allclose(model.as_dp_costs(6)[3], REL)
    with pytest.raises(ValueError, match="n_layers"):
        model.as_dp_costs()
    assert np.allclose(model.speedup(np.full(6, 3), np.zeros(6, dtype=int)), 1.0 / 0.14)

    per_layer = np.random.default_rng(1).uniform(0.1, 1.0, (6, 4))
    layered = AdditiveCost(per_layer, mixer_names=NAMES)
    expect = [sum(per_layer[l, p[l]] for l in range(6)) for p in P]
    assert np.allclose(layered.predict(P), expect)
    with pytest.raises(ValueError, match="6"):
        layered.predict(np.zeros((2, 5), dtype=int))
    # DP costs are the model's costs
    rng = np.random.default_rng(2)
    sols = pareto_frontier(0.0, rng.normal(size=(6, 4)), None, layered.as_dp_costs(), cost_resolution=0.01)
    assert np.allclose([s.cost for s in sols], layered.predict(np.stack([s.placement for s in sols])))

    path = tmp_path / "cost.json"
    model.to_json(path)
    back = AdditiveCost.from_json(path)
    assert back.metadata == {"batch": 8, "context": 32768, "note": "h200"}
    assert back.mixer_names == NAMES and np.array_equal(back.costs, REL)
    assert isinstance(load_cost_model(path), AdditiveCost)
    with pytest.raises(ValueError, match="not a RegressionCost"):
        RegressionCost.from_json(path)
    with pytest.raises(ValueError, match="non-negative"):
        AdditiveCost([1.0, -0.1])
    with pytest.raises(ValueError, match="mixer names"):
        AdditiveCost(REL, mixer_names=NAMES[:3])


def step_times(P_list, per_layer, overhead):
    return np.array([overhead + per_layer[p].sum() for p in P_list])


def test_regression_cost_recovers_costs_from_several_depths(tmp_path) -> None:
    truth = 0.002 * REL
    rows = [p for L in (8, 12, 16) for p in stratified_placements(15, L, 4, L)]
    y = step_times(rows, truth, overhead=0.01)
    model = RegressionCost(4, mixer_names=NAMES, metadata={"batch": 1, "context": 4096}).fit(rows, y)
    assert model.intercept_fitted_
    assert np.allclose(model.coef_, truth, atol=1e-10)
    assert model.intercept_ == pytest.approx(0.01, abs=1e-10)
    assert np.allclose(model.relative_costs(), REL)
    assert np.allclose(model.as_dp_costs(5, relative=True), np.tile(REL, (5, 1)))
    P16 = stratified_placements(10, 16, 4, 99)
    assert model.score(P16, step_times(P16, truth, 0.01)) == pytest.approx(1.0)
    sp = model.speedup(np.full(16, 3), np.zeros(16, dtype=int))
    assert sp[0] == pytest.approx((0.01 + 16 * 0.002) / (0.01 + 16 * 0.002 * 0.14))

    path = tmp_path / "reg.json"
    model.to_json(path)
    back = load_cost_model(path)
    assert isinstance(back, RegressionCost)
    assert back.metadata == {"batch": 1, "context": 4096}
    assert np.allclose(back.predict(P16), model.predict(P16))


def test_regression_cost_single_depth_confounding() -> None:
    L = 12
    truth = 0.002 * REL
    P = stratified_placements(40, L, 4, 5)
    y = step_times(P, truth, overhead=0.012)
    auto = RegressionCost(4).fit(P, y)  # no intercept: overhead / L is folded into each per-layer cost
    assert not auto.intercept_fitted_ and auto.intercept_ == 0.0
    assert np.allclose(auto.coef_, truth + 0.012 / L, atol=1e-10)
    assert auto.score(P, y) == pytest.approx(1.0)
    known = RegressionCost(4, overhead=0.012).fit(P, y)
    assert np.allclose(known.coef_, truth, atol=1e-10) and np.allclose(known.relative_costs(), REL)
    with pytest.warns(UserWarning, match="confounded"):
        RegressionCost(4, fit_intercept=True).fit(P, y)


def test_regression_cost_is_non_negative_like_positive_least_squares() -> None:
    rng = np.random.default_rng(3)
    rows = [p for L in (6, 10) for p in stratified_placements(25, L, 4, L)]
    counts = np.stack([np.bincount(p, minlength=4) for p in rows])
    y = counts @ np.array([1.0, 0.5, 0.0, 0.0]) + 0.3 + rng.normal(0, 0.4, len(rows))
    model = RegressionCost(4).fit(rows, y)
    ref = LinearRegression(positive=True).fit(counts, y)
    assert np.all(model.coef_ >= 0) and model.intercept_ >= 0
    assert np.allclose(model.coef_, ref.coef_, atol=1e-6)
    assert model.intercept_ == pytest.approx(ref.intercept_, abs=1e-6)
    unconstrained = LinearRegression().fit(counts, y).coef_
    assert unconstrained.min() < 0  # the constraint was needed


def test_regression_cost_errors() -> None:
    model = RegressionCost(3)
    with pytest.raises(ValueError, match="not fitted"):
        model.predict(np.zeros((1, 4), dtype=int))
    with pytest.raises(ValueError, match="y has 2"):
        model.fit(np.zeros((3, 4), dtype=int), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        model.fit(np.full((3, 4), 3), [1.0, 2.0, 3.0])
    zero_ref = RegressionCost(2).fit(np.array([[1, 1], [1, 1], [1, 1]]), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="reference"):
        zero_ref.relative_costs()


# -------------------------------------------------------------------------------------------------- metrics


def test_rank_correlations_and_topk() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        kendall([1, 2], [1, 2, 3])
    a = [0.9, 0.8, 0.7, 0.1, 0.0]
    b = [0.9, 0.1, 0.7, 0.8, 0.0]
    assert topk_overlap(a, b, 2) == pytest.approx(0.5)
    assert topk_overlap(a, b, 3) == pytest.approx(2 / 3)
    assert topk_overlap(a, b, 10) == pytest.approx(1.0)


def test_pareto_front_matches_definition() -> None:
    c = np.array([1.0, 2.0, 2.0, 3.0, 0.5, 3.0, 1.0])
    q = np.array([0.5, 0.7, 0.6, 0.7, 0.1, 0.9, 0.5])
    assert pareto_front(c, q).tolist() == [4, 0, 6, 1, 5]
    rng = np.random.default_rng(0)
    c, q = rng.integers(0, 20, 200).astype(float), rng.integers(0, 20, 200).astype(float)
    expected = [
        i
        for i in range(200)
        if not any(c[j] <= c[i] and q[j] >= q[i] and (c[j] < c[i] or q[j] > q[i]) for j in range(200))
    ]
    assert sorted(pareto_front(c, q).tolist()) == expected
    assert np.all(np.diff(c[pareto_front(c, q)]) >= 0)


def test_pareto_regret() -> None:
    mc = [1.0, 2.0, 3.0]
    mq = [0.2, 0.5, 0.4]
    assert pareto_regret(2.5, 0.3, mc, mq) == pytest.approx(0.2)
    assert pareto_regret(2.0, 0.5, mc, mq) == pytest.approx(0.0)
    assert pareto_regret(3.0, 0.9, mc, mq) == pytest.approx(-0.4)
    assert np.isnan(pareto_regret(0.5, 0.1, mc, mq))
    assert pareto_regret(1.95, 0.1, mc, mq, cost_tol=0.1) == pytest.approx(0.4)
    out = pareto_regret(np.array([1.0, 3.0]), np.array([0.0, 0.0]), mc, mq)
    assert np.allclose(out, [0.2, 0.5])


def test_rank_stability() -> None:
    a = {"FFFF": 0.9, "FFSG": 0.8, "FSGG": 0.6, "GGGG": 0.2, "SSSS": 0.7}
    b = {"FFFF": 0.88, "FFSG": 0.79, "FSGG": 0.5, "GGGG": 0.25, "KKKK": 0.1}
    cost = {"FFFF": 4.0, "FFSG": 2.6, "FSGG": 1.8, "GGGG": 0.6, "SSSS": 2.0}
    out = rank_stability(a, b, costs=cost, budgets=[2.0, 0.5], k=1)
    assert out["n"] == 4
    assert out["spearman"] == pytest.approx(1.0) and out["kendall"] == pytest.approx(1.0)
    assert out["topk_overlap"][None] == pytest.approx(1.0)
    assert out["topk_overlap"][2.0] == pytest.approx(1.0)
    assert np.isnan(out["topk_overlap"][0.5])
    arr = rank_stability([1, 2, 3, 4], [1, 3, 2, 4], costs=[1, 1, 5, 5], budgets=[1.0], k=1)
    assert arr["kendall"] == pytest.approx(4 / 6)
    assert arr["topk_overlap"][1.0] == pytest.approx(1.0)
    swapped = rank_stability([1, 2, 3, 4], [2, 1, 3, 4], costs=[1, 1, 5, 5], budgets=[1.0], k=1)
    assert swapped["topk_overlap"][1.0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="both"):
        rank_stability(a, [1, 2])
    with pytest.raises(ValueError, match="without costs"):
        rank_stability([1, 2, 3], [1, 2, 3], budgets=[1.0])


# ---------------------------------------------------------------------------------------------------- plots


def frontier_solutions() -> list[Solution]:
    rng = np.random.default_rng(4)
    L = 6
    cost = np.tile(REL, (L, 1))
    h = rng.normal(0, 0.1, (L, 4))
    h[:, 0] = 0.0
    h[:, 1:] -= 0.05 * np.arange(1, 4)
    return pareto_frontier(0.7, h, None, cost, cost_resolution=0.01)


def test_plot_frontier_png(tmp_path) -> None:
    sols = frontier_solutions()
    rng = np.random.default_rng(5)
    measured = (rng.uniform(1, 6, 40), rng.uniform(0.4, 0.8, 40))
    out = plot_frontier(
        tmp_path / "sub" / "f.png",
        measured=measured,
        frontier=sols,
        presets=[("fast", 1.5, 0.6), ("full", 6.0, 0.7)],
        mixer_letters="FSKG",
        annotate_frontier=True,
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    arrays = plot_frontier(tmp_path / "g.png", frontier=([1, 2, 3], [0.1, 0.2, 0.3]))
    assert arrays.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="qualities"):
        plot_frontier(tmp_path / "h.png", measured=([1, 2], [1]))


def test_frontier_html_is_self_contained_and_holds_points(tmp_path) -> None:
    sols = frontier_solutions()
    measured = ([1.2, 3.3], [0.61, 0.72], [np.array([0, 1, 2, 3, 3, 3]), "FFFFFF"])
    out = frontier_html(
        tmp_path / "f.html",
        measured=measured,
        frontier=sols,
        mixer_letters="FSKG",
        presets=[("<fast>", 1.5, 0.6)],
        title="demo",
    )
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page
    assert "FSKGGG" in page and "FFFFFF" in page
    assert "&lt;fast&gt;" in page and "<fast>" not in page.split("frontier-data")[0]
    for s in sols:
        assert s.as_string("FSKG") in page
    blob = re.search(r'<script type="application/json" id="frontier-data">(.*?)</script>', page, re.S)
    assert blob is not None
    data = json.loads(blob.group(1))
    assert [p["cost"] for p in data["frontier"]] == pytest.approx([s.cost for s in sols])
    assert [p["quality"] for p in data["frontier"]] == pytest.approx([s.quality for s in sols])
    assert data["measured"][0] == {"cost": 1.2, "quality": 0.61, "placement": "FSKGGG"}
    assert data["presets"] == [{"name": "<fast>", "cost": 1.5, "quality": 0.6}]
    assert page.count('class="frontier"') == len(sols) and page.count('class="measured"') == 2
    assert "addEventListener" in page
    with pytest.raises(ValueError, match="nothing to plot"):
        frontier_html(tmp_path / "empty.html")


def test_effect_heatmap(tmp_path) -> None:
    rng = np.random.default_rng(6)
    one = rng.normal(0, 0.02, (12, 4))
    one[:, 0] = 0.0
    out = plot_effect_heatmap(tmp_path / "e.png", one, NAMES, std=np.full((12, 4), 0.01))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with pytest.raises(ValueError, match="mixer names"):
        plot_effect_heatmap(tmp_path / "x.png", one, NAMES[:3])


def test_plots_do_not_touch_pyplot_state(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_frontier(tmp_path / "a.png", frontier=frontier_solutions())
    import sys

    assert "matplotlib.pyplot" not in sys.modules or sys.modules["matplotlib.pyplot"].get_fignums() == []
