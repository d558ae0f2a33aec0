"""The quality-retention report: every stored preset beside all-attention, with what it costs.

Quality is whatever the result rows hold (task accuracies, NIAH, likelihoods); ``retention`` is a preset's
average accuracy over the accuracy scores it shares with all-attention divided by all-attention's average on
the same scores (the paper's definition). Speed-ups are relative to all-attention too: *modelled* as the ratio
of bytes moved per decode step (``gearshift.roofline.placement_report``, memory-bound roofline, bf16) at the
stated context and batch, and *measured* from a throughput JSON when one is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..placement import PlacementError, placement_letters
from ..roofline import placement_report
from .errors import EvalError
from .results import BASELINE, FORMAT, ResultRow, higher_is_better, is_accuracy

if TYPE_CHECKING:
    from ..model import Supernet

DEFAULT_CONTEXT = 32768
DEFAULT_BATCH = 64  # the paper's speed-ups are serving throughput; `gearshift demo` models 32k x 64 too


def read_throughput(path: str | Path) -> dict[str, float]:
    """Measured decode throughput per preset (name or letters) -> tokens/s.

    Accepts ``{"fast": 812.0, ...}``, ``{"rows": [{"preset": "fast", "tokens_per_s": 812.0}, ...]}`` or the bare list.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: cannot read throughput ({exc})") from None
    records = raw.get("rows", raw) if isinstance(raw, dict) else raw
    try:
        if isinstance(records, dict):
            return {str(k): float(v) for k, v in records.items()}
        return {str(r["preset"]): float(r["tokens_per_s"]) for r in records}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EvalError(
            f"{path}: throughput must map preset -> tokens/s or list {{preset, tokens_per_s}} records ({exc})"
        ) from None


def report_setting(model: Supernet, context: int | None, batch: int | None) -> tuple[int, int, str]:
    """(context, batch, where they came from) of the modelled speed-ups. Given values win (a context is capped at
    the checkpoint's own: a 512-token model never decodes at 32k). Otherwise the presets' own, as stored by
    ``place optimize`` (so that a preset named ``loglik-2.10x`` shows 2.10x here), else the checkpoint's context
    up to DEFAULT_CONTEXT and DEFAULT_BATCH."""
    limit = model.config.max_position_embeddings
    metas = [model.preset_meta.get(name, {}) for name in model.presets]
    contexts = {int(m["context"]) for m in metas if m.get("context")}
    batches = {int(m["batch"]) for m in metas if m.get("batch")}
    notes = []
    if context is None:
        if len(contexts) == 1:
            context = contexts.pop()
            notes.append("the presets' context")
        else:
            context = min(DEFAULT_CONTEXT, limit)
            notes.append("the checkpoint's context" if limit <= DEFAULT_CONTEXT else "the default context")
    if context > limit:
        notes.append(f"--context {context} capped at the checkpoint's {limit}")
        context = limit
    if batch is None:
        if len(batches) == 1:
            batch = batches.pop()
            notes.append("the presets' batch")
        else:
            batch = DEFAULT_BATCH
            notes.append("the default batch")
    return context, batch, ", ".join(notes)


def _retention(score: str, value: float, base: float) -> float | None:
    """How much of the baseline's quality a score keeps (1 = all; perplexity and likelihood as ratios of
    per-token likelihoods)."""
    if score.startswith("ll:"):
        return math.exp(value - base)
    if not higher_is_better(score):
        return base / value if value > 0 else None
    return value / base if base > 0 else None


def _average(scores: Mapping[str, float], keys: Sequence[str]) -> float | None:
    vals = [scores[k] for k in keys if k in scores]
    return sum(vals) / len(vals) if vals else None


