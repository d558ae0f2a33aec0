"""Stratified samples of a placement space: what to measure before any surrogate exists, and the candidate pool
a fitted surrogate proposes from (``SurrogateFit.propose``).
"""

from __future__ import annotations

import itertools

import numpy as np

from .space import PlaceError, PlacementSpace
from .surrogate import stratified_placements

__all__ = ["stratified"]


def stratified(space: PlacementSpace, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct placements stratified by mixer composition (single-mixer placements first when n is
    large enough), restricted to the mixers each layer holds; the whole space when it has at most n."""
    if n < 1:
        raise PlaceError(f"the number of stratified placements must be >= 1, got {n}")
    if n >= space.size:  # small spaces (a few layers): everything, the single-mixer placements first
        every = ["".join(p) for p in itertools.product(*space.layers)]
        return sorted(every, key=lambda p: len(set(p)) > 1)
    rng = np.random.default_rng(seed)
    allowed = space.allowed
    mask = None if allowed.all() else allowed  # the unrestricted sampler is the fast one
    out: dict[str, None] = {}
    idle = 0
    while len(out) < n and idle < 5:  # draw again while that still finds new placements
        before = len(out)
        batch = stratified_placements(2 * (n - len(out)) + 8, space.n_layers, space.n_mixers, rng, allowed=mask)
        for p in space.decode(batch):
            out.setdefault(p)
        idle = idle + 1 if len(out) == before else 0
    return list(out)[:n]
