"""Placements: which mixer each layer uses for one call.

A placement can be given as a list of mixer names (one per layer), a compact string of one letter per layer
(F = attention, S = sliding_window, K = kda, G = gdn), or the name of a preset stored with the checkpoint.
Everything is resolved to a tuple of mixer names, validated against the layers, before any compute happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import KIND_LETTERS, LETTER_KINDS, SupernetConfig


class PlacementError(ValueError):
    """A placement that does not fit the model (wrong length, unknown name, mixer absent from a layer)."""


Placement = tuple[str, ...]
PlacementSpec = str | Sequence[str] | None


def resolve_placement(
    spec: PlacementSpec, config: SupernetConfig, presets: Mapping[str, Sequence[str]] | None = None
) -> Placement:
    """Turn any accepted placement form into a validated tuple of mixer names."""
    presets = presets or {}
    n = config.num_layers
    if spec is None:
        return config.default_placement
    if isinstance(spec, str):
        if spec in presets:
            return resolve_placement(list(presets[spec]), config)
        if spec.upper() in ("ALL-" + k.upper() for k in KIND_LETTERS) or spec.lower() in KIND_LETTERS:
            kind = spec.lower().removeprefix("all-")
            return resolve_placement([KIND_LETTERS[kind]] * n, config)
        letters = spec.strip().upper()
        if letters and set(letters) <= set(LETTER_KINDS) and len(spec.strip()) == n:
            return resolve_placement(list(letters), config)
        if letters and set(letters) <= set(LETTER_KINDS):
            raise PlacementError(f"placement string {spec!r} has {len(letters)} letters but the model has {n} layers")
        known = ", ".join(sorted(presets)) or "none stored"
        raise PlacementError(
            f"unknown preset or placement {spec!r}: give a preset name (known: {known}), a string of {n} letters "
            f"from F/S/K/G, or a list of {n} mixer names"
        )
    entries = list(spec)
    if len(entries) != n:
        raise PlacementError(f"placement has {len(entries)} entries but the model has {n} layers")
    out = []
    for i, (entry, layer) in enumerate(zip(entries, config.layers, strict=True)):
        if not isinstance(entry, str):
            raise PlacementError(f"layer {i}: placement entries must be mixer names or letters, got {entry!r}")
        if entry in layer.mixers:
            out.append(entry)
            continue
        kind = LETTER_KINDS.get(entry.upper()) if len(entry) == 1 else (entry if entry in KIND_LETTERS else None)
        held = ", ".join(f"{name} ({KIND_LETTERS[m.kind]})" for name, m in layer.mixers.items())
        if kind is None:
            raise PlacementError(f"layer {i}: unknown mixer {entry!r}; this layer holds {held}")
        names = layer.names_of_kind(kind)
        if not names:
            raise PlacementError(
                f"layer {i}: {entry!r} asks for a {kind} mixer, which this layer does not hold ({held})"
            )
        if len(names) > 1:
            raise PlacementError(f"layer {i}: {entry!r} is ambiguous, this layer holds several {kind} mixers {names}")
        out.append(names[0])
    return tuple(out)


def placement_letters(placement: Sequence[str], config: SupernetConfig) -> str:
    """The compact one-letter-per-layer form of a resolved placement."""
    return "".join(KIND_LETTERS[config.layers[i].mixers[name].kind] for i, name in enumerate(placement))


def placement_kinds(placement: Sequence[str], config: SupernetConfig) -> list[str]:
    return [config.layers[i].mixers[name].kind for i, name in enumerate(placement)]


def composition(placement: Sequence[str], config: SupernetConfig) -> dict[str, int]:
    """Layer count per mixer kind, e.g. {'attention': 12, 'sliding_window': 26, 'kda': 6, 'gdn': 4}."""
    counts = dict.fromkeys(KIND_LETTERS, 0)
    for kind in placement_kinds(placement, config):
        counts[kind] += 1
    return counts


def spread_placement(counts: dict[str, int], num_layers: int) -> str:
    """A letter placement with the given layer count per kind, each kind spread evenly over depth.

    Kind k with n_k layers claims the ideal positions (j + 0.5) * L / n_k; slots are filled in order of these
    ideal positions (ties: attention first, then sliding_window, kda, gdn). Used for the paper's preset
    compositions, whose exact layer orders are not public.
    """
    unknown = set(counts) - set(KIND_LETTERS)
    if unknown:
        raise PlacementError(f"unknown mixer kinds {sorted(unknown)}")
    if sum(counts.values()) != num_layers or any(n < 0 for n in counts.values()):
        raise PlacementError(f"counts {counts} do not add up to {num_layers} layers")
    order = ["attention", "sliding_window", "kda", "gdn"]
    claims = sorted(
        ((j + 0.5) * num_layers / n, order.index(kind), kind) for kind, n in counts.items() for j in range(n)
    )
    return "".join(KIND_LETTERS[kind] for _, _, kind in claims)