def build_report(
    model: Supernet,
    rows: Sequence[ResultRow],
    *,
    context: int = DEFAULT_CONTEXT,
    batch: int = DEFAULT_BATCH,
    throughput: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One entry per preset (all-attention, the stored presets, then any other evaluated placement)."""
    by_name = {r.preset: r for r in rows}
    names = [BASELINE] + [n for n in model.presets if n != BASELINE] + [n for n in by_name if n not in model.presets]
    names = list(dict.fromkeys(n for n in names if n in by_name or n in model.presets or n == BASELINE))
    placements = {}
    for name in names:
        spec = by_name[name].placement if name in by_name and name not in model.presets else name
        try:
            placements[name] = model.resolve(spec)
        except PlacementError:
            if name != BASELINE:
                raise
    names = [n for n in names if n in placements]
    costs = {n: placement_report(model, p, context=context, batch=batch).bytes_per_step for n, p in placements.items()}
    scores_order = list(dict.fromkeys(k for r in rows for k in r.scores))
    base = by_name.get(BASELINE)
    throughput = dict(throughput or {})
    entries = []
    for name in names:
        row = by_name.get(name, ResultRow(name, ""))
        letters = _letters(model, placements[name])
        acc_keys = [k for k in row.scores if is_accuracy(k) and (base is None or k in base.scores)]
        avg = _average(row.scores, acc_keys)
        base_avg = _average(base.scores, acc_keys) if base is not None else None
        tps = throughput.get(name, throughput.get(letters))
        base_tps = throughput.get(BASELINE)
        entries.append(
            {
                "preset": name,
                "placement": letters,
                "scores": dict(row.scores),
                "average": avg,
                "retention": avg / base_avg if avg is not None and base_avg else None,
                "score_retention": {
                    k: _retention(k, v, base.scores[k]) for k, v in row.scores.items() if base and k in base.scores
                },
                "modelled_bytes_per_step": costs[name],
                "modelled_speedup": costs[BASELINE] / costs[name] if BASELINE in costs else None,
                "measured_tokens_per_s": tps,
                "measured_speedup": tps / base_tps if tps and base_tps else None,
                "evaluated": name in by_name,
            }
        )
    return {
        "format": FORMAT,
        "kind": "report",
        "baseline": BASELINE if BASELINE in placements else None,
        "settings": {"context": context, "batch": batch, "dtype_bytes": 2, "cost": "bytes per decode step"},
        "scores": scores_order,
        "rows": entries,
    }


def _letters(model: Supernet, placement: Sequence[str]) -> str:
    return placement_letters(placement, model.config)


def format_score(name: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if name.startswith("ppl:"):
        return f"{v:.2f}"
    if name.startswith("ll:"):
        return f"{v:.3f}"
    return f"{100 * v:.1f}"


def _fmt(v: float | None, suffix: str = "", scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}{suffix}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table with a caption that states the conventions."""
    scores = report["scores"]
    s = report["settings"]
    head = ["preset", "placement", *scores, "avg", "retention", f"modelled speed-up @{s['context']}x{s['batch']}"]
    head.append("measured speed-up")
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |", "|" + "---|" * len(head)]
    for e in report["rows"]:
        cells = [e["preset"].replace("|", "\\|"), f"`{e['placement']}`"]
        cells += [format_score(k, e["scores"].get(k)) for k in scores]
        cells += [
            _fmt(e["average"], scale=100, digits=1),
            _fmt(e["retention"], "%", 100, 1),
            _fmt(e["modelled_speedup"], "x"),
            _fmt(e["measured_speedup"], "x"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = report.get("baseline") or "none (absolute scores only)"
    notes = [
        "",
        f"Accuracies in %, baseline {base}. avg = mean of the accuracy columns shared with the baseline; retention ="
        " avg / baseline avg. acc_norm tasks divide log-likelihoods by the answer length in characters.",
        f"Modelled speed-up = baseline bytes moved per decode step / preset's (roofline, bf16) at context "
        f"{s['context']} tokens, batch {s['batch']}; measured speed-up from the given throughput file.",
    ]
    partial = [e["preset"] for e in report["rows"] if e["evaluated"] and any(k not in e["scores"] for k in scores)]
    if partial:
        notes.append(
            f"Scored on fewer columns (n/a): {', '.join(partial)}; their avg and retention use only the columns they "
            "have (the baseline's avg over the same columns)."
        )
    missing = [e["preset"] for e in report["rows"] if not e["evaluated"]]
    if missing:
        notes.append(f"Not evaluated (costs only): {', '.join(missing)}.")
    return "\n".join(lines + notes) + "\n"


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Quality (retention, or average accuracy without a baseline) against modelled and measured speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rel = report.get("baseline") is not None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for e in report["rows"]:
        y = e["retention"] if rel else e["average"]
        if y is None:
            continue
        x = e["modelled_speedup"] if rel else 1 / e["modelled_bytes_per_step"]
        ax.scatter([x], [100 * y], color="C0")
        ax.annotate(e["preset"], (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if e["measured_speedup"] is not None:
            ax.scatter([e["measured_speedup"]], [100 * y], facecolors="none", edgecolors="C1")
    s = report["settings"]
    ax.set_xlabel(
        f"modelled decode speed-up vs {report['baseline']} (ctx {s['context']}, batch {s['batch']})"
        if rel
        else "1 / modelled bytes per decode step"
    )
    ax.set_ylabel("quality retention (%)" if rel else "average accuracy (%)")
    ax.set_title("Presets: quality vs speed (filled: modelled, hollow: measured)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.md, report.png and report.json (rows: preset, placement letters, scores) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(report_markdown(report))
    js = out / "report.json"
    js.write_text(json.dumps(report, indent=2))
    return {"markdown": md, "json": js, "plot": plot_report(report, out / "report.png")}
