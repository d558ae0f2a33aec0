"""Which placements to measure: stratified by composition, a user's list, or a fitted surrogate's proposals.

A selection is written ``stratified:N``, ``proposals:FIT.json`` (or ``proposals:FIT.json:N``) or a path to a
text file with one letter placement per line (``#`` starts a comment). Everything comes back as validated
letter strings, so a list written for another model fails before the model is loaded onto a device.

This module stands above ``fit`` and ``optimize`` (proposals need a fit and its frontier); the stratified sample
lives below them in ``sampling`` (a fit draws its candidate pool from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .sampling import stratified
from .space import PlaceError, PlacementSpace

if TYPE_CHECKING:
    from .cost_sources import CostTerms

# ``stratified`` stays importable from here, where it lived before ``sampling`` (docs and scripts import it so)
__all__ = ["parse_selection", "read_placement_file", "stratified"]


def read_placement_file(path: str | Path, space: PlacementSpace) -> list[str]:
    """Letter placements from a text file, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PlaceError(f"{path}: no such placement file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            out.append(space.check(text))
        except PlaceError as exc:
            raise PlaceError(f"{path}:{n}: {exc}") from None
    if not out:
        raise PlaceError(f"{path}: holds no placements")
    return out


def parse_selection(
    spec: str,
    space: PlacementSpace,
    *,
    seed: int = 0,
    n_proposals: int = 8,
    costs: CostTerms | None = None,
    n_frontier: int = 4,
    exclude: Sequence[str] | None = None,
) -> tuple[list[str], str]:
    """Placements of one selection spec, and a short source label for the measurement table.

    Proposals are the ``n_proposals`` most uncertain unmeasured placements, plus (with ``costs``)
    ``n_frontier`` points spread along the fit's predicted frontier; ``exclude`` lists what is measured.
    """
    if spec.startswith("stratified:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit():
            raise PlaceError(f"selection {spec!r}: expected stratified:N with N a positive integer")
        return stratified(space, int(count), seed), "stratified"
    if spec.startswith("proposals:"):
        from .fit import SurrogateFit

        rest = spec.split(":", 1)[1]
        path, n = rest, n_proposals
        head, _, tail = rest.rpartition(":")
        if head and tail.isdigit():
            path, n = head, int(tail)
        fit = SurrogateFit.load(path)
        space.require_same(fit.space, f"fit {path}")
        frontier = None
        if costs is not None and n_frontier > 0:
            from .optimize import optimize

            frontier = [p.placement for p in optimize(fit, costs, n_presets=n_frontier).presets]
        return fit.propose(n, frontier=frontier, exclude=exclude, seed=seed), "proposals"
    return read_placement_file(spec, space), f"file:{Path(spec).name}"
