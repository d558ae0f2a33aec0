"""Fit the cluster-expansion surrogate to a measurement table and keep it as a reusable JSON file.

The surrogate is fitted to *quality*, which is higher-is-better: the metric itself (``loglik``,
``agreement``, extra metrics by default) or its negation (``kl``, or any metric fitted with ``minimize``). The
JSON file holds the chain-model coefficients the DP optimises (so ``optimize`` needs neither the table nor a
refit), their stds, cross-validated errors, and the training data: proposals need the estimator's predictive
std, which is restored by refitting the stored data with the stored estimator and seed (deterministic).

Cross-validation: K-fold out-of-fold predictions of the chosen estimator (scikit-learn's ``cross_val_predict``
over clones of the fitted ``ClusterExpansion``), so every measured placement is predicted by a model that did not
see it; RMSE (metric units), Spearman and Kendall are computed on those. They are K-fold CV figures on the measured
placements, not a test on placements held out of the whole search.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold, cross_val_predict

from ..data.tokens import atomic_write_json
from .dp import evaluate
from .metrics import kendall, spearman
from .sampling import stratified
from .space import PlaceError, PlacementSpace
from .surrogate import ClusterExpansion
from .table import MeasurementTable

__all__ = ["METRIC_SIGNS", "SurrogateFit", "fit_table", "quality_sign", "write_effects"]

FORMAT = "gearshift-surrogate/1"
# Orientation of the built-in metrics: +1 higher is better, -1 lower is better.
METRIC_SIGNS = {"loglik": 1, "agreement": 1, "kl": -1}


def quality_sign(metric: str, minimize: bool | None = None) -> int:
    """+1 when higher values of ``metric`` are better, -1 otherwise (``minimize`` overrides the default)."""
    if minimize is not None:
        return -1 if minimize else 1
    return METRIC_SIGNS.get(metric, 1)


@dataclass
class SurrogateFit:
    """A fitted surrogate over letter placements; predictions are in the metric's own units."""

    space: PlacementSpace
    metric: str
    sign: int
    r: int
    estimator: str
    placements: list[str]
    values: np.ndarray
    const: float
    onebody: np.ndarray  # [L, M] quality units
    pairs: np.ndarray  # [r, L, M, M] quality units
    onebody_std: np.ndarray
    pairs_std: np.ndarray
    cv: dict[str, Any] = field(default_factory=dict)
    cv_results: dict[str, float] = field(default_factory=dict)
    random_state: int = 0
    cv_folds: int = 5
    _model: ClusterExpansion | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        placements: Sequence[str],
        values: Sequence[float] | np.ndarray,
        space: PlacementSpace,
        *,
        metric: str = "loglik",
        r: int = 1,
        estimator: str = "auto",
        cv: int = 5,
        minimize: bool | None = None,
        random_state: int = 0,
    ) -> SurrogateFit:
        """Fit to measured letter placements and their metric values; also cross-validates."""
        P = space.encode(placements)
        y = np.asarray(values, dtype=float).ravel()
        if y.size != len(P):
            raise PlaceError(f"{y.size} values for {len(P)} placements")
        if len(P) < 3:
            raise PlaceError(f"need at least 3 measured placements to fit a surrogate, got {len(P)}")
        if not np.isfinite(y).all():
            raise PlaceError(f"metric {metric!r} has non-finite values in the table")
        sign = quality_sign(metric, minimize)
        q = sign * y
        ce = ClusterExpansion(
            space.n_layers,
            space.n_mixers,
            r=r,
            reference=space.reference,
            estimator=estimator,
            cv=cv,
            random_state=random_state,
        ).fit(P, q)
        const, h, J = ce.to_dp_terms()
        fit = cls(
            space=space,
            metric=metric,
            sign=sign,
            r=r,
            estimator=ce.estimator_name_,
            placements=space.decode(P),
            values=y,
            const=const,
            onebody=h,
            pairs=J,
            onebody_std=ce.onebody_std_.copy(),
            pairs_std=ce.pairs_std_.copy(),
            cv_results=dict(ce.cv_results_),
            random_state=random_state,
            cv_folds=cv,
            _model=ce,
        )
        fit.cv = fit._cross_validate(ce, P, q)
        return fit

    def _new_model(self) -> ClusterExpansion:
        """An unfitted ``ClusterExpansion`` with the stored parameters (a loaded fit holds no estimator to clone)."""
        return ClusterExpansion(
            self.space.n_layers,
            self.space.n_mixers,
            r=self.r,
            reference=self.space.reference,
            estimator=self.estimator,
            cv=self.cv_folds,
            random_state=self.random_state,
        )

    def _cross_validate(self, estimator: ClusterExpansion, P: np.ndarray, q: np.ndarray) -> dict[str, Any]:
        """K-fold CV of ``estimator``'s parameters (it is cloned per fold, never refitted itself)."""
        n = len(q)
        folds = min(self.cv_folds, n)
        if n < 4 or n - math.ceil(n / folds) < 3:
            return {"folds": 0, "n": n, "rmse": None, "spearman": None, "kendall": None, "note": "too few placements"}
        oof = cross_val_predict(estimator, P, q, cv=KFold(folds, shuffle=True, random_state=self.random_state))
        y, pred = self.sign * q, self.sign * oof
        return {
            "folds": folds,
            "n": n,
            "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
            "spearman": _finite_or_none(spearman(pred, y)),
            "kendall": _finite_or_none(kendall(pred, y)),
        }

    @property
    def model(self) -> ClusterExpansion:
        """The fitted ``ClusterExpansion`` (refitted from the stored data after ``load``)."""
        if self._model is None:
            ce = self._new_model()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ce.fit(self.space.encode(self.placements), self.sign * self.values)
            if not np.allclose(ce.onebody_, self.onebody, rtol=1e-5, atol=1e-8):
                warnings.warn(
                    "refitting the stored data gave different coefficients (another scikit-learn version?); "
                    "proposals use the refit, the DP the stored coefficients",
                    UserWarning,
                    stacklevel=2,
                )
            self._model = ce
        return self._model

    # ------------------------------------------------------------------ prediction
    def dp_terms(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(const, h, J) in quality units for ``dp.pareto_frontier``."""
        return self.const, self.onebody.copy(), self.pairs.copy()

    def predict(self, placements: Sequence[str]) -> np.ndarray:
        """Predicted metric values (in the metric's units) of letter placements."""
        q = evaluate(self.space.encode(placements), self.const, self.onebody, self.pairs)
        return self.sign * np.asarray(q, dtype=float)

    def beyond_measured(self, predicted: Sequence[float] | np.ndarray) -> np.ndarray:
        """True where a predicted value is better than every measured one by more than the CV error.

        The DP maximises the surrogate, so it seeks out the placements the surrogate over-rates most: a prediction
        outside the measured range is an extrapolation (on a supernet whose linear mixers are barely trained the
        loss saturates and additive effects over-rate mixes of them), to be measured before it is trusted.
        """
        q = self.sign * np.asarray(predicted, dtype=float)
        rmse = (self.cv or {}).get("rmse") or 0.0
        return q > float(np.max(self.sign * self.values)) + rmse

    def propose(
        self,
        n: int,
        *,
        frontier: Sequence[Any] | None = None,
        exclude: Sequence[str] | None = None,
        seed: int = 0,
    ) -> list[str]:
        """The ``n`` most uncertain unmeasured placements (pool restricted to the layers' mixers), then the
        given ``frontier`` placements not measured yet."""
        measured = list(self.placements) + list(exclude or [])
        pool = self.space.encode(stratified(self.space, max(4096, 16 * n), seed))  # at most the space
        rows = None
        if frontier:
            rows = [f if isinstance(f, str) else self.space.decode(f.placement)[0] for f in frontier]
            rows = self.space.encode(rows)
        picked = self.model.propose(pool, n, frontier=rows, exclude=self.space.encode(measured))
        return self.space.decode(picked) if len(picked) else []

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "metric": self.metric,
            "sign": self.sign,
            "r": self.r,
            "estimator": self.estimator,
            "random_state": self.random_state,
            "cv_folds": self.cv_folds,
            "space": self.space.to_json(),
            "cv": self.cv,
            "cv_results": {k: (v if math.isfinite(v) else None) for k, v in self.cv_results.items()},
            "const": self.const,
            "onebody": self.onebody.tolist(),
            "pairs": self.pairs.tolist(),
            "onebody_std": self.onebody_std.tolist(),
            "pairs_std": self.pairs_std.tolist(),
            "placements": self.placements,
            "values": self.values.tolist(),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SurrogateFit:
        path = Path(path)
        if not path.is_file():
            raise PlaceError(f"{path}: no such surrogate fit file")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise PlaceError(f"{path}: not a gearshift surrogate fit (format {d.get('format')!r})")
            space = PlacementSpace.from_json(d["space"])
            fit = cls(
                space=space,
                metric=str(d["metric"]),
                sign=int(d["sign"]),
                r=int(d["r"]),
                estimator=str(d["estimator"]),
                placements=[str(p) for p in d["placements"]],
                values=np.asarray(d["values"], dtype=float),
                const=float(d["const"]),
                onebody=np.asarray(d["onebody"], dtype=float),
                pairs=np.asarray(d["pairs"], dtype=float),
                onebody_std=np.asarray(d["onebody_std"], dtype=float),
                pairs_std=np.asarray(d["pairs_std"], dtype=float),
                cv=dict(d.get("cv", {})),
                cv_results={k: (float("inf") if v is None else float(v)) for k, v in d.get("cv_results", {}).items()},
                random_state=int(d.get("random_state", 0)),
                cv_folds=int(d.get("cv_folds", 5)),
            )
        except json.JSONDecodeError as exc:
            raise PlaceError(f"{path}: not valid JSON ({exc})") from None
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlaceError):
                raise
            raise PlaceError(f"{path}: malformed surrogate fit ({exc!r})") from None
        if fit.onebody.shape != (space.n_layers, space.n_mixers):
            raise PlaceError(f"{path}: onebody has shape {fit.onebody.shape}, the space implies {space.n_layers}")
        return fit

    def summary(self) -> str:
        cv = self.cv
        if cv.get("rmse") is None:
            scores = "cross-validation skipped (too few placements)"
        else:
            scores = (
                f"{cv['folds']}-fold CV RMSE {cv['rmse']:.4g}, {cv['folds']}-fold CV Spearman "
                f"{_fmt(cv['spearman'])}, Kendall {_fmt(cv['kendall'])}"
            )
        return f"{self.metric}: {len(self.placements)} placements, r={self.r}, estimator {self.estimator}; {scores}"


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fit_table(
    table: MeasurementTable | str | Path,
    *,
    metric: str = "loglik",
    space: PlacementSpace | None = None,
    **kwargs: Any,
) -> SurrogateFit:
    """Fit a surrogate to one metric of a measurement table (``kwargs`` as for ``SurrogateFit.fit``)."""
    if not isinstance(table, MeasurementTable):
        table = MeasurementTable.read(table)
    own = table.space
    if space is None:
        if own is None:
            raise PlaceError(f"{table.path}: the table has no header naming its model's mixers; pass the model")
        space = own
    names, values = table.values(metric)
    table.check_space(space, names)
    return SurrogateFit.fit(names, values, space, metric=metric, **kwargs)


def write_effects(fit: SurrogateFit, markdown: str | Path | None = None, heatmap: str | Path | None = None) -> None:
    """Per-layer effect table (Markdown) and heatmap (PNG): which layers tolerate which mixer."""
    space = fit.space
    ref = space.letters[space.reference]
    quality = fit.metric if fit.sign > 0 else f"-{fit.metric}"
    if markdown is not None:
        others = [m for m in range(space.n_mixers) if m != space.reference]
        lines = [
            f"# Per-layer effects on {fit.metric}",
            "",
            f"Predicted change of quality (= {quality}, higher is better) when one layer is converted from "
            f"{space.kinds[space.reference]} ({ref}) to another mixer, every other layer staying {ref}; "
            "`±` is one standard deviation of the coefficient.",
            "",
            fit.summary() + ".",
            "",
            "| layer | " + " | ".join(f"{space.kinds[m]} ({space.letters[m]})" for m in others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for layer in range(space.n_layers):
            cells = []
            for m in others:
                if space.letters[m] not in space.layers[layer]:
                    cells.append("—")
                else:
                    cells.append(f"{fit.onebody[layer, m]:+.4g} ± {fit.onebody_std[layer, m]:.2g}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        pairs = _top_pairs(fit, 10)
        if pairs:
            lines += ["", "Largest pair terms (extra change when both layers are converted):", ""]
            lines += ["| layers | mixers | effect |", "|---|---|---|"]
            lines += [f"| {a}, {b} | {x}{y} | {e:+.4g} ± {s:.2g} |" for a, b, x, y, e, s in pairs]
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    if heatmap is not None:
        from .plots import plot_effect_heatmap

        plot_effect_heatmap(
            heatmap,
            fit.onebody,
            space.kinds,
            reference=space.reference,
            std=fit.onebody_std,
            title=f"effect on {quality} of converting a layer from {space.kinds[space.reference]}",
        )


def _top_pairs(fit: SurrogateFit, k: int) -> list[tuple[int, int, str, str, float, float]]:
    r, L, M, _ = fit.pairs.shape
    rows = []
    for d in range(r):
        for layer in range(L - d - 1):
            for a in range(M):
                for b in range(M):
                    e = float(fit.pairs[d, layer, a, b])
                    if e != 0.0:
                        rows.append(
                            (
                                layer,
                                layer + d + 1,
                                fit.space.letters[a],
                                fit.space.letters[b],
                                e,
                                fit.pairs_std[d, layer, a, b],
                            )
                        )
    rows.sort(key=lambda t: -abs(t[4]))
    return rows[:k]
