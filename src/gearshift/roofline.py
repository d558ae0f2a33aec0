"""What a placement costs: active parameters, decoding state per sequence, bytes moved per decode step.

Decoding is memory-bound, so the modelled time of a step is the bytes it must move divided by the HBM bandwidth
(the *roofline*). Bytes per step = active weights (the embedding table counts only the rows looked up, unless it
is tied to the output head) + per sequence: attention reads its held keys/values and writes one position;
GDN/KDA read and write their fp32 state and conv tails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .config import SupernetConfig
from .placement import PlacementSpec, composition, placement_letters, resolve_placement

H200_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy measured on the H200 (shared/reference/h200.md)

# The Super Apriel 15B presets (paper.md): FA/SWA/KDA/GDN layer counts and vLLM decode speed-up vs all-FA.
PAPER_PRESETS = {
    "all-attention": ((48, 0, 0, 0), 1.0, 1.0),
    "Reg|Lklhd-26": ((12, 26, 6, 4), 2.85, 1.5),
    "Idealized|All-18": ((13, 32, 1, 2), 1.99, 1.1),
    "Reg|Lklhd-18": ((3, 25, 4, 16), 4.76, 2.2),
    "Idealized|Lklhd-6": ((0, 30, 5, 13), 6.2, 2.4),
    "Reg|Lklhd-13": ((0, 16, 13, 19), 6.9, 2.7),
    "Reg|Lklhd-10": ((0, 10, 5, 33), 10.69, 4.2),
}


def paper_placement(name: str, num_layers: int = 48) -> str:
    """The letter placement used for a paper preset: its composition (scaled to ``num_layers`` by largest
    remainders), each kind spread evenly over depth."""
    from .placement import spread_placement

    counts = PAPER_PRESETS[name][0]
    exact = [c * num_layers / 48 for c in counts]
    scaled = [int(x) for x in exact]
    for i in sorted(range(4), key=lambda i: scaled[i] - exact[i])[: num_layers - sum(scaled)]:
        scaled[i] += 1
    kinds = ("attention", "sliding_window", "kda", "gdn")
    return spread_placement(dict(zip(kinds, scaled, strict=True)), num_layers)


@dataclass
class PlacementReport:
    placement: str
    composition: dict[str, int]
    active_params: int
    stored_params: int
    context: int
    batch: int
    state_bytes_per_seq: int
    weight_bytes_per_step: int
    bytes_per_step: int
    roofline_ms: float
    roofline_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def _meta_model(config: SupernetConfig):
    import torch

    from .model import Supernet

    with torch.device("meta"):
        return Supernet(config)


def placement_report(
    model_or_config,
    placement: PlacementSpec = None,
    *,
    context: int = 4096,
    batch: int = 1,
    dtype_bytes: int = 2,
    bandwidth: float = H200_BANDWIDTH,
) -> PlacementReport:
    """Modelled costs of one placement at ``context`` tokens and ``batch`` sequences (no GPU needed)."""
    if isinstance(model_or_config, SupernetConfig):
        model = _meta_model(model_or_config)
    else:
        model = model_or_config
    cfg: SupernetConfig = model.config
    chosen = resolve_placement(placement, cfg, getattr(model, "presets", {}))
    active = model.num_parameters(chosen)
    weight_params = _weight_params_read(model, active, batch)
    per_seq_state, per_seq_traffic = _state_bytes(model, chosen, context, dtype_bytes)
    weight_bytes = weight_params * dtype_bytes
    total = weight_bytes + batch * per_seq_traffic
    seconds = total / bandwidth
    return PlacementReport(
        placement=placement_letters(chosen, cfg),
        composition=composition(chosen, cfg),
        active_params=active,
        stored_params=model.num_parameters(all_mixers=True),
        context=context,
        batch=batch,
        state_bytes_per_seq=per_seq_state,
        weight_bytes_per_step=weight_bytes,
        bytes_per_step=total,
        roofline_ms=seconds * 1e3,
        roofline_tokens_per_s=batch / seconds,
    )


def _weight_params_read(model, active: int, batch: int) -> int:
    """Parameters a decode step reads: the active ones, but of the input embedding only the batch's rows."""
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    return active - embed + batch * cfg.hidden_size + (embed if cfg.tie_word_embeddings else 0)


def _state_bytes(model, chosen, context: int, dtype_bytes: int) -> tuple[int, int]:
    """(state held, state bytes read and written per decode step) of one sequence under placement ``chosen``."""
    held_total = traffic = 0
    for block, name in zip(model.blocks, chosen, strict=True):
        spec = block.mixer.mixers[name].state_spec()
        held_total += spec.nbytes(context, dtype_bytes)
        traffic += spec.step_bytes(context, dtype_bytes)
    return held_total, traffic


def batch_bytes_per_step(
    model_or_config, placements: Sequence[PlacementSpec], *, context: int = 4096, dtype_bytes: int = 2
) -> int:
    """Modelled bytes of one decode step of a batch whose rows use different placements (one entry per row).

    Each layer reads the weights of every mixer that some row uses there, once for the batch, and each row its
    own state. A batch mixing presets therefore reads more weights than any single-preset batch: this is the
    floor under the engine's mixed-batch cost, which no scheduling removes."""
    model = _meta_model(model_or_config) if isinstance(model_or_config, SupernetConfig) else model_or_config
    cfg = model.config
    chosen = [resolve_placement(p, cfg, getattr(model, "presets", {})) for p in placements]
    # the first row's placement, plus in each layer the other mixers some row uses there
    params = model.num_parameters(chosen[0]) + sum(
        p.numel()
        for i, block in enumerate(model.blocks)
        for name in {c[i] for c in chosen} - {chosen[0][i]}
        for p in block.mixer.mixers[name].parameters()
    )
    traffic = sum(_state_bytes(model, c, context, dtype_bytes)[1] for c in chosen)
    return _weight_params_read(model, params, len(chosen)) * dtype_bytes + traffic


def format_reports(reports: list[PlacementReport]) -> str:
    """A plain-text table, one row per report."""
    head = (
        f"{'placement':<20} {'F/S/G/K':>11} {'active':>9} {'ctx':>6} {'batch':>5} {'state/seq':>11} "
        f"{'MB/step':>9} {'roofline ms':>11}"
    )
    rows = [head, "-" * len(head)]
    for r in reports:
        c = r.composition
        mix = f"{c['attention']}/{c['sliding_window']}/{c['gdn']}/{c['kda']}"
        name = r.placement if len(r.placement) <= 20 else r.placement[:17] + "..."
        rows.append(
            f"{name:<20} {mix:>11} {r.active_params / 1e6:>8.1f}M {r.context:>6} {r.batch:>5} "
            f"{_human(r.state_bytes_per_seq):>11} {r.bytes_per_step / 1e6:>9.1f} {r.roofline_ms:>11.3f}"
        )
    return "\n".join(rows)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
