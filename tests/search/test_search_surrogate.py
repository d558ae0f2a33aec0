"""ClusterExpansion: coefficient meaning, exact hand-off to the DP, uncertainty, selection, validation and the
scikit-learn estimator protocol (clone, parameters, cross-validation)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.utils import estimator_checks

from gearshift.search import ESTIMATORS, ClusterExpansion, Solution, evaluate, stratified_placements
from gearshift.search.fit import SurrogateFit
from gearshift.search.metrics import kendall, spearman
from gearshift.search.space import PlacementSpace


def make_truth(seed: int, L: int, M: int, r: int, reference: int = 0, sparsity: float = 1.0):
    """Ground truth in the documented parametrisation (zero wherever a reference mixer is involved)."""
    rng = np.random.default_rng(seed)
    intercept = float(rng.normal(2.0, 0.5))
    one = rng.normal(0.0, 1.0, (L, M))
    one[:, reference] = 0.0
    pairs = rng.normal(0.0, 0.5, (r, L, M, M)) * (rng.random((r, L, M, M)) < sparsity)
    pairs[:, :, reference, :] = 0.0
    pairs[:, :, :, reference] = 0.0
    for d in range(1, r + 1):
        pairs[d - 1, L - d :] = 0.0
    return intercept, one, pairs


def truth_quality(P: np.ndarray, intercept: float, one: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Loop-based evaluation, independent of the feature code under test."""
    L = one.shape[0]
    y = np.full(len(P), intercept)
    for i, p in enumerate(P):
        for l in range(L):
            y[i] += one[l, p[l]]
            for d in range(1, pairs.shape[0] + 1):
                if l + d < L:
                    y[i] += pairs[d - 1, l, p[l], p[l + d]]
    return y


def dataset(seed: int, n: int, L: int, M: int, r: int, noise: float, reference: int = 0, sparsity: float = 1):
    truth = make_truth(seed, L, M, r, reference, sparsity)
    rng = np.random.default_rng(seed + 1)
    P = stratified_placements(n, L, M, rng)
    y = truth_quality(P, *truth) + rng.normal(0.0, noise, n)
    return truth, P, y


@pytest.mark.parametrize("estimator", ["bayes_ridge", "ridge", "ard"])
def test_coefficients_have_documented_meaning(estimator: str) -> None:
    L, M, r, ref = 6, 3, 1, 1
    (intercept, one, pairs), P, y = dataset(0, 400, L, M, r, noise=0.01, reference=ref)
    ce = ClusterExpansion(L, M, r=r, reference=ref, estimator=estimator).fit(P, y)
    assert ce.intercept_ == pytest.approx(intercept, abs=0.05)
    assert np.abs(ce.onebody_ - one).max() < 0.06
    assert np.abs(ce.pairs_ - pairs).max() < 0.06
    assert np.all(ce.onebody_[:, ref] == 0.0)
    assert np.all(ce.pairs_[:, :, ref, :] == 0.0) and np.all(ce.pairs_[:, :, :, ref] == 0.0)
    assert np.all(ce.pairs_[0, L - 1] == 0.0)
    # reading: all-reference quality, then "convert layer 2 to mixer 0", then a converted pair
    base = np.full(L, ref)
    single = base.copy()
    single[2] = 0
    pair = single.copy()
    pair[3] = 2
    pred = ce.predict(np.stack([base, single, pair]))
    assert pred[0] == pytest.approx(ce.intercept_)
    assert pred[1] - pred[0] == pytest.approx(ce.onebody_[2, 0])
    assert pred[2] - pred[1] == pytest.approx(ce.onebody_[3, 2] + ce.pairs_[0, 2, 0, 2])


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("r", [1, 2, 3])
def test_to_dp_terms_reproduce_predictions(estimator: str, r: int) -> None:
    L, M = 7, 4
    _, P, y = dataset(1, 120, L, M, r, noise=0.05)
    ce = ClusterExpansion(L, M, r=r, estimator=estimator).fit(P, y)
    const, h, J = ce.to_dp_terms()
    assert h.shape == (L, M) and J.shape == (r, L, M, M)
    for d in range(1, r + 1):
        assert np.all(J[d - 1, L - d :] == 0.0)
    test = stratified_placements(50, L, M, 9)
    assert np.allclose(evaluate(test, const, h, J), ce.predict(test), atol=1e-10, rtol=0)
    n_pairs = sum((L - d) * (M - 1) ** 2 for d in range(1, r + 1))
    assert ce.coef_.size == ce.n_features == L * (M - 1) + n_pairs


