"""From a fitted surrogate and a cost model to the exact predicted frontier and a few presets spread along it.

Constraints come in the user's terms (layer numbers, mixer letters or kind names, a state-memory budget in GB)
and are translated here to the index form of ``dp.pareto_frontier``. Presets are the best predicted placement
at N costs evenly spaced between the frontier's ends, or at given speed-ups over the all-attention placement;
with ``diverse`` a preset must differ from every earlier one in at least that many layers, and ``k_best``
runner-ups stand in when the frontier point itself is too close to one already chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cost_sources import CostTerms
from .dp import Solution, diverse, pareto_frontier
from .fit import SurrogateFit
from .space import PlaceError, PlacementSpace

__all__ = ["SOURCE", "Constraints", "OptimizeResult", "Preset", "choose_presets", "optimize", "parse_constraints"]

SOURCE = "gearshift place optimize"  # the 'source' of presets this module writes (a re-run replaces them)


@dataclass
class Constraints:
    """DP constraints in index form (see ``dp.pareto_frontier``)."""

    fixed: dict[int, int] = field(default_factory=dict)
    allowed: np.ndarray | None = None
    min_count: dict[int, int] = field(default_factory=dict)
    max_count: dict[int, int] = field(default_factory=dict)
    memory_budget_gb: float | None = None


def _layers(text: str, n_layers: int) -> list[int]:
    """'3', '0-5', '0-3,7' -> layer indices (validated)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise PlaceError(f"bad layer range {text!r}: use e.g. 3, 0-5 or 0-3,7") from None
        if not 0 <= a <= b < n_layers:
            raise PlaceError(f"layer range {part!r} is outside 0..{n_layers - 1}")
        out.extend(range(a, b + 1))
    return out


def _counts(items: Sequence[str], space: PlacementSpace, what: str) -> dict[int, int]:
    out = {}
    for item in items:
        mixer, eq, n = item.partition("=")
        if not eq or not n.strip().isdigit():
            raise PlaceError(f"{what} {item!r}: expected MIXER=N, e.g. gdn=2 or G=2")
        out[space.index_of(mixer.strip())] = int(n)
    return out


def parse_constraints(
    space: PlacementSpace,
    *,
    fixed: Sequence[str] = (),
    allowed: Sequence[str] = (),
    min_count: Sequence[str] = (),
    max_count: Sequence[str] = (),
    memory_budget_gb: float | None = None,
) -> Constraints:
    """Constraints from the command line's forms.

    ``fixed``: ``LAYER:MIXER`` (``0:F``, ``47:attention``). ``allowed``: ``[LAYERS:]LETTERS`` restricts those
    layers (all, without ``LAYERS:``) to the given mixers (``FS``, ``0-3,7:FG``). Counts: ``MIXER=N``.
    Layers keep only the mixers they hold whatever ``allowed`` says.
    """
    mask = space.allowed
    for item in allowed:
        where, _, letters = item.rpartition(":")
        layers = _layers(where, space.n_layers) if where else list(range(space.n_layers))
        keep = np.zeros(space.n_mixers, dtype=bool)
        for ch in letters.strip():
            keep[space.index_of(ch)] = True
        if not keep.any():
            raise PlaceError(f"allowed {item!r} names no mixer")
        mask[layers] &= keep
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise PlaceError(f"no mixer is left allowed at layer(s) {empty.tolist()} after --allowed")
    pins = {}
    for item in fixed:
        layer, colon, mixer = item.partition(":")
        if not colon or not layer.strip().lstrip("-").isdigit():
            raise PlaceError(f"fixed {item!r}: expected LAYER:MIXER, e.g. 0:F")
        idx = int(layer)
        if not 0 <= idx < space.n_layers:
            raise PlaceError(f"fixed {item!r}: layer {idx} is outside 0..{space.n_layers - 1}")
        m = space.index_of(mixer.strip())
        if not mask[idx, m]:
            raise PlaceError(f"fixed {item!r}: layer {idx} does not hold or may not use {space.kinds[m]}")
        pins[idx] = m
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise PlaceError(f"memory budget must be a positive number of GB, got {memory_budget_gb}")
    return Constraints(
        fixed=pins,
        allowed=mask,
        min_count=_counts(min_count, space, "min-count"),
        max_count=_counts(max_count, space, "max-count"),
        memory_budget_gb=memory_budget_gb,
    )


