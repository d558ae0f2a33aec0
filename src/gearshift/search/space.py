"""The placement search space of one model: which mixer letters exist and which layer may use which.

The placement math (surrogate, DP, cost models) works on integer mixer indices; measurements, presets and users
speak letter strings ("FSGK"). This module is the one translation between the two, and the one place that
checks a placement against the layers: a table or fit made for another model fails here with a message that
names the placement and the layer, before any fitting or DP runs.

Mixer index order is F, S, K, G (attention, sliding_window, kda, gdn), restricted to the kinds the model holds;
the reference mixer of the surrogate (the one every effect is measured from) is attention when present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import KIND_LETTERS, LETTER_KINDS, SupernetConfig

__all__ = ["KIND_ORDER", "PlaceError", "PlacementSpace"]

KIND_ORDER = ("attention", "sliding_window", "kda", "gdn")


class PlaceError(ValueError):
    """Input the placement toolkit cannot use: a placement that does not fit the model, an empty table, a fit
    or cost file made for another model, constraints that admit no placement."""


@dataclass(frozen=True)
class PlacementSpace:
    """Mixer alphabet (``letters``, index -> letter) and per-layer allowed letters (``layers``)."""

    letters: str
    layers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise PlaceError("a placement space needs at least one layer")
        if not self.letters or len(set(self.letters)) != len(self.letters):
            raise PlaceError(f"mixer letters must be distinct and non-empty, got {self.letters!r}")
        for i, held in enumerate(self.layers):
            if not held or not set(held) <= set(self.letters):
                raise PlaceError(f"layer {i}: allowed letters {held!r} are not a non-empty subset of {self.letters!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: SupernetConfig) -> PlacementSpace:
        """The space of a supernet configuration (each layer may use the kinds it holds)."""
        present = {m.kind for layer in config.layers for m in layer.mixers.values()}
        letters = "".join(KIND_LETTERS[k] for k in KIND_ORDER if k in present)
        layers = []
        for i, layer in enumerate(config.layers):
            kinds = [m.kind for m in layer.mixers.values()]
            doubled = sorted({k for k in kinds if kinds.count(k) > 1})
            if doubled:
                raise PlaceError(
                    f"layer {i} holds several mixers of kind {doubled}: placement search names mixers by kind "
                    "letter, so it needs at most one mixer per kind and layer"
                )
            layers.append("".join(ch for ch in letters if LETTER_KINDS[ch] in kinds))
        return cls(letters, tuple(layers))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlacementSpace:
        try:
            return cls(str(data["letters"]), tuple(str(x) for x in data["layers"]))
        except (KeyError, TypeError) as exc:
            raise PlaceError(f"malformed placement space {data!r} ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        return {"letters": self.letters, "layers": list(self.layers)}

    # ------------------------------------------------------------------ properties
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_mixers(self) -> int:
        return len(self.letters)

    @property
    def size(self) -> int:
        """Number of distinct placements."""
        return int(np.prod([len(held) for held in self.layers], dtype=float).clip(max=2**62))

    @property
    def kinds(self) -> list[str]:
        """Mixer kind names in index order (e.g. ['attention', 'sliding_window', 'kda', 'gdn'])."""
        return [LETTER_KINDS[ch] for ch in self.letters]

    @property
    def reference(self) -> int:
        """Index of the surrogate's reference mixer: attention when the model holds it, else the first."""
        return self.letters.index("F") if "F" in self.letters else 0

    @property
    def allowed(self) -> np.ndarray:
        """[n_layers, n_mixers] bool mask for the DP and the stratified sampler."""
        return np.array([[ch in held for ch in self.letters] for held in self.layers], dtype=bool)

    def reference_placement(self) -> str | None:
        """All-reference letters when every layer holds the reference mixer (the speed-up baseline), else None."""
        ref = self.letters[self.reference]
        return ref * self.n_layers if all(ref in held for held in self.layers) else None

    # ------------------------------------------------------------------ translation
    def index_of(self, mixer: str) -> int:
        """Mixer index from a letter (``G``) or a kind name (``gdn``)."""
        letter = mixer.upper() if len(mixer) == 1 else KIND_LETTERS.get(mixer.lower())
        if letter is None or letter not in self.letters:
            known = ", ".join(f"{ch} ({LETTER_KINDS[ch]})" for ch in self.letters)
            raise PlaceError(f"unknown mixer {mixer!r}; this model's mixers are {known}")
        return self.letters.index(letter)

    def check(self, placement: str) -> str:
        """Validate one letter placement (case-insensitive) and return it upper-cased."""
        if not isinstance(placement, str):
            raise PlaceError(f"placements are letter strings, got {placement!r}")
        p = placement.strip().upper()
        if len(p) != self.n_layers:
            raise PlaceError(f"placement {placement!r} has {len(p)} letters but the model has {self.n_layers} layers")
        for i, (ch, held) in enumerate(zip(p, self.layers, strict=True)):
            if ch not in self.letters:
                raise PlaceError(
                    f"placement {placement!r}: layer {i} has letter {ch!r}, not one of this model's mixers "
                    f"{self.letters!r}"
                )
            if ch not in held:
                raise PlaceError(
                    f"placement {placement!r}: layer {i} does not hold {LETTER_KINDS[ch]} ({ch}); it holds {held!r}"
                )
        return p

    def encode(self, placements: Iterable[str]) -> np.ndarray:
        """Letter placements -> int64 [n, n_layers] mixer indices (each one validated)."""
        rows = [[self.letters.index(ch) for ch in self.check(p)] for p in placements]
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.n_layers)

    def decode(self, P: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """Mixer indices [n, n_layers] (or one row) -> letter placements."""
        arr = np.asarray(P, dtype=np.int64)
        if arr.ndim == 1:
            arr = arr[None]
        return ["".join(self.letters[int(v)] for v in row) for row in arr]

    def require_same(self, other: PlacementSpace, what: str) -> None:
        """Raise when ``other`` (of a table, fit or cost file) was made for a different model."""
        if other != self:
            raise PlaceError(
                f"{what} was made for another model: its mixers {other.letters!r} over {other.n_layers} layers "
                f"(per layer {_summary(other.layers)}) vs this model's {self.letters!r} over {self.n_layers} layers "
                f"({_summary(self.layers)})"
            )


def _summary(layers: Sequence[str]) -> str:
    return layers[0] if len(set(layers)) == 1 else ",".join(layers)