def test_auto_selection_records_cv() -> None:
    L, M, r = 6, 3, 1
    _, P, y = dataset(2, 90, L, M, r, noise=0.1, sparsity=0.2)
    ce = ClusterExpansion(L, M, r=r, estimator="auto", cv=5, random_state=3).fit(P, y)
    assert set(ce.cv_results_) == set(ESTIMATORS)
    assert all(np.isfinite(v) and v > 0 for v in ce.cv_results_.values())
    assert ce.estimator_name_ == min(ce.cv_results_, key=ce.cv_results_.get)
    # the ridge entry is the K-fold RMSE computed the ordinary way
    X = ce.features(P)
    errs = []
    for tr, te in KFold(5, shuffle=True, random_state=3).split(X):
        m = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(X[tr], y[tr])
        errs.append(np.mean((m.predict(X[te]) - y[te]) ** 2))
    assert ce.cv_results_["ridge"] == pytest.approx(np.sqrt(np.mean(errs)), rel=1e-9)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_predictive_std_tracks_noise_and_is_calibrated(estimator: str) -> None:
    L, M, r = 6, 3, 1
    stds = {}
    for noise in (0.02, 0.3):
        truth, P, y = dataset(3, 200, L, M, r, noise=noise)
        ce = ClusterExpansion(L, M, r=r, estimator=estimator).fit(P, y)
        rng = np.random.default_rng(11)
        Pt = stratified_placements(300, L, M, rng)
        yt = truth_quality(Pt, *truth) + rng.normal(0.0, noise, len(Pt))
        mean, std = ce.predict(Pt, return_std=True)
        assert std.shape == (300,) and np.all(std > 0)
        assert np.allclose(mean, ce.predict(Pt))
        ratio = np.sqrt(np.mean((mean - yt) ** 2)) / np.sqrt(np.mean(std**2))
        assert 0.5 < ratio < 2.0, ratio
        stds[noise] = std.mean()
    assert stds[0.3] > 4 * stds[0.02]


@pytest.mark.parametrize("estimator", ["bayes_ridge", "ard", "ridge"])
def test_std_grows_off_the_training_distribution(estimator: str) -> None:
    L, M, r = 6, 3, 1
    truth, P, _ = dataset(4, 300, L, M, r, noise=0.05)
    P = P[(P[:, :2] != 2).all(axis=1)]  # mixer 2 never seen at layers 0 and 1
    y = truth_quality(P, *truth) + np.random.default_rng(5).normal(0, 0.05, len(P))
    ce = ClusterExpansion(L, M, r=r, estimator=estimator).fit(P, y)
    inside = P[:50]
    outside = inside.copy()
    outside[:, :2] = 2
    _, s_in = ce.predict(inside, return_std=True)
    _, s_out = ce.predict(outside, return_std=True)
    assert s_out.mean() > 1.5 * s_in.mean()


