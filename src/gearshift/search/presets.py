"""Presets chosen by placement search: written into a checkpoint's presets.json, judged against measurements.

``write_presets`` edits only ``presets.json`` (atomically: temp file + rename), never the weights, so a 50 GB
checkpoint gains presets in milliseconds and a crash leaves either the old file or the new one. Presets are
validated with the model's own rules (``Supernet.add_preset`` on a weightless copy of the model) and stored in
the same form ``Supernet.save_pretrained`` writes, so ``Supernet.from_pretrained`` loads them with their metadata.

``pareto_regret_of`` answers "is a preset beaten by something we already measured?": for each measured preset,
the best measured quality at the same or lower cost minus the preset's measured quality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import PRESETS_NAME, preset_entry, read_config, read_presets
from ..data.tokens import atomic_write_json
from .space import PlaceError, PlacementSpace

if TYPE_CHECKING:  # `gearshift preset add` writes presets with the core install: no scipy, no timing code
    from .cost_sources import CostTerms

__all__ = ["pareto_regret_of", "remove_presets", "write_presets"]


def write_presets(
    checkpoint: str | Path,
    presets: Mapping[str, Mapping[str, Any]],
    *,
    replace: bool = True,
    drop_source: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Add ``presets`` (name -> {"placement": ..., **metadata}) to a checkpoint's presets.json.

    Existing presets with other names are kept, except those whose ``source`` metadata equals ``drop_source``
    (the previous run of the same search); one with the same name is replaced (``replace=False`` raises
    instead). Returns the file's new ``presets`` mapping.
    """
    import torch

    from ..model import Supernet

    path = Path(checkpoint)
    config, _ = read_config(path)
    existing = read_presets(path)
    clash = sorted(set(existing) & set(presets))
    if clash and not replace:
        raise PlaceError(f"{path}: presets {clash} exist already")
    with torch.device("meta"):
        shadow = Supernet(config)  # no weights: only the placement and name rules are needed
    merged = {n: e for n, e in existing.items() if drop_source is None or e.get("source") != drop_source}
    for name, entry in presets.items():
        if "placement" not in entry:
            raise PlaceError(f"preset {name!r} has no 'placement'")
        meta = {k: v for k, v in entry.items() if k not in ("placement", "letters")}
        shadow.add_preset(name, entry["placement"], **meta)
        placement = shadow.presets[name]
        merged[name] = preset_entry(placement, config, meta)
    atomic_write_json(path / PRESETS_NAME, {"presets": merged})
    return merged


def remove_presets(checkpoint: str | Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Drop presets from a checkpoint's presets.json (atomically; the weights are untouched)."""
    path = Path(checkpoint)
    read_config(path)  # a checkpoint directory, or a clear error
    existing = read_presets(path)
    missing = [n for n in names if n not in existing]
    if missing:
        stored = ", ".join(existing) or "none"
        raise PlaceError(f"{path}: no preset named {', '.join(map(repr, missing))} (stored: {stored})")
    kept = {n: e for n, e in existing.items() if n not in names}
    atomic_write_json(path / PRESETS_NAME, {"presets": kept})
    return kept


def pareto_regret_of(
    placements: Sequence[str],
    measured: Mapping[str, float],
    costs: CostTerms,
    space: PlacementSpace,
    *,
    sign: int = 1,
) -> list[float | None]:
    """Per placement: best measured quality at no higher cost minus its own measured quality (metric units,
    oriented by ``sign`` so that > 0 always means "something measured is better"); None if not measured."""
    import numpy as np

    from .metrics import pareto_regret

    if not measured:
        raise PlaceError("no measured placements to compare against")
    names = list(measured)
    P = space.encode(names)
    all_costs = costs.total(P)
    quality = sign * np.array([measured[n] for n in names], dtype=float)
    out: list[float | None] = []
    for p in placements:
        if p not in measured:
            out.append(None)
            continue
        own_cost = float(costs.total(space.encode([p]))[0])
        out.append(float(pareto_regret(own_cost, sign * measured[p], all_costs, quality, cost_tol=1e-9)))
    return out