@dataclass
class Preset:
    """One chosen placement with its predictions (metric units), whole-model cost and speed-up."""

    name: str
    placement: str
    predicted: float
    cost: float
    speedup: float | None
    memory_gb: float | None = None
    measured: float | None = None
    regret: float | None = None
    extrapolated: bool = False  # predicted better than anything measured (SurrogateFit.beyond_measured)
    target: str | None = None  # the target it was chosen for ("2x" for a speed-up target, "cost<=..." otherwise)

    def meta(self, fit: SurrogateFit, costs: CostTerms) -> dict[str, Any]:
        """Metadata stored with the preset in presets.json."""
        out: dict[str, Any] = {
            "predicted_quality": self.predicted,
            "quality_metric": fit.metric,
            "cost": self.cost,
            "cost_unit": f"{costs.metadata.get('unit', '')} per {costs.metadata.get('what', 'step')}".strip(),
            "speedup": self.speedup,
            "context": costs.metadata.get("context"),
            "batch": costs.metadata.get("batch"),
            "source": SOURCE,
        }
        if self.memory_gb is not None:
            out["state_memory_gb"] = self.memory_gb
        if self.measured is not None:
            out["measured_quality"] = self.measured
        if self.extrapolated:
            out["extrapolated"] = True
        return out


@dataclass
class OptimizeResult:
    frontier: list[Solution]
    presets: list[Preset]
    reference: str | None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why fewer presets than asked, what was left out


def _resolution(costs: np.ndarray, allowed: np.ndarray, n_states: int) -> float:
    """A cost grid of ~1000 steps over the span, coarser when memory/k-best/pair range make the table big."""
    span = float(np.where(allowed, costs, 0.0).max(axis=1).sum())
    units = int(np.clip(4e6 / max(n_states, 1), 50, 1000))
    return span / units if span > 0 else 1.0


def choose_presets(
    frontier: Sequence[Solution],
    targets: Sequence[float],
    *,
    diverse_layers: int = 0,
    distinct: bool = True,
) -> list[Solution | None]:
    """Per target (a cap on per-layer cost), the best frontier point or k-best alternative within it that is
    not chosen yet and differs from the chosen ones in >= ``diverse_layers`` layers; None when nothing fits.
    With ``distinct=False`` (explicit speed-up targets) a placement may serve several targets: each gets the best
    placement within its cap. The tightest cap chooses first (a looser one has more to choose from), whatever order
    the targets come in."""
    pool = [s for f in frontier for s in (f, *f.alternatives)]
    chosen: list[Solution] = []
    out: list[Solution | None] = [None] * len(targets)
    for i in sorted(range(len(targets)), key=lambda i: targets[i]):
        t = targets[i]
        cands = sorted((s for s in pool if s.cost <= t * (1 + 1e-9) + 1e-12), key=lambda s: -s.quality)
        pick = None
        for s in cands:
            if not distinct:
                pick = s
                break
            if any(np.array_equal(s.placement, c.placement) for c in chosen):
                continue
            if len(diverse([*chosen, s], diverse_layers)) == len(chosen) + 1:
                pick = s
                break
        if pick is not None:
            chosen.append(pick)
        out[i] = pick
    return out