def test_rank_scores_score_and_effect_table() -> None:
    L, M, r = 5, 3, 2
    _, P, y = dataset(5, 150, L, M, r, noise=0.02)
    ce = ClusterExpansion(L, M, r=r, estimator="bayes_ridge").fit(P, y)
    ranks = ce.rank_scores(P, y)
    assert set(ranks) == {"spearman", "kendall"}
    assert ranks["spearman"] > 0.98 and ranks["kendall"] > 0.9
    assert ce.score(P, y) > 0.99
    shuffled = np.random.default_rng(0).permutation(y)
    assert ce.rank_scores(P, shuffled)["spearman"] < 0.5
    names = ["attention", "sliding_window", "gdn"]
    rows = ce.effect_table(names)
    assert len(rows) == L * (M - 1)
    for row in rows:
        m = names.index(row["mixer"])
        assert m != 0
        assert row["effect"] == pytest.approx(ce.onebody_[row["layer"], m])
        assert row["std"] == pytest.approx(ce.onebody_std_[row["layer"], m]) and row["std"] > 0
    assert [r_["layer"] for r_ in rows] == sorted(r_["layer"] for r_ in rows)
    with_pairs = ce.effect_table(names, include_pairs=True)
    pair_rows = [r_ for r_ in with_pairs if "partner_layer" in r_]
    assert len(pair_rows) == sum((L - d) * (M - 1) ** 2 for d in (1, 2))
    for row in pair_rows:
        d = row["partner_layer"] - row["layer"]
        m1, m2 = names.index(row["mixer"]), names.index(row["partner_mixer"])
        assert row["effect"] == pytest.approx(ce.pairs_[d - 1, row["layer"], m1, m2])
    with pytest.raises(ValueError, match="mixer names"):
        ce.effect_table(names[:2])


def test_validation_errors() -> None:
    L, M = 5, 3
    _, P, y = dataset(6, 30, L, M, 1, noise=0.05)
    # scikit-learn's rule: the constructor stores, ``fit`` checks
    with pytest.raises(ValueError, match="r .*1, 2 or 3"):
        ClusterExpansion(L, M, r=4).fit(P, y)
    with pytest.raises(ValueError, match="r .*1, 2 or 3"):
        ClusterExpansion(L, M, r=0).fit(P, y)
    with pytest.raises(ValueError, match="estimator"):
        ClusterExpansion(L, M, estimator="gp").fit(P, y)
    with pytest.raises(ValueError, match="n_mixers"):
        ClusterExpansion(L, 1).fit(P, y)
    with pytest.raises(ValueError, match="reference"):
        ClusterExpansion(L, M, reference=3).fit(P, y)
    ce = ClusterExpansion(L, M, estimator="ridge")
    with pytest.raises(ValueError, match="not fitted"):
        ce.predict(P)
    with pytest.raises(ValueError, match="n_layers=5"):
        ce.fit(P[:, :4], y)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        ce.fit(np.where(P == 2, 3, P), y)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        ce.fit(P - 1, y)
    with pytest.raises(ValueError, match="empty"):
        ce.fit(np.zeros((0, L), dtype=int), [])
    with pytest.raises(ValueError, match="y has 29"):
        ce.fit(P, y[:-1])
    with pytest.raises(ValueError, match="integer"):
        ce.fit(P + 0.5, y)
    with pytest.raises(ValueError, match="at least 3"):
        ce.fit(P[:2], y[:2])
    with pytest.raises(ValueError, match="finite"):
        ce.fit(P, np.where(np.arange(30) == 3, np.nan, y))
    ce.fit(P.astype(float), y)  # integral floats are accepted
    with pytest.raises(ValueError, match="n_layers=5"):
        ce.predict(np.zeros((2, 6), dtype=int))


def test_stratified_placements_cover_compositions() -> None:
    L, M = 12, 4
    P = stratified_placements(3000, L, M, np.random.default_rng(0))
    assert P.shape == (3000, L) and P.dtype == np.int64
    assert P.min() == 0 and P.max() == M - 1
    for m in range(M):
        assert np.array_equal(P[m], np.full(L, m))
    counts = np.stack([np.bincount(row, minlength=M) for row in P])
    assert np.all(counts.sum(axis=1) == L)
    # uniform over compositions: P(no layer of mixer 0) = C(14,2)/C(15,3) = 0.2 (per-layer draws: 0.03)
    assert 0.16 < np.mean(counts[:, 0] == 0) < 0.24
    assert np.mean(counts.max(axis=1) >= 9) > 0.05
    # the permutation spreads each mixer over all layers
    assert np.all([(P[:, l] == 0).mean() > 0.15 for l in range(L)])
    assert np.array_equal(P, stratified_placements(3000, L, M, np.random.default_rng(0)))
    assert np.all(stratified_placements(5, L, M, 1) >= 0) and len(stratified_placements(5, L, M, 1)) == 5
    small = stratified_placements(2 * M - 1, L, M, 0)
    assert not all(np.array_equal(small[m], np.full(L, m)) for m in range(M))  # too few rows for anchors


