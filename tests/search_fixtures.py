"""Helpers shared by test folders (moved from test_search_cli.py)."""

from __future__ import annotations

import itertools

import numpy as np

from gearshift.search.fit import SurrogateFit
from gearshift.search.space import PlacementSpace


def synthetic_fit(space: PlacementSpace, seed: int = 0) -> SurrogateFit:
    """A surrogate fitted to an exactly additive quality, so brute force over the space can check the DP."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0, 1, (space.n_layers, space.n_mixers))
    effect[:, space.reference] = 0
    P = list(itertools.product(*space.layers))
    letters = ["".join(p) for p in P]
    q = [sum(effect[i, space.letters.index(ch)] for i, ch in enumerate(p)) for p in letters]
    return SurrogateFit.fit(letters, q, space, estimator="ridge")