def _names(prefix: str, speedups: Sequence[float | None], costs: Sequence[float]) -> list[str]:
    names: list[str] = []
    for s, c in zip(speedups, costs, strict=True):
        for digits in (1, 2, 3):
            name = f"{prefix}-{s:.{digits}f}x" if s is not None else f"{prefix}-{c:.{digits + 2}g}"
            if name not in names:
                break
        k = 2
        base = name
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def optimize(
    fit: SurrogateFit,
    costs: CostTerms,
    *,
    constraints: Constraints | None = None,
    n_presets: int = 4,
    speedups: Sequence[float] | None = None,
    k_best: int | None = None,
    diverse_layers: int = 0,
    state_bytes: np.ndarray | None = None,
    cost_resolution: float | None = None,
    prefix: str | None = None,
) -> OptimizeResult:
    """Exact predicted frontier under ``constraints`` and presets chosen along it.

    ``state_bytes`` [L, M] (per sequence) is needed for a memory budget; the batch is the cost model's.
    Raises ``PlaceError`` when the constraints admit no placement.
    """
    space = fit.space
    c = constraints or Constraints()
    if n_presets < 1 and not speedups:
        raise PlaceError("ask for at least one preset")
    allowed = c.allowed if c.allowed is not None else space.allowed
    memory = budget = None
    if c.memory_budget_gb is not None:
        if state_bytes is None:
            raise PlaceError("a memory budget needs the state bytes per layer (state_bytes)")
        batch = int(costs.metadata.get("batch") or 1)
        memory = batch * np.asarray(state_bytes, dtype=float) / 1e9
        budget = c.memory_budget_gb
    R = max(fit.r, 1)
    n_states = space.n_mixers**R * (k_best or 1) * (201 if memory is not None else 1)
    res = cost_resolution or _resolution(costs.per_layer, allowed, n_states)
    const, h, J = fit.dp_terms()
    try:
        frontier = pareto_frontier(
            const,
            h,
            J,
            costs.per_layer,
            cost_resolution=res,
            allowed=allowed,
            fixed=c.fixed,
            min_count=c.min_count,
            max_count=c.max_count,
            memory=memory,
            memory_budget=budget,
            memory_resolution=None if budget is None else budget / 200,
            k_best=k_best,
        )
    except ValueError as exc:
        raise PlaceError(f"no placement satisfies the constraints: {exc}") from None
    ref_letters = space.reference_placement()
    ref = space.encode([ref_letters]) if ref_letters else None
    # a preset slower than all-attention is never worth proposing (with timed costs, e.g. a CPU's SWA, it can be)
    cap = float(costs.total(ref)[0]) - costs.overhead if ref is not None else math.inf
    usable = [f for f in frontier if f.cost <= cap * (1 + 1e-9) + 1e-12]
    notes: list[str] = []
    if len(usable) < len(frontier):
        notes.append(f"{len(frontier) - len(usable)} frontier point(s) cost more than all-attention: never proposed")
    if not usable:
        raise PlaceError("every placement on the predicted frontier is slower than all-attention: no preset to propose")
    if speedups:
        if ref is None:
            raise PlaceError("speed-up targets need an all-attention reference, which this model cannot run")
        if any(s <= 0 for s in speedups):
            raise PlaceError(f"speed-ups must be positive, got {list(speedups)}")
        total_ref = float(costs.total(ref)[0])
        targets = [total_ref / s - costs.overhead for s in speedups]
        labels = [f"{s:g}x" for s in speedups]
    else:
        lo, hi = usable[0].cost, usable[-1].cost
        targets = list(np.linspace(lo, hi, n_presets)) if n_presets > 1 else [hi]
        labels = [f"cost<={t:.4g}" for t in targets]
    picks = choose_presets(usable, targets, diverse_layers=diverse_layers, distinct=not speedups)
    if not speedups and None in picks:  # evenly spaced targets are a wish, not a limit: take the nearest others
        picks = _fill_nearest(usable, targets, picks, diverse_layers)
    skipped = [lab for lab, p in zip(labels, picks, strict=True) if p is None]
    if skipped and not speedups:
        pool = {tuple(s.placement) for f in usable for s in (f, *f.alternatives)}
        if len(pool) < n_presets:
            notes.append(
                f"asked for {n_presets} presets, but the predicted frontier holds only {len(pool)} distinct "
                "placement(s) no slower than all-attention (a finer --cost-resolution or --k-best may find more)"
            )
        else:
            notes.append(f"asked for {n_presets} presets; no more placements differ in >= {diverse_layers} layers")
    elif skipped:
        notes.append("no placement on the predicted frontier reaches " + ", ".join(skipped))
    chosen = sorted(((lab, p) for lab, p in zip(labels, picks, strict=True) if p is not None), key=lambda x: x[1].cost)
    sols = [p for _, p in chosen]
    P = np.stack([s.placement for s in sols]) if sols else np.zeros((0, space.n_layers), dtype=np.int64)
    totals = costs.total(P) if sols else np.zeros(0)
    ups = costs.speedup(P, ref) if (sols and ref is not None) else [None] * len(sols)
    names = _names(prefix or fit.metric, list(ups), list(totals))
    presets = [
        Preset(
            name=name,
            placement=space.decode(s.placement)[0],
            predicted=float(fit.sign * s.quality),
            cost=float(t),
            speedup=None if u is None else float(u),
            memory_gb=None if s.memory is None else float(s.memory),
            target=lab,
        )
        for name, (lab, s), t, u in zip(names, chosen, totals, ups, strict=True)
    ]
    return OptimizeResult(frontier=list(frontier), presets=presets, reference=ref_letters, skipped=skipped, notes=notes)


def _fill_nearest(
    frontier: Sequence[Solution], targets: Sequence[float], picks: list[Solution | None], diverse_layers: int
) -> list[Solution | None]:
    """Fill the targets ``choose_presets`` left empty with the unchosen frontier points nearest in cost (keeping
    the diversity rule), so that N presets are returned whenever the frontier holds N placements."""
    pool = [s for f in frontier for s in (f, *f.alternatives)]
    out = list(picks)
    for i, t in enumerate(targets):
        if out[i] is not None:
            continue
        chosen = [c for c in out if c is not None]
        for s in sorted(pool, key=lambda s: (abs(s.cost - t), -s.quality)):
            if any(np.array_equal(s.placement, c.placement) for c in chosen):
                continue
            if len(diverse([*chosen, s], diverse_layers)) == len(chosen) + 1:
                out[i] = s
                break
    return out
