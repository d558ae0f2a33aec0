"""Placements: which mixer each layer uses for one call.

A placement can be given as a list of mixer names (one per layer), a compact string of one letter per layer
(F = attention, S = sliding_window, G = gdn, K = kda), ``all-<kind>`` / ``<kind>`` for every layer (kinds and
their short aliases: ``fa`` = attention, ``swa`` = sliding_window), or the name of a preset stored with the
checkpoint. Everything is resolved to a tuple of mixer names, validated against the layers, before any compute
happens. Preset names may not look like placements (``all-kda``, ``FSGK``), which they would shadow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import KIND_LETTERS, LETTER_KINDS, SupernetConfig


class PlacementError(ValueError):
    """A placement that does not fit the model (wrong length, unknown name, mixer absent from a layer)."""


Placement = tuple[str, ...]
PlacementSpec = str | Sequence[str] | None

# short names users know from the literature, accepted wherever a kind name is (all-swa, swa)
KIND_ALIASES = {"swa": "sliding_window", "fa": "attention"}
# model-id words with a meaning of their own (the server's load-adaptive choice)
RESERVED_NAMES = ("auto",)


def whole_model_kind(spec: str) -> str | None:
    """The kind of ``all-<kind>`` / ``<kind>`` (or an alias), case-insensitive; None for anything else."""
    word = spec.strip().lower().removeprefix("all-")
    kind = KIND_ALIASES.get(word, word)
    return kind if kind in KIND_LETTERS else None


def looks_like_placement(name: str) -> bool:
    """Whether a preset name would read as a placement (``all-kda``, ``swa``, a string of F/S/G/K letters) or a
    reserved model-id word: such names are refused, since a preset cannot be told apart from what it shadows."""
    word = name.strip()
    return (
        whole_model_kind(word) is not None
        or (bool(word) and set(word.upper()) <= set(LETTER_KINDS))
        or word.lower() in RESERVED_NAMES
    )


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
        kind = whole_model_kind(spec)
        if kind is not None:
            return resolve_placement([KIND_LETTERS[kind]] * n, config)
        letters = spec.strip().upper()
        if letters and set(letters) <= set(LETTER_KINDS) and len(spec.strip()) == n:
            return resolve_placement(list(letters), config)
        if letters and set(letters) <= set(LETTER_KINDS):
            raise PlacementError(f"placement string {spec!r} has {len(letters)} letters but the model has {n} layers")
        known = ", ".join(sorted(presets)) or "none stored"
        raise PlacementError(
            f"unknown preset or placement {spec!r}: give a preset name (known: {known}), a string of {n} letters "
            f"from F/S/G/K, all-<mixer> (attention, sliding_window or swa, gdn, kda), or a list of {n} mixer names"
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
        kind = LETTER_KINDS.get(entry.upper()) if len(entry) == 1 else whole_model_kind(entry)
        kind = None if entry.lower().startswith("all-") else kind
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


def placement_for_model_id(
    requested: str, config: SupernetConfig, presets: Mapping[str, Sequence[str]]
) -> tuple[str, Placement]:
    """(label, placement) for the part after ``NAME:`` of an OpenAI-style model id: a stored preset (labelled by its
    name), or a placement in any accepted form, ``gearshift:GGKG`` or ``gearshift:all-swa`` (labelled by its
    letters). Raises ``PlacementError`` naming the presets on offer. ``auto`` is the server's to handle."""
    if requested in presets:
        return requested, tuple(presets[requested])
    try:
        placement = resolve_placement(requested, config)
    except PlacementError as exc:
        known = ", ".join(sorted(presets)) or "none"
        raise PlacementError(
            f"{requested!r} is neither a preset (available: {known}) nor a placement this model can run ({exc})"
        ) from None
    return placement_letters(placement, config), placement


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
