"""What placements cost on a device: per-layer mixer times, whole-model step times, or modelled bytes per step.

The DP needs an additive cost [L, M] plus a constant (embeddings, head, launch overhead: it does not move the
frontier but it does set speed-ups). Three ways to get it:

- ``timed_costs``: on this device, a 1-layer and a k-layer model of each distinct layer shape of the checkpoint
  (random weights: speed does not depend on the values), decoding one token at a time from a synthetic cache of
  ``context`` tokens at ``batch`` sequences; CUDA graphs on GPU as in ``benchmarks/throughput.py``, plain
  timing on CPU. Per-layer time = (t_k - t_1) / (k - 1), overhead = t_1 - per-layer time. Prefill time per
  layer is measured the same way and stored beside it.
- ``modelled_costs``: the same 1- vs 2-layer difference of ``report.placement_report``'s bytes per step,
  divided by the bandwidth (the memory-bound roofline), for when no device timing is wanted.
- ``whole_model_times`` + ``fit_regression``: step times of whole placements of the real model shape, and a
  ``RegressionCost`` fitted to them, scored on held-out placements (the paper's "Regression" cost model).

Costs are in milliseconds per decode step; files are ``cost_model`` JSON with the operating point in metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LayerConfig, SupernetConfig
from ..roofline import H200_BANDWIDTH, placement_report
from ..timing import device_name, median_seconds
from .cost_model import AdditiveCost, RegressionCost, load_cost_model
from .dp import placement_cost
from .space import PlaceError, PlacementSpace

__all__ = [
    "CostTerms",
    "device_name",
    "fit_regression",
    "median_seconds",
    "modelled_costs",
    "state_bytes_table",
    "timed_costs",
    "whole_model_times",
]


# ---------------------------------------------------------------------------------------------- layer shapes


def _shapes(config: SupernetConfig) -> tuple[list[LayerConfig], list[int]]:
    """Distinct layer configurations and, per layer, the index of its shape (timed once, used for all)."""
    shapes: list[LayerConfig] = []
    index = []
    for layer in config.layers:
        if layer not in shapes:
            shapes.append(layer)
        index.append(shapes.index(layer))
    return shapes, index


def _sub_config(config: SupernetConfig, layer: LayerConfig, n_layers: int, limit: int) -> SupernetConfig:
    return config.replace(layers=(layer,) * n_layers, max_position_embeddings=max(limit, 1))


def _letter_mixer(layer: LayerConfig, letter: str, space: PlacementSpace) -> str | None:
    names = layer.names_of_kind(space.kinds[space.letters.index(letter)])
    return names[0] if names else None


def state_bytes_table(config: SupernetConfig, space: PlacementSpace, context: int, dtype_bytes: int = 2) -> np.ndarray:
    """Decoding state per sequence [L, M] in bytes at ``context`` tokens (0 where a layer lacks the mixer)."""
    shapes, index = _shapes(config)
    per_shape = np.zeros((len(shapes), space.n_mixers))
    for s, layer in enumerate(shapes):
        sub = _sub_config(config, layer, 1, config.max_position_embeddings)
        for m, letter in enumerate(space.letters):
            if _letter_mixer(layer, letter, space) is not None:
                r = placement_report(sub, letter, context=context, batch=1, dtype_bytes=dtype_bytes)
                per_shape[s, m] = r.state_bytes_per_seq
    return per_shape[index]


def _assemble(per_shape: np.ndarray, index: list[int], space: PlacementSpace) -> np.ndarray:
    """[shapes, M] -> [L, M], zero where a layer does not hold the mixer (the DP's allowed mask excludes it)."""
    out = per_shape[index].copy()
    out[~space.allowed] = 0.0
    return out


def _check_point(config: SupernetConfig, batch: int, context: int) -> None:
    if batch < 1 or context < 1:
        raise PlaceError(f"batch and context must be >= 1, got batch={batch}, context={context}")
    if context > config.max_position_embeddings:
        raise PlaceError(f"context {context} exceeds the model's context ({config.max_position_embeddings} tokens)")


# ---------------------------------------------------------------------------------------------- modelled


def modelled_costs(
    config: SupernetConfig,
    *,
    batch: int,
    context: int,
    dtype_bytes: int = 2,
    bandwidth: float = H200_BANDWIDTH,
) -> AdditiveCost:
    """Roofline decode cost (ms per step = bytes moved / bandwidth) per layer and mixer, from report.py."""
    _check_point(config, batch, context)
    space = PlacementSpace.from_config(config)
    shapes, index = _shapes(config)
    per_shape = np.zeros((len(shapes), space.n_mixers))
    overheads = []
    for s, layer in enumerate(shapes):
        subs = [_sub_config(config, layer, n, config.max_position_embeddings) for n in (1, 2)]
        for m, letter in enumerate(space.letters):
            if _letter_mixer(layer, letter, space) is None:
                continue
            b1, b2 = (
                placement_report(sub, letter * n, context=context, batch=batch, dtype_bytes=dtype_bytes).bytes_per_step
                for n, sub in zip((1, 2), subs, strict=True)
            )
            per_shape[s, m] = (b2 - b1) / bandwidth * 1e3
            overheads.append((2 * b1 - b2) / bandwidth * 1e3)
    meta = {
        "unit": "ms",
        "what": "decode step",
        "source": "modelled",
        "device": f"roofline at {bandwidth / 1e12:.2f} TB/s",
        "bandwidth": bandwidth,
        "batch": batch,
        "context": context,
        "dtype": f"{8 * dtype_bytes}-bit",
        "overhead": float(np.median(overheads)),
        "state_bytes_per_seq": state_bytes_table(config, space, context, dtype_bytes).tolist(),
        "space": space.to_json(),
    }
    return AdditiveCost(
        _assemble(per_shape, index, space), mixer_names=space.kinds, reference=space.reference, metadata=meta
    )


# ---------------------------------------------------------------------------------------------- timed


def _decode_seconds(
    model: Any, placement: str, batch: int, context: int, steps: int, warmup: int, graphs: bool
) -> float:
    from ..cache import synthetic_cache

    device = model.device
    extra = steps + warmup + 8
    cache = synthetic_cache(model, placement, batch, context, extra=extra)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    if graphs:
        from ..cuda_graphs import GraphDecoder

        runner = GraphDecoder(model, cache, capacity=context + extra, keep_state=False)
        return median_seconds(lambda: runner.step(tokens), device, steps, warmup)

    def step() -> None:
        with torch.inference_mode():
            model(tokens[:, None], cache=cache)

    return median_seconds(step, device, steps, warmup)


def _prefill_seconds(model: Any, placement: str, tokens: int, iters: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)

    def run() -> None:
        with torch.inference_mode():
            model(ids, cache=model.new_cache(1, placement), last_only=True)

    return median_seconds(run, model.device, iters, 1)


def _random_model(config: SupernetConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from ..model import Supernet

    # timed in the serving engine's weight layout (one matmul per set of projections that share an input)
    return Supernet.random(config, device=device, dtype=dtype).eval().fuse_projections_()


def timed_costs(
    config: SupernetConfig,
    *,
    batch: int,
    context: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 20,
    warmup: int = 3,
    layers: int = 3,
    prefill_tokens: int | None = None,
    graphs: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> AdditiveCost:
    """Per-layer decode time (ms per step) of each mixer on ``device``; prefill time and state bytes beside it.

    ``layers`` is k of the 1- vs k-layer difference (more layers: more signal over timing noise).
    ``graphs`` defaults to CUDA graphs on a CUDA device.
    """
    _check_point(config, batch, context)
    if layers < 2 or steps < 1 or warmup < 0:
        raise PlaceError(f"need layers >= 2, steps >= 1, warmup >= 0; got {layers}, {steps}, {warmup}")
    device = torch.device(device)
    graphs = device.type == "cuda" if graphs is None else graphs
    prefill_tokens = min(context, 8192) if prefill_tokens is None else prefill_tokens
    space = PlacementSpace.from_config(config)
    shapes, index = _shapes(config)
    decode = np.zeros((len(shapes), space.n_mixers))
    prefill = np.zeros_like(decode)
    overheads: list[float] = []
    clamped: list[str] = []
    limit = max(config.max_position_embeddings, context + steps + warmup + 16, prefill_tokens)
    for s, layer in enumerate(shapes):
        models = {n: _random_model(_sub_config(config, layer, n, limit), device, dtype) for n in (1, layers)}
        for m, letter in enumerate(space.letters):
            if _letter_mixer(layer, letter, space) is None:
                continue
            try:
                t = {
                    n: _decode_seconds(mod, letter * n, batch, context, steps, warmup, graphs)
                    for n, mod in models.items()
                }
                p = {
                    n: _prefill_seconds(mod, letter * n, prefill_tokens, max(2, steps // 5))
                    for n, mod in models.items()
                }
            except torch.OutOfMemoryError:
                raise PlaceError(
                    f"out of device memory timing {space.kinds[m]} at batch {batch}, context {context}: lower them"
                ) from None
            per = (t[layers] - t[1]) / (layers - 1)
            if per <= 0:
                clamped.append(f"{letter}@shape{s}")
            decode[s, m] = max(per, 0.0) * 1e3
            prefill[s, m] = max((p[layers] - p[1]) / (layers - 1), 0.0) * 1e3
            overheads.append((t[1] - per) * 1e3)
            if log:
                log(
                    f"layer shape {s} {space.kinds[m]:>14}: decode {decode[s, m]:.4f} ms/layer "
                    f"(1 layer {t[1] * 1e3:.3f} ms, {layers} layers {t[layers] * 1e3:.3f} ms), "
                    f"prefill {prefill[s, m]:.3f} ms/layer for {prefill_tokens} tokens"
                )
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elem = torch.empty((), dtype=dtype).element_size()
    meta = {
        "unit": "ms",
        "what": "decode step",
        "source": "timed",
        "device": device_name(device),
        "batch": batch,
        "context": context,
        "dtype": str(dtype).removeprefix("torch."),
        "cuda_graphs": graphs,
        "steps": steps,
        "warmup": warmup,
        "layers_timed": layers,
        "overhead": max(float(np.median(overheads)), 0.0),
        "prefill_ms": _assemble(prefill, index, space).tolist(),
        "prefill_tokens": prefill_tokens,
        "state_bytes_per_seq": state_bytes_table(config, space, context, elem).tolist(),
        "clamped_to_zero": clamped,
        "space": space.to_json(),
    }
    return AdditiveCost(
        _assemble(decode, index, space), mixer_names=space.kinds, reference=space.reference, metadata=meta
    )


def whole_model_times(
    config: SupernetConfig,
    placements: Sequence[str],
    *,
    batch: int,
    context: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 20,
    warmup: int = 3,
    graphs: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Decode step time (ms) of whole placements of the full model shape; placements that run out of device
    memory are skipped (returned lists hold only the measured ones)."""
    _check_point(config, batch, context)
    device = torch.device(device)
    graphs = device.type == "cuda" if graphs is None else graphs
    limit = max(config.max_position_embeddings, context + steps + warmup + 16)
    model = _random_model(config.replace(max_position_embeddings=limit), device, dtype)
    done, times = [], []
    for k, p in enumerate(placements, start=1):
        try:
            ms = _decode_seconds(model, p, batch, context, steps, warmup, graphs) * 1e3
        except torch.OutOfMemoryError:
            if log:
                log(f"[{k}/{len(placements)}] {p}: out of device memory, skipped")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done.append(p)
        times.append(ms)
        if log:
            log(f"[{k}/{len(placements)}] {p}: {ms:.4f} ms/step")
    return done, np.asarray(times, dtype=float)


def fit_regression(
    space: PlacementSpace,
    placements: Sequence[str],
    times_ms: Sequence[float] | np.ndarray,
    *,
    overhead: float | None = None,
    additive: AdditiveCost | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> tuple[RegressionCost, dict[str, Any]]:
    """Fit ``RegressionCost`` to whole-model step times; report its error on held-out placements (and the
    additive model's error on all of them when given). The returned model is refitted on every placement."""
    P = space.encode(placements)
    y = np.asarray(times_ms, dtype=float)
    if len(P) != y.size or y.size < 2:
        raise PlaceError(f"need >= 2 measured placements with one time each, got {len(P)} and {y.size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(P))
    n_test = max(1, round(test_fraction * len(P))) if len(P) >= 4 else 0
    test, train = order[:n_test], order[n_test:]

    def make() -> RegressionCost:
        return RegressionCost(
            space.n_mixers, mixer_names=space.kinds, reference=space.reference, overhead=overhead, metadata=metadata
        )

    report: dict[str, Any] = {"n": int(len(P)), "n_train": int(len(train)), "n_test": int(n_test)}
    if n_test:
        held = make().fit(P[train], y[train])
        pred = held.predict(P[test])
        # R^2 of a handful of similar times is noise-dominated: report it from 5 held-out placements on
        report["heldout_r2"] = _finite(held.score(P[test], y[test])) if n_test >= 5 else None
        report["heldout_mean_abs_rel_error"] = float(np.mean(np.abs(pred - y[test]) / y[test]))
        report["heldout"] = [
            {"placement": space.decode(P[i])[0], "measured_ms": float(y[i]), "predicted_ms": float(q)}
            for i, q in zip(test, pred, strict=True)
        ]
    if additive is not None:
        terms = CostTerms.from_model(additive, space)
        pred = terms.total(P)
        report["additive_mean_abs_rel_error"] = float(np.mean(np.abs(pred - y) / y))
    model = make().fit(P, y)
    model.metadata["validation"] = report
    return model, report


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------- for the DP


@dataclass
class CostTerms:
    """A cost model as the DP sees it: per-layer costs [L, M] + a constant overhead, and its operating point."""

    per_layer: np.ndarray
    overhead: float
    metadata: dict[str, Any]

    @classmethod
    def from_model(cls, model: AdditiveCost | RegressionCost, space: PlacementSpace) -> CostTerms:
        meta = dict(model.metadata)
        if "space" in meta:
            space.require_same(PlacementSpace.from_json(meta["space"]), "cost model")
        elif list(model.mixer_names) != space.kinds:
            raise PlaceError(f"cost model mixers {model.mixer_names} differ from this model's {space.kinds}")
        if isinstance(model, RegressionCost):
            return cls(model.as_dp_costs(space.n_layers), float(model.intercept_), meta)
        return cls(model.as_dp_costs(space.n_layers), float(meta.get("overhead", 0.0)), meta)

    @classmethod
    def load(cls, path: str | Path, space: PlacementSpace) -> CostTerms:
        path = Path(path)
        if not path.is_file():
            raise PlaceError(f"{path}: no such cost file")
        try:
            model = load_cost_model(path)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PlaceError(f"{path}: malformed cost file ({exc!r})") from None
        try:
            return cls.from_model(model, space)
        except PlaceError as exc:
            raise PlaceError(f"{path}: {exc}") from None

    def total(self, P: np.ndarray) -> np.ndarray:
        """Whole-model cost of placements [n, L] (overhead included)."""
        return self.overhead + np.asarray(placement_cost(np.atleast_2d(P), self.per_layer), dtype=float)

    def speedup(self, P: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """total(reference) / total(P): > 1 is faster than the reference placement."""
        return self.total(reference)[0] / self.total(P)
