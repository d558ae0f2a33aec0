"""Placement samplers for stochastic distillation.

Draws are a pure function of (seed, step): every data-parallel rank draws the same placement at the same
step without communicating, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from ..config import SupernetConfig
from ..placement import Placement, resolve_placement


class PlacementSampler:
    """Base: ``sample(step)`` -> one placement (tuple of mixer names)."""

    def __init__(self, config: SupernetConfig, seed: int = 0, mixers: Sequence[str] = ()) -> None:
        self.config = config
        self.seed = seed
        # per layer, the mixer names it may use (restricted to `mixers` kinds/names when given)
        self.choices: list[list[str]] = []
        for i, layer in enumerate(config.layers):
            names = [n for n, m in layer.mixers.items() if not mixers or n in mixers or m.kind in mixers]
            if not names:
                raise ValueError(f"layer {i}: none of the allowed mixers {list(mixers)} is held by this layer")
            self.choices.append(names)

    def rng(self, step: int, stream: int = 0) -> random.Random:
        return random.Random(f"{self.seed}:{step}:{stream}")

    def sample(self, step: int) -> Placement:  # pragma: no cover - interface
        raise NotImplementedError


class UniformSampler(PlacementSampler):
    """Each layer's mixer drawn uniformly and independently (the paper's stage-1 sampling)."""

    def sample(self, step: int) -> Placement:
        rng = self.rng(step)
        return tuple(rng.choice(names) for names in self.choices)


class FullLayoutSampler(PlacementSampler):
    """Uniform over mixer *counts* (stars and bars), then a random arrangement over the layers.

    Independent per-layer draws concentrate near L/M layers of each mixer; this covers the extremes (all-GDN,
    nearly-all-FA) as often as the middle. Layers that do not hold a drawn kind get one of their own mixers.
    """

    def __init__(self, config: SupernetConfig, seed: int = 0, mixers: Sequence[str] = ()) -> None:
        super().__init__(config, seed, mixers)
        self.kinds = sorted({config.layers[i].mixers[n].kind for i, names in enumerate(self.choices) for n in names})

    def sample(self, step: int) -> Placement:
        rng = self.rng(step)
        n, m = self.config.num_layers, len(self.kinds)
        bars = sorted(rng.sample(range(n + m - 1), m - 1))  # a uniform composition of n into m parts
        counts = [b - a - 1 for a, b in zip([-1, *bars], [*bars, n + m - 1], strict=True)]
        slots = [k for k, c in zip(self.kinds, counts, strict=True) for _ in range(c)]
        rng.shuffle(slots)
        out = []
        for i, kind in enumerate(slots):
            names = [x for x in self.choices[i] if self.config.layers[i].mixers[x].kind == kind]
            out.append(names[0] if names else rng.choice(self.choices[i]))
        return tuple(out)


class PredefinedSampler(PlacementSampler):
    """Given placements (or preset names) drawn with given weights; optionally mixed into a base sampler."""

    def __init__(
        self,
        config: SupernetConfig,
        placements: Mapping[str, float],
        seed: int = 0,
        base: PlacementSampler | None = None,
        prob: float = 1.0,
        presets: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(config, seed)
        if not placements:
            raise ValueError("the predefined sampler needs at least one placement")
        self.placements = [resolve_placement(p, config, presets) for p in placements]
        self.weights = [float(w) for w in placements.values()]
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError("predefined placement weights must be >= 0 with a positive sum")
        self.base, self.prob = base, prob

    def sample(self, step: int) -> Placement:
        rng = self.rng(step, stream=1)
        if self.base is not None and rng.random() >= self.prob:
            return self.base.sample(step)
        return rng.choices(self.placements, weights=self.weights)[0]


def cheapest_placement(config: SupernetConfig) -> Placement:
    """The fastest path for sandwich training: per layer GDN, else KDA, else SWA, else attention."""
    order = ("gdn", "kda", "sliding_window", "attention")
    out = []
    for layer in config.layers:
        ranked = sorted(layer.mixers, key=lambda n: order.index(layer.mixers[n].kind))
        out.append(ranked[0])
    return tuple(out)


def build_sampler(cfg, config: SupernetConfig, seed: int, presets=None) -> PlacementSampler:
    """From a ``SamplerConfig``."""
    base: PlacementSampler
    if cfg.kind == "full_layout":
        base = FullLayoutSampler(config, seed, cfg.mixers)
    else:
        base = UniformSampler(config, seed, cfg.mixers)
    if cfg.kind == "predefined":
        return PredefinedSampler(config, cfg.placements, seed, presets=presets)
    if cfg.placements and cfg.predefined_prob > 0:
        return PredefinedSampler(config, cfg.placements, seed, base=base, prob=cfg.predefined_prob, presets=presets)
    return base