def test_stratified_placements_respect_allowed() -> None:
    L, M = 8, 3
    allowed = np.ones((L, M), dtype=bool)
    allowed[:3, 2] = False
    allowed[5, :] = [False, True, False]
    P = stratified_placements(500, L, M, 3, allowed=allowed)
    assert allowed[np.arange(L), P].all()
    assert np.array_equal(P[0], np.full(L, 1))  # the only mixer allowed everywhere comes first
    assert (P == 2).sum(axis=1).max() == L - 4
    with pytest.raises(ValueError, match="allowed"):
        stratified_placements(5, L, M, 0, allowed=allowed[:, :2])


def test_propose_picks_most_uncertain_and_adds_frontier() -> None:
    L, M = 6, 3
    _, P, y = dataset(7, 60, L, M, 1, noise=0.05)
    ce = ClusterExpansion(L, M, estimator="bayes_ridge").fit(P, y)
    pool = stratified_placements(400, L, M, 8)
    picked = ce.propose(pool, n=5)
    measured = {row.tobytes() for row in P}
    fresh = np.unique(pool, axis=0)
    fresh = fresh[[row.tobytes() not in measured for row in fresh]]
    _, std = ce.predict(fresh, return_std=True)
    assert picked.shape == (5, L)
    assert np.allclose(np.sort(ce.predict(picked, return_std=True)[1]), np.sort(std)[-5:])
    assert not any(row.tobytes() in measured for row in picked)
    front = [Solution(picked[0].copy(), 0.0, 0.0), Solution(np.zeros(L, dtype=np.int64), 0.0, 0.0)]
    with_front = ce.propose(pool, n=5, frontier=front, exclude=np.ones((1, L), dtype=int))
    assert len(with_front) == 6
    assert np.array_equal(with_front[-1], np.zeros(L))
    generated = ce.propose(None, n=7, n_pool=300)
    assert generated.shape == (7, L) and len(np.unique(generated, axis=0)) == 7
    assert not any(row.tobytes() in measured for row in generated)


