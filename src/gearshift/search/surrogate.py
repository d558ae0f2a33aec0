"""Cluster-expansion surrogate: predict a placement's quality from a few measured placements.

Quality is modelled relative to the all-reference placement (all FA by default):

    y(p) = intercept + sum_l a[l, p_l] + sum_{d=1..r} sum_l b[d, l, p_l, p_{l+d}]

with a[l, reference] = 0 and b = 0 whenever either mixer is the reference. Every coefficient then has a
direct reading: ``intercept`` is the all-reference quality, ``onebody_[l, m]`` the change from converting
layer l alone to mixer m, ``pairs_[d-1, l, m1, m2]`` the extra change from converting layers l and l+d
together. The
same form is what the exact DP in ``dp.py`` optimises, so ``to_dp_terms`` hands it over without loss.

Letter codes used elsewhere in the project: F = attention, S = sliding_window, K = kda, G = gdn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import BayesianRidge, Lasso, LassoCV, RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_score
from sklearn.utils.validation import check_is_fitted

from .metrics import kendall, spearman

__all__ = ["ESTIMATORS", "ClusterExpansion", "FastARD", "check_placements", "stratified_placements"]

ESTIMATORS = ("bayes_ridge", "ard", "lasso", "ridge")
_RIDGE_ALPHAS = np.logspace(-3, 3, 13)


def check_placements(P: Any, n_layers: int, n_mixers: int, what: str = "placements") -> np.ndarray:
    """Validate placements and return them as int64 [n, n_layers] (a single [n_layers] row is promoted)."""
    arr = np.asarray(P)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be [n_samples, n_layers], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if arr.shape[1] != n_layers:
        raise ValueError(f"{what} have {arr.shape[1]} layers but the model has n_layers={n_layers}")
    if arr.dtype.kind not in "iu" and (arr.dtype.kind != "f" or not np.all(arr == np.round(arr))):
        raise ValueError(f"{what} must hold integer mixer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_mixers:
        raise ValueError(
            f"{what} values must lie in 0..{n_mixers - 1} (n_mixers={n_mixers}), got {arr.min()}..{arr.max()}"
        )
    return arr


def _rng(random_state: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def stratified_placements(
    n: int,
    n_layers: int,
    n_mixers: int,
    rng: int | np.random.Generator | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Sample ``n`` placements [n, n_layers] stratified by mixer composition.

    Uniform per-layer draws concentrate near n_layers / M layers of each mixer and almost never produce the
    extremes (all-FA, nearly all-GDN) that anchor a surrogate, so we draw the count vector uniformly over all
    compositions (stars and bars) and then place the mixers by a random permutation of the layers. When
    ``n >= 2 * n_mixers`` the first rows are the all-single-mixer placements. With an ``allowed`` [L, M] mask,
    layers are filled in random order, each taking the allowed mixer with the most remaining quota, so the
    composition is only approximately the drawn one where the mask forbids it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n_layers < 1 or n_mixers < 1:
        raise ValueError(f"need n_layers >= 1 and n_mixers >= 1, got {n_layers}, {n_mixers}")
    gen = _rng(rng)
    ok = np.ones((n_layers, n_mixers), dtype=bool)
    if allowed is not None:
        ok = np.asarray(allowed, dtype=bool)
        if ok.shape != (n_layers, n_mixers):
            raise ValueError(f"allowed must be [{n_layers}, {n_mixers}], got shape {ok.shape}")
        if not ok.any(axis=1).all():
            raise ValueError(f"no mixer allowed at layer(s) {np.flatnonzero(~ok.any(axis=1)).tolist()}")
    rows: list[np.ndarray] = []
    if n >= 2 * n_mixers:
        rows += [np.full(n_layers, m) for m in range(n_mixers) if ok[:, m].all()]
    while len(rows) < n:
        # stars and bars: M-1 bar positions among L+M-1 slots, uniform over compositions
        bars = np.sort(gen.choice(n_layers + n_mixers - 1, size=n_mixers - 1, replace=False))
        edges = np.concatenate([[-1], bars, [n_layers + n_mixers - 1]])
        counts = np.diff(edges) - 1
        if allowed is None:
            row = np.repeat(np.arange(n_mixers), counts)
            rows.append(gen.permutation(row))
            continue
        quota = counts.astype(float)
        row = np.empty(n_layers, dtype=np.int64)
        for layer in gen.permutation(n_layers):
            choices = np.flatnonzero(ok[layer])
            score = quota[choices] + gen.random(choices.size) * 1e-3  # random tie break
            m = choices[int(np.argmax(score))]
            row[layer] = m
            quota[m] -= 1
        rows.append(row)
    return np.asarray(rows[:n], dtype=np.int64).reshape(n, n_layers)


class FastARD(RegressorMixin, BaseEstimator):
    """Automatic relevance determination regression (MacKay fixed-point updates, Gamma hyper-priors).

    Same model and updates as ``sklearn.linear_model.ARDRegression``, but each iteration computes only the
    diagonal of the posterior covariance (through the Woodbury identity when features outnumber samples)
    instead of the full p x p matrix, which is what made sklearn's version take a minute at L=48. Features
    whose precision exceeds ``threshold_lambda`` are pruned (coefficient and std exactly 0).
    """

    def __init__(
        self,
        max_iter: int = 300,
        tol: float = 1e-3,
        threshold_lambda: float = 1e4,
        alpha_1: float = 1e-6,
        alpha_2: float = 1e-6,
        lambda_1: float = 1e-6,
        lambda_2: float = 1e-6,
    ) -> None:
        self.max_iter = max_iter
        self.tol = tol
        self.threshold_lambda = threshold_lambda
        self.alpha_1 = alpha_1
        self.alpha_2 = alpha_2
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2

    @staticmethod
    def _posterior(
        Xa: np.ndarray, y: np.ndarray, alpha: float, lam_a: np.ndarray, full: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Posterior mean, diagonal of the covariance, and (if ``full``) the covariance of active weights."""
        n, pa = Xa.shape
        inv = 1.0 / lam_a
        if pa > n:  # Woodbury: Sigma = L^-1 - L^-1 X^T (I/alpha + X L^-1 X^T)^-1 X L^-1
            K = np.eye(n) / alpha + (Xa * inv) @ Xa.T
            cf = cho_factor(K, lower=True)
            mu = inv * (Xa.T @ cho_solve(cf, y))
            B = cho_solve(cf, Xa)
            diag = inv - inv**2 * np.einsum("ij,ij->j", Xa, B)
            cov = np.diag(inv) - (inv[:, None] * (Xa.T @ B)) * inv[None, :] if full else None
        else:
            S = alpha * (Xa.T @ Xa)
            S[np.diag_indices_from(S)] += lam_a
            cov = cho_solve(cho_factor(S, lower=True), np.eye(pa))
            mu = alpha * (cov @ (Xa.T @ y))
            diag = np.diag(cov).copy()
        return mu, diag, cov

    def fit(self, X: np.ndarray, y: np.ndarray) -> FastARD:
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float).ravel()
        n, p = X.shape
        self.X_offset_ = X.mean(axis=0)
        y_mean = float(y.mean())
        Xc, yc = X - self.X_offset_, y - y_mean
        alpha = 1.0 / (float(np.var(yc)) + 1e-12)
        lam = np.ones(p)
        coef = np.zeros(p)
        for it in range(self.max_iter):
            act = lam < self.threshold_lambda
            Xa = Xc[:, act]
            mu, diag, _ = self._posterior(Xa, yc, alpha, lam[act], full=False)
            new = np.zeros(p)
            new[act] = mu
            resid = yc - Xa @ mu
            gamma = 1.0 - lam[act] * diag
            lam[act] = (gamma + 2.0 * self.lambda_1) / (mu**2 + 2.0 * self.lambda_2)
            alpha = (n - gamma.sum() + 2.0 * self.alpha_1) / (float(resid @ resid) + 2.0 * self.alpha_2)
            converged = it > 0 and float(np.abs(coef - new).sum()) < self.tol
            coef = new
            if converged:
                break
        self.n_iter_ = it + 1
        act = lam < self.threshold_lambda
        mu, diag, cov = self._posterior(Xc[:, act], yc, alpha, lam[act], full=True)
        self.coef_ = np.zeros(p)
        self.coef_[act] = mu
        self.coef_std_ = np.zeros(p)
        self.coef_std_[act] = np.sqrt(np.clip(diag, 0.0, None))
        self.active_ = act
        self.sigma_ = cov
        self.alpha_ = float(alpha)
        self.lambda_ = lam
        self.intercept_ = y_mean - float(self.X_offset_ @ self.coef_)
        return self

    def predict(self, X: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=float)
        mean = self.intercept_ + X @ self.coef_
        if not return_std:
            return mean
        Z = (X - self.X_offset_)[:, self.active_]
        quad = np.einsum("ij,jk,ik->i", Z, self.sigma_, Z) if Z.shape[1] else np.zeros(len(X))
        return mean, np.sqrt(np.clip(quad, 0.0, None) + 1.0 / self.alpha_)


