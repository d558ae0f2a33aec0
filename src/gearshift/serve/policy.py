"""Load-adaptive preset choice: under light load serve the best preset, under pressure the fastest one whose
predicted quality stays above a floor — per request, which the release's global switch cannot do."""

from __future__ import annotations

from collections.abc import Callable
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

    def choose(self, load: float, has_room: Callable[[str], bool] | None = None) -> str:
        """``load`` = (waiting + running) / batch capacity: 0 idle, 1 full, above 1 queueing. ``has_room(name)``:
        whether a request of that preset could start now. Where the load's preset could not (its state pools
        are full: pools sized per preset, or full-attention pools shrunk to the memory budget), the nearest
        preset on the ladder that could is chosen, a faster one first; if none could, the load's preset."""
        if load <= 0.5 or len(self.ladder) == 1:
            target = 0
        else:
            step = min(1.0, (load - 0.5) / 0.5)  # from half-full to full, walk up the ladder to the fastest
            target = round(step * (len(self.ladder) - 1))
        if has_room is not None and not has_room(self.ladder[target].name):
            faster, slower = self.ladder[target + 1 :], self.ladder[:target][::-1]
            for p in faster + slower:
                if has_room(p.name):
                    return p.name
        return self.ladder[target].name
