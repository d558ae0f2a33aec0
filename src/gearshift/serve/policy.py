"""Load-adaptive preset choice: under light load serve the best preset, under pressure the fastest one whose
predicted quality stays above a floor — per request, which the release's global switch cannot do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PresetInfo:
    name: str
    quality: float | None  # predicted or measured quality (higher is better), if known
    speed: float  # relative decode speed (e.g. speed-up vs all-attention), higher is faster


class AutoPolicy:
    def __init__(self, presets: list[PresetInfo], quality_floor: float | None = None) -> None:
        eligible = [p for p in presets if quality_floor is None or p.quality is None or p.quality >= quality_floor]
        if not eligible:
            raise ValueError(f"no preset reaches the quality floor {quality_floor}")
        self.ladder = sorted(eligible, key=lambda p: p.speed)  # slowest (best) first
        self.quality_floor = quality_floor

    def choose(self, load: float) -> str:
        """``load`` = (waiting + running) / batch capacity: 0 idle, 1 full, above 1 queueing."""
        if load <= 0.5 or len(self.ladder) == 1:
            return self.ladder[0].name
        step = min(1.0, (load - 0.5) / 0.5)  # from half-full to full, walk up the ladder to the fastest
        return self.ladder[round(step * (len(self.ladder) - 1))].name