# n=40: features outnumber samples (Woodbury path); n=200: the other way round
@pytest.mark.parametrize("n", [40, 200])
def test_fast_ard_matches_sklearn(n: int) -> None:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import ARDRegression

    from gearshift.search import FastARD

    L, M = 6, 3
    _, P, y = dataset(12, n, L, M, 1, noise=0.1, sparsity=0.3)
    X = ClusterExpansion(L, M).features(P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = ARDRegression().fit(X, y)
    ours = FastARD().fit(X, y)
    assert np.allclose(ours.coef_, ref.coef_, atol=1e-6)
    assert ours.intercept_ == pytest.approx(ref.intercept_, abs=1e-6)
    Xt = ClusterExpansion(L, M).features(stratified_placements(30, L, M, 2))
    m_ref, s_ref = ref.predict(Xt, return_std=True)
    m_ours, s_ours = ours.predict(Xt, return_std=True)
    assert np.allclose(m_ours, m_ref, atol=1e-6) and np.allclose(s_ours, s_ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- scikit-learn protocol


def test_clone_and_params_round_trip() -> None:
    L, M = 5, 3
    _, P, y = dataset(7, 40, L, M, 1, noise=0.05)
    params = {
        "n_layers": L,
        "n_mixers": M,
        "r": 2,
        "reference": 1,
        "estimator": "lasso",
        "cv": 4,
        "random_state": 7,
        "n_bootstrap": 10,
    }
    ce = ClusterExpansion(**params)
    assert ce.get_params() == params
    assert ClusterExpansion(L, M).set_params(**params).get_params() == params
    ce.fit(P, y)
    assert ce.get_params() == params  # fitting leaves the parameters as given
    copy = clone(ce)
    assert type(copy) is ClusterExpansion and copy is not ce and copy.get_params() == params
    assert not hasattr(copy, "estimator_")  # a clone is unfitted
    with pytest.raises(NotFittedError):
        copy.predict(P)
    # the clone refits to the same model: the estimator is deterministic for a fixed random_state
    assert np.array_equal(copy.fit(P, y).predict(P), ce.predict(P))
    # invalid parameters are stored (clone and set_params work on them) and rejected by fit
    bad = clone(ClusterExpansion(L, M).set_params(r=9))
    with pytest.raises(ValueError, match="r .*1, 2 or 3"):
        bad.fit(P, y)


@pytest.mark.parametrize(
    "check",
    [
        "check_estimator_cloneable",
        "check_estimator_repr",
        "check_no_attributes_set_in_init",
        "check_do_not_raise_errors_in_init_or_set_params",
        "check_get_params_invariance",
        "check_set_params",
        "check_parameters_default_constructible",
        "check_mixin_order",
        "check_estimators_unfitted",
    ],
)
def test_sklearn_estimator_checks(check: str) -> None:
    """scikit-learn's own checks of the estimator protocol. Its data-driven checks (``check_estimator``) feed random
    float matrices, which are not placements (integer mixer indices per layer), so they do not apply here."""
    getattr(estimator_checks, check)("ClusterExpansion", ClusterExpansion(4, 3, estimator="ridge"))


@pytest.mark.parametrize("estimator", ["auto", "lasso"])
def test_cross_val_predict_equals_hand_rolled_folds(estimator: str) -> None:
    """``cross_val_predict`` over clones gives exactly what the hand-written K-fold loop it replaced gave."""
    L, M, r = 6, 3, 1
    _, P, y = dataset(8, 60, L, M, r, noise=0.05)
    params = {"r": r, "estimator": estimator, "cv": 5, "random_state": 3}
    folds = KFold(5, shuffle=True, random_state=3)
    by_hand = np.empty(len(y))
    for train, test in folds.split(P):
        by_hand[test] = ClusterExpansion(L, M, **params).fit(P[train], y[train]).predict(P[test])
    assert np.array_equal(cross_val_predict(ClusterExpansion(L, M, **params), P, y, cv=folds), by_hand)


def test_surrogate_fit_cv_is_sklearn_cross_validation() -> None:
    """``SurrogateFit.cv`` holds the K-fold figures of the out-of-fold predictions, metric units and sign kept."""
    space = PlacementSpace("FSG", ("FSG",) * 5)
    _, P, y = dataset(9, 50, space.n_layers, space.n_mixers, 1, noise=0.05)
    kl = 1.0 - y  # lower is better: the surrogate is fitted to -kl
    fit = SurrogateFit.fit(space.decode(P), kl, space, metric="kl", r=1, estimator="ridge", random_state=4)
    folds = KFold(5, shuffle=True, random_state=4)
    oof = np.empty(len(y))
    for train, test in folds.split(P):
        model = ClusterExpansion(space.n_layers, space.n_mixers, r=1, estimator="ridge", random_state=4)
        oof[test] = -model.fit(P[train], -kl[train]).predict(P[test])
    assert fit.cv["folds"] == 5 and fit.cv["n"] == 50
    assert fit.cv["rmse"] == pytest.approx(np.sqrt(np.mean((oof - kl) ** 2)), rel=1e-12)
    assert fit.cv["spearman"] == pytest.approx(spearman(oof, kl), rel=1e-12)
    assert fit.cv["kendall"] == pytest.approx(kendall(oof, kl), rel=1e-12)
    assert "5-fold CV RMSE" in fit.summary() and "5-fold CV Spearman" in fit.summary()
