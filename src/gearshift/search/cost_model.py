"""Cost models for placements: what a placement costs at one operating point (batch, context).

The DP needs an additive per-layer cost [L, M]. Either we know it (``AdditiveCost``, e.g. from per-mixer
microbenchmarks) or we fit it from whole-model step times of a few placements (``RegressionCost``): a
non-negative linear model on mixer counts, because a layer's cost does not depend on its neighbours to first
order and negative costs would let the search "buy" speed by adding layers of a mixer.

Both save to JSON with mixer names and free-form operating point metadata (e.g. ``{"batch": 8,
"context": 32768}``) stored as given, because relative costs change a lot with context length.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

__all__ = ["AdditiveCost", "RegressionCost", "load_cost_model"]


def _placements(P: Any, n_mixers: int, n_layers: int | None = None) -> np.ndarray:
    arr = np.asarray(P)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"placements must be a non-empty [n_samples, n_layers] array, got shape {arr.shape}")
    if n_layers is not None and arr.shape[1] != n_layers:
        raise ValueError(f"placements have {arr.shape[1]} layers but the cost model has {n_layers}")
    if arr.dtype.kind not in "iu" and (arr.dtype.kind != "f" or not np.all(arr == np.round(arr))):
        raise ValueError(f"placements must hold integer mixer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n_mixers:
        raise ValueError(f"placement values must lie in 0..{n_mixers - 1}, got {arr.min()}..{arr.max()}")
    return arr


def _counts(P: np.ndarray, n_mixers: int) -> np.ndarray:
    return (P[:, :, None] == np.arange(n_mixers)[None, None, :]).sum(axis=1).astype(float)


def _names(mixer_names: Sequence[str] | None, n_mixers: int) -> list[str]:
    names = [str(m) for m in range(n_mixers)] if mixer_names is None else [str(x) for x in mixer_names]
    if len(names) != n_mixers:
        raise ValueError(f"{len(names)} mixer names given for {n_mixers} mixers")
    return names


class _CostModel:
    n_mixers: int
    mixer_names: list[str]
    reference: int
    metadata: dict[str, Any]

    def predict(self, P: Any) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def speedup(self, P: Any, reference_placement: Any) -> np.ndarray:
        """cost(reference_placement) / cost(P) per placement: > 1 means faster than the reference."""
        ref = self.predict(reference_placement)
        if ref.size != 1:
            raise ValueError("reference_placement must be a single placement")
        cost = self.predict(P)
        if (cost <= 0).any():
            raise ValueError("speedup is undefined for placements with non-positive predicted cost")
        return float(ref[0]) / cost

    def _header(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "mixer_names": self.mixer_names,
            "reference": self.reference,
            "metadata": self.metadata,
        }


class AdditiveCost(_CostModel):
    """Known additive cost: ``per_layer`` [L, M] or ``per_mixer`` [M] (the same for every layer)."""

    def __init__(
        self,
        costs: Any,
        *,
        mixer_names: Sequence[str] | None = None,
        reference: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        c = np.asarray(costs, dtype=float)
        if c.ndim not in (1, 2) or c.size == 0:
            raise ValueError(f"costs must be per_mixer [M] or per_layer [L, M], got shape {c.shape}")
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError("costs must be finite and non-negative")
        self.costs = c
        self.n_mixers = c.shape[-1]
        self.n_layers: int | None = c.shape[0] if c.ndim == 2 else None
        self.mixer_names = _names(mixer_names, self.n_mixers)
        if not 0 <= reference < self.n_mixers:
            raise ValueError(f"reference must be in 0..{self.n_mixers - 1}, got {reference}")
        self.reference = reference
        self.metadata = dict(metadata or {})

    def predict(self, P: Any) -> np.ndarray:
        """Total cost of each placement [n]."""
        P = _placements(P, self.n_mixers, self.n_layers)
        if self.costs.ndim == 1:
            return self.costs[P].sum(axis=1)
        return self.costs[np.arange(P.shape[1])[None, :], P].sum(axis=1)

    def as_dp_costs(self, n_layers: int | None = None) -> np.ndarray:
        """[L, M] costs for ``dp.pareto_frontier`` (``n_layers`` is needed only for per-mixer costs)."""
        if self.costs.ndim == 2:
            if n_layers is not None and n_layers != self.n_layers:
                raise ValueError(f"cost model has {self.n_layers} layers, asked for {n_layers}")
            return self.costs.copy()
        if n_layers is None or n_layers < 1:
            raise ValueError("per-mixer costs need n_layers >= 1 to build the [L, M] table")
        return np.tile(self.costs, (n_layers, 1))

    def to_json(self, path: str | Path) -> None:
        """Save with mixer names and metadata; ``from_json`` restores an equal model."""
        data = self._header() | {"costs": self.costs.tolist()}
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> AdditiveCost:
        data = json.loads(Path(path).read_text())
        if data.get("type") != cls.__name__:
            raise ValueError(f"{path} holds a {data.get('type')!r}, not an AdditiveCost")
        return cls(
            data["costs"],
            mixer_names=data["mixer_names"],
            reference=data["reference"],
            metadata=data["metadata"],
        )


class RegressionCost(_CostModel):
    """Non-negative linear fit of measured whole-model cost (step time, or 1 / throughput) on mixer counts.

    ``cost(p) = intercept + sum_m coef[m] * count_m(p)``, solved with ``scipy.optimize.nnls``. Caveat: when
    all measured placements have the same number of layers, counts sum to L and the intercept is confounded
    with a common per-layer cost. ``fit_intercept="auto"`` (default) then fits no intercept (the fixed
    overhead is spread over the layers, which compresses ``relative_costs`` toward 1); pass ``overhead`` (a
    measured fixed cost, e.g. embeddings + head) to remove it first, or measure models of several depths.
    ``True`` fits it anyway with a warning (predictions are fine, the split is arbitrary).
    """

    def __init__(
        self,
        n_mixers: int,
        *,
        mixer_names: Sequence[str] | None = None,
        reference: int = 0,
        fit_intercept: bool | str = "auto",
        overhead: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if int(n_mixers) != n_mixers or n_mixers < 1:
            raise ValueError(f"n_mixers must be a positive integer, got {n_mixers}")
        if fit_intercept not in (True, False, "auto"):
            raise ValueError(f"fit_intercept must be True, False or 'auto', got {fit_intercept!r}")
        if overhead is not None and (not np.isfinite(overhead) or overhead < 0):
            raise ValueError(f"overhead must be a non-negative number, got {overhead}")
        if not 0 <= reference < n_mixers:
            raise ValueError(f"reference must be in 0..{n_mixers - 1}, got {reference}")
        self.n_mixers = int(n_mixers)
        self.mixer_names = _names(mixer_names, self.n_mixers)
        self.reference = reference
        self.fit_intercept = fit_intercept
        self.overhead = overhead
        self.metadata = dict(metadata or {})

    def fit(self, P: Any, y: Any) -> RegressionCost:
        """Fit to placements P [n, L] and measured costs y [n].

        P may also be a list of 1-D placements of different depths (truncated models), which is what makes
        the intercept identifiable.
        """
        rows = P if isinstance(P, list | tuple) and P and np.ndim(P[0]) == 1 else None
        if rows is not None and len({len(r) for r in rows}) > 1:
            counts = np.concatenate([_counts(_placements(r, self.n_mixers), self.n_mixers) for r in rows])
        else:
            counts = _counts(_placements(P, self.n_mixers), self.n_mixers)
        y = np.asarray(y, dtype=float).ravel()
        if y.size != counts.shape[0]:
            raise ValueError(f"y has {y.size} values but P has {counts.shape[0]} placements")
        if not np.isfinite(y).all():
            raise ValueError("y must be finite")
        depths = counts.sum(axis=1)
        several_depths = np.unique(depths).size > 1
        use_intercept = self.overhead is None and (
            self.fit_intercept is True or (self.fit_intercept == "auto" and several_depths)
        )
        if use_intercept and not several_depths:
            warnings.warn(
                "all placements have the same depth: intercept and per-layer costs are confounded, so the "
                "fitted split (and relative_costs) is arbitrary; pass overhead= or fit_intercept='auto'",
                UserWarning,
                stacklevel=2,
            )
        target = y - (self.overhead or 0.0)
        A = np.concatenate([counts, np.ones((len(y), 1))], axis=1) if use_intercept else counts
        sol, _ = nnls(A, target)
        self.coef_ = sol[: self.n_mixers]
        self.intercept_ = float(sol[-1]) if use_intercept else float(self.overhead or 0.0)
        self.intercept_fitted_ = use_intercept
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("this RegressionCost is not fitted yet; call fit(P, y) first")

    def predict(self, P: Any) -> np.ndarray:
        """Predicted whole-model cost [n] (in the unit of the fitted y)."""
        self._check_fitted()
        return self.intercept_ + _counts(_placements(P, self.n_mixers), self.n_mixers) @ self.coef_

    def score(self, P: Any, y: Any) -> float:
        """R^2 of the predictions."""
        y = np.asarray(y, dtype=float).ravel()
        pred = self.predict(P)
        if y.size != pred.size:
            raise ValueError(f"y has {y.size} values but P has {pred.size} placements")
        ss_tot = float(((y - y.mean()) ** 2).sum())
        ss_res = float(((y - pred) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)

    def relative_costs(self) -> np.ndarray:
        """Per-layer cost of each mixer divided by the reference mixer's (reference = 1.0)."""
        self._check_fitted()
        ref = self.coef_[self.reference]
        if ref <= 0:
            raise ValueError("the reference mixer's fitted cost is 0, so relative costs are undefined")
        return self.coef_ / ref

    def as_dp_costs(self, n_layers: int, relative: bool = False) -> np.ndarray:
        """[L, M] per-layer costs for the DP (the intercept is a constant: it does not move the frontier)."""
        self._check_fitted()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        per = self.relative_costs() if relative else self.coef_
        return np.tile(per, (n_layers, 1))

    def to_json(self, path: str | Path) -> None:
        """Save the fitted coefficients, names and metadata."""
        self._check_fitted()
        data = self._header() | {
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
            "intercept_fitted": self.intercept_fitted_,
            "fit_intercept": self.fit_intercept,
            "overhead": self.overhead,
        }
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> RegressionCost:
        data = json.loads(Path(path).read_text())
        if data.get("type") != cls.__name__:
            raise ValueError(f"{path} holds a {data.get('type')!r}, not a RegressionCost")
        model = cls(
            len(data["coef"]),
            mixer_names=data["mixer_names"],
            reference=data["reference"],
            fit_intercept=data["fit_intercept"],
            overhead=data["overhead"],
            metadata=data["metadata"],
        )
        model.coef_ = np.asarray(data["coef"], dtype=float)
        model.intercept_ = float(data["intercept"])
        model.intercept_fitted_ = bool(data["intercept_fitted"])
        return model


def load_cost_model(path: str | Path) -> AdditiveCost | RegressionCost:
    """Load whichever cost model a JSON file holds."""
    kind = json.loads(Path(path).read_text()).get("type")
    if kind == "AdditiveCost":
        return AdditiveCost.from_json(path)
    if kind == "RegressionCost":
        return RegressionCost.from_json(path)
    raise ValueError(f"{path} does not hold a gearshift cost model (type {kind!r})")