class ClusterExpansion(RegressorMixin, BaseEstimator):
    """Linear cluster expansion over placements with one-body and pair (range ``r``) terms.

    A scikit-learn regressor over placements (X = integer mixer indices [n, n_layers]): ``__init__`` only stores
    its parameters and ``fit`` checks them, so ``sklearn.base.clone``, ``get_params``/``set_params`` and
    ``sklearn.model_selection`` (``cross_val_predict``, ``KFold``) work on it.

    ``estimator="auto"`` picks among Bayesian ridge, ARD, lasso and ridge by K-fold CV (negative MSE), storing
    ``cv_results_`` (name -> mean CV RMSE) and ``estimator_name_``. Predictive std: Bayesian ridge and ARD use their
    Gaussian posterior; ``ridge`` uses the Gaussian posterior implied by the ridge penalty with the noise variance
    (``noise_var_``) estimated from the residuals (analytic, residual-based); ``lasso`` uses ``n_bootstrap``
    bootstrap refits at the CV-chosen alpha, with the residual noise variance added. All four stds include
    observation noise, so they are on one scale.
    """

    def __init__(
        self,
        n_layers: int,
        n_mixers: int,
        r: int = 1,
        reference: int = 0,
        estimator: str = "auto",
        cv: int = 5,
        random_state: int | None = 0,
        n_bootstrap: int = 30,
    ) -> None:
        self.n_layers = n_layers
        self.n_mixers = n_mixers
        self.r = r
        self.reference = reference
        self.estimator = estimator
        self.cv = cv
        self.random_state = random_state
        self.n_bootstrap = n_bootstrap

    # -- parameters and features ---------------------------------------------------------------------------

    def _check_params(self) -> None:
        """Parameter checks, run by ``fit`` (scikit-learn's rule: a constructor only stores its arguments)."""
        if int(self.n_layers) != self.n_layers or self.n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {self.n_layers}")
        if int(self.n_mixers) != self.n_mixers or self.n_mixers < 2:
            raise ValueError(f"n_mixers must be an integer >= 2, got {self.n_mixers}")
        if self.r not in (1, 2, 3):
            raise ValueError(f"r (pair range) must be 1, 2 or 3, got {self.r}")
        if not 0 <= self.reference < self.n_mixers:
            raise ValueError(f"reference must be in 0..{self.n_mixers - 1}, got {self.reference}")
        if self.estimator not in ("auto", *ESTIMATORS):
            raise ValueError(f"estimator must be 'auto' or one of {ESTIMATORS}, got {self.estimator!r}")
        if int(self.cv) != self.cv or self.cv < 2:
            raise ValueError(f"cv must be an integer >= 2, got {self.cv}")
        if self.n_bootstrap < 2:
            raise ValueError(f"n_bootstrap must be >= 2, got {self.n_bootstrap}")

    @property
    def _others(self) -> np.ndarray:
        return np.array([m for m in range(self.n_mixers) if m != self.reference])

    @property
    def n_features(self) -> int:
        """Number of one-body plus pair features (the reference mixer contributes none)."""
        k = self.n_mixers - 1
        return self.n_layers * k + sum(max(self.n_layers - d, 0) * k * k for d in range(1, self.r + 1))

    def features(self, P: Any) -> np.ndarray:
        """Indicator features [n, n_features]: one-body block, then pair blocks for d = 1..r."""
        self._check_params()
        P = check_placements(P, self.n_layers, self.n_mixers)
        O = (P[:, :, None] == self._others[None, None, :]).astype(float)  # [n, L, M-1]
        n = P.shape[0]
        blocks = [O.reshape(n, -1)]
        for d in range(1, self.r + 1):
            if d < self.n_layers:
                blocks.append((O[:, :-d, :, None] * O[:, d:, None, :]).reshape(n, -1))
        return np.concatenate(blocks, axis=1)

    def _unpack(self, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        L, M, o = self.n_layers, self.n_mixers, self._others
        k = M - 1
        one = np.zeros((L, M))
        one[:, o] = vec[: L * k].reshape(L, k)
        pairs = np.zeros((self.r, L, M, M))
        pos = L * k
        for d in range(1, self.r + 1):
            n_l = max(L - d, 0)
            if n_l:
                block = vec[pos : pos + n_l * k * k].reshape(n_l, k, k)
                pairs[d - 1][np.ix_(np.arange(n_l), o, o)] = block
                pos += n_l * k * k
        return one, pairs

    # -- estimators ------------------------------------------------------------------------------------------

    def _kfold(self, n: int) -> KFold:
        return KFold(n_splits=min(self.cv, n), shuffle=True, random_state=self.random_state)

    def _make(self, name: str, n_train: int) -> Any:
        if name == "bayes_ridge":
            return BayesianRidge()
        if name == "ard":
            return FastARD()
        if name == "ridge":
            return RidgeCV(alphas=_RIDGE_ALPHAS)
        inner = max(2, min(self.cv, n_train))
        return LassoCV(
            cv=KFold(inner, shuffle=True, random_state=self.random_state),
            max_iter=5000,
            random_state=self.random_state,
        )

    def fit(self, P: Any, y: Any) -> ClusterExpansion:
        """Fit to measured placements P [n, L] and qualities y [n]."""
        self._check_params()
        P = check_placements(P, self.n_layers, self.n_mixers)
        y = np.asarray(y, dtype=float).ravel()
        if y.size != P.shape[0]:
            raise ValueError(f"y has {y.size} values but P has {P.shape[0]} placements")
        if not np.isfinite(y).all():
            raise ValueError("y must be finite")
        n = P.shape[0]
        if n < 3:
            raise ValueError(f"need at least 3 measured placements to fit, got {n}")
        X = self.features(P)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.estimator == "auto":
                self.cv_results_ = self._cv_select(X, y)
                self.estimator_name_ = min(self.cv_results_, key=lambda k: self.cv_results_[k])
            else:
                self.cv_results_ = {}
                self.estimator_name_ = self.estimator
            est = self._make(self.estimator_name_, n)
            est.fit(X, y)
            self.estimator_ = est
            self._fit_uncertainty(X, y)
        self.intercept_ = float(est.intercept_)
        self.coef_ = np.asarray(est.coef_, dtype=float).copy()
        self.onebody_, self.pairs_ = self._unpack(self.coef_)
        self.onebody_std_, self.pairs_std_ = self._unpack(self.coef_std_)
        self.placements_ = P
        self.n_features_in_ = self.n_layers
        return self

    def _cv_select(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        folds = self._kfold(len(y))
        n_train = len(y) - math.ceil(len(y) / folds.get_n_splits())
        results = {}
        for name in ESTIMATORS:
            try:
                model = self._make(name, n_train)
                mse = -cross_val_score(model, X, y, cv=folds, scoring="neg_mean_squared_error")
                results[name] = float(np.sqrt(mse.mean()))
            except (ValueError, np.linalg.LinAlgError):
                results[name] = float("inf")  # this model cannot be fitted on folds this small
        if not any(np.isfinite(v) for v in results.values()):
            raise ValueError("no estimator could be cross-validated on this data; pass estimator= explicitly")
        return results

    def _fit_uncertainty(self, X: np.ndarray, y: np.ndarray) -> None:
        est, name, n = self.estimator_, self.estimator_name_, len(y)
        if name == "bayes_ridge":
            self.coef_std_ = np.sqrt(np.clip(np.diag(est.sigma_), 0, None))
        elif name == "ard":
            self.coef_std_ = est.coef_std_.copy()
        elif name == "ridge":
            alpha = float(est.alpha_)
            self._x_mean_ = X.mean(axis=0)
            _, s, Vt = np.linalg.svd(X - self._x_mean_, full_matrices=False)
            self._ridge_V_ = Vt.T
            self._ridge_w_ = 1.0 / (s**2 + alpha)
            self._ridge_alpha_ = alpha
            dof = float((s**2 * self._ridge_w_).sum())
            resid = y - est.predict(X)
            self.noise_var_ = float(resid @ resid) / max(n - dof - 1.0, 1.0)
            diag = (self._ridge_V_**2 @ self._ridge_w_) + (1.0 - (self._ridge_V_**2).sum(axis=1)) / alpha
            self.coef_std_ = np.sqrt(self.noise_var_ * np.clip(diag, 0, None))
        else:  # lasso: bootstrap refits at the CV-chosen alpha
            rng = np.random.default_rng(self.random_state)
            models = []
            for _ in range(self.n_bootstrap):
                idx = rng.integers(0, n, n)
                m = Lasso(alpha=float(est.alpha_), max_iter=5000).fit(X[idx], y[idx])
                models.append((float(m.intercept_), m.coef_.copy()))
            self._boot_intercepts_ = np.array([b for b, _ in models])
            self._boot_coefs_ = np.stack([c for _, c in models])
            resid = y - est.predict(X)
            nnz = int((est.coef_ != 0).sum())
            self.noise_var_ = float(resid @ resid) / max(n - nnz - 1.0, 1.0)
            self.coef_std_ = self._boot_coefs_.std(axis=0, ddof=1)

    def _check_fitted(self) -> None:
        # NotFittedError is a ValueError (and an AttributeError), as scikit-learn's own estimators raise
        check_is_fitted(self, "estimator_", msg="this ClusterExpansion is not fitted yet; call fit(P, y) first")

    # -- prediction ------------------------------------------------------------------------------------------

    def predict(self, P: Any, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted quality [n]; with ``return_std`` also the predictive std [n] (see class docstring)."""
        self._check_fitted()
        X = self.features(P)
        mean = self.intercept_ + X @ self.coef_
        if not return_std:
            return mean
        name = self.estimator_name_
        if name in ("bayes_ridge", "ard"):
            _, std = self.estimator_.predict(X, return_std=True)
        elif name == "ridge":
            Z = X - self._x_mean_
            ZV = Z @ self._ridge_V_
            quad = (ZV**2 @ self._ridge_w_) + ((Z**2).sum(axis=1) - (ZV**2).sum(axis=1)) / self._ridge_alpha_
            std = np.sqrt(self.noise_var_ * (1.0 + 1.0 / len(self.placements_) + np.clip(quad, 0, None)))
        else:
            boot = self._boot_intercepts_[None, :] + X @ self._boot_coefs_.T
            std = np.sqrt(boot.var(axis=1, ddof=1) + self.noise_var_)
        return mean, np.asarray(std, dtype=float)

    def score(self, P: Any, y: Any) -> float:
        """Coefficient of determination R^2 of the predictions."""
        y = np.asarray(y, dtype=float).ravel()
        pred = self.predict(P)
        assert isinstance(pred, np.ndarray)
        if y.size != pred.size:
            raise ValueError(f"y has {y.size} values but P has {pred.size} placements")
        return float(r2_score(y, pred))

    def rank_scores(self, P: Any, y: Any) -> dict[str, float]:
        """Spearman and Kendall correlation of predictions vs. measurements: ranking is what search needs."""
        y = np.asarray(y, dtype=float).ravel()
        pred = self.predict(P)
        assert isinstance(pred, np.ndarray)
        if y.size != pred.size:
            raise ValueError(f"y has {y.size} values but P has {pred.size} placements")
        return {"spearman": spearman(pred, y), "kendall": kendall(pred, y)}

    def to_dp_terms(self) -> tuple[float, np.ndarray, np.ndarray]:
        """Chain-model terms for the DP: (const, h [L, M], J [r, L, M, M]).

        predict(p) == const + sum_l h[l, p_l] + sum_{d, l} J[d-1, l, p_l, p_{l+d}] (up to float rounding).
        """
        self._check_fitted()
        return self.intercept_, self.onebody_.copy(), self.pairs_.copy()

    def effect_table(
        self, mixer_names: Sequence[str] | None = None, include_pairs: bool = False, min_abs_pair: float = 0.0
    ) -> list[dict[str, Any]]:
        """Rows {layer, mixer, effect, std} per layer and non-reference mixer (the change from converting it).

        With ``include_pairs`` also rows {layer, mixer, partner_layer, partner_mixer, effect, std} for pair
        terms with |effect| > ``min_abs_pair``, listed after the one-body rows of their first layer.
        """
        self._check_fitted()
        names = list(mixer_names) if mixer_names is not None else [str(m) for m in range(self.n_mixers)]
        if len(names) != self.n_mixers:
            raise ValueError(f"{len(names)} mixer names given for n_mixers={self.n_mixers}")
        rows: list[dict[str, Any]] = []
        for layer in range(self.n_layers):
            for m in self._others:
                rows.append(
                    {
                        "layer": layer,
                        "mixer": names[m],
                        "effect": float(self.onebody_[layer, m]),
                        "std": float(self.onebody_std_[layer, m]),
                    }
                )
            if not include_pairs:
                continue
            for d in range(1, self.r + 1):
                if layer + d >= self.n_layers:
                    continue
                for m1 in self._others:
                    for m2 in self._others:
                        e = float(self.pairs_[d - 1, layer, m1, m2])
                        if abs(e) > min_abs_pair:
                            rows.append(
                                {
                                    "layer": layer,
                                    "mixer": names[m1],
                                    "partner_layer": layer + d,
                                    "partner_mixer": names[m2],
                                    "effect": e,
                                    "std": float(self.pairs_std_[d - 1, layer, m1, m2]),
                                }
                            )
        return rows

    def propose(
        self,
        candidates: Any | None = None,
        n: int = 8,
        *,
        frontier: Any | None = None,
        exclude: Any | None = None,
        n_pool: int = 4096,
        random_state: int | np.random.Generator | None = None,
    ) -> np.ndarray:
        """Next placements to measure: the ``n`` most uncertain candidates, plus the predicted frontier.

        ``candidates`` is a pool [k, L]; when None, ``n_pool`` stratified placements are drawn. Duplicates
        and placements already measured (``exclude``, default: the training placements) are dropped. Returned
        rows: the top-``n`` by predictive std (largest first), followed by the ``frontier`` placements
        (arrays or ``Solution`` objects) that are neither measured nor already selected: uncertainty explores,
        the frontier checks the placements the search would actually ship.
        """
        self._check_fitted()
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        L, M = self.n_layers, self.n_mixers
        if candidates is None:
            seed = self.random_state if random_state is None else random_state
            pool = stratified_placements(n_pool, L, M, _rng(seed))
        else:
            pool = check_placements(candidates, L, M, "candidates")
        pool = np.unique(pool, axis=0)
        measured = self.placements_ if exclude is None else check_placements(exclude, L, M, "exclude")
        seen = {row.tobytes() for row in measured.astype(np.int64)}
        pool = pool[[row.tobytes() not in seen for row in pool]] if len(pool) else pool
        picked = np.zeros((0, L), dtype=np.int64)
        if len(pool) and n:
            _, std = self.predict(pool, return_std=True)
            order = np.argsort(-std, kind="stable")[:n]
            picked = pool[order]
        if frontier is not None:
            rows = [np.asarray(getattr(f, "placement", f)) for f in frontier]
            if rows:
                fr = check_placements(np.stack(rows), L, M, "frontier")
                seen |= {row.tobytes() for row in picked}
                extra = []
                for row in fr:
                    if row.tobytes() not in seen:
                        seen.add(row.tobytes())
                        extra.append(row)
                if extra:
                    picked = np.concatenate([picked, np.stack(extra)])
        return picked
