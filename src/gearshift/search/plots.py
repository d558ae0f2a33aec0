"""Frontier and effect plots (PNG via matplotlib's Agg canvas) and an offline interactive frontier page.

We draw on ``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` instead of pyplot so plotting never touches
global backend state (safe in servers, notebooks and threads) and never needs a display. matplotlib is
imported lazily, so the rest of ``gearshift.search`` works without it.

Placements render as strings with ``mixer_letters`` (mixer index -> letter), e.g. ``"FSKG"`` gives
``"FFSGKG"``; the project's letters are F = attention, S = sliding_window, K = kda, G = gdn.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dp import Solution, placement_string

__all__ = ["frontier_html", "plot_effect_heatmap", "plot_frontier"]

Points = tuple[np.ndarray, np.ndarray, list[str] | None]


def _points(data: Any, letters: Sequence[str] | str | None, what: str) -> Points | None:
    """Normalise measured/frontier input: list of Solutions, or (costs, qualities[, placements])."""
    if data is None:
        return None
    if isinstance(data, Sequence) and data and all(isinstance(s, Solution) for s in data):
        costs = np.array([s.cost for s in data], dtype=float)
        quals = np.array([s.quality for s in data], dtype=float)
        return costs, quals, [s.as_string(letters) for s in data]
    if isinstance(data, Sequence) and len(data) == 0:
        return np.zeros(0), np.zeros(0), []
    if not isinstance(data, Sequence | np.ndarray) or len(data) not in (2, 3):
        raise ValueError(f"{what} must be a list of Solution or a (costs, qualities[, placements]) tuple")
    costs = np.asarray(data[0], dtype=float).ravel()
    quals = np.asarray(data[1], dtype=float).ravel()
    if costs.shape != quals.shape:
        raise ValueError(f"{what}: {costs.size} costs but {quals.size} qualities")
    labels = None
    if len(data) == 3 and data[2] is not None:
        labels = [p if isinstance(p, str) else placement_string(p, letters) for p in data[2]]
        if len(labels) != costs.size:
            raise ValueError(f"{what}: {len(labels)} placements for {costs.size} points")
    return costs, quals, labels


def _presets(presets: Sequence[tuple[str, float, float]] | None) -> list[tuple[str, float, float]]:
    out = []
    for entry in presets or ():
        if len(entry) != 3:
            raise ValueError(f"each preset must be (name, cost, quality), got {entry!r}")
        out.append((str(entry[0]), float(entry[1]), float(entry[2])))
    return out


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def plot_frontier(
    path_png: str | Path,
    measured: Any = None,
    frontier: Any = None,
    presets: Sequence[tuple[str, float, float]] | None = None,
    xlabel: str = "relative cost",
    ylabel: str = "quality",
    title: str | None = None,
    mixer_letters: Sequence[str] | str | None = None,
    annotate_frontier: bool = False,
) -> Path:
    """Scatter of measured placements, the predicted frontier as a staircase, and named presets."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    meas = _points(measured, mixer_letters, "measured")
    front = _points(frontier, mixer_letters, "frontier")
    if meas is not None and meas[0].size:
        ax.scatter(meas[0], meas[1], s=14, c="0.55", alpha=0.7, label="measured", zorder=2)
    if front is not None and front[0].size:
        order = np.argsort(front[0], kind="stable")
        fx, fy = front[0][order], front[1][order]
        ax.plot(fx, fy, drawstyle="steps-post", color="tab:blue", lw=1.2, zorder=3)
        ax.scatter(fx, fy, s=18, color="tab:blue", label="predicted frontier", zorder=4)
        if annotate_frontier and front[2] is not None:
            for i in order:
                ax.annotate(
                    front[2][i],
                    (front[0][i], front[1][i]),
                    fontsize=6,
                    family="monospace",
                    xytext=(3, -8),
                    textcoords="offset points",
                )
    chosen = sorted(_presets(presets), key=lambda p: p[1])
    for i, (name, c, q) in enumerate(chosen):
        ax.scatter(
            [c],
            [q],
            marker="*",
            s=140,
            color="tab:red",
            edgecolor="k",
            lw=0.5,
            zorder=5,
            label="preset" if not i else None,
        )
        # presets crowd together near the cheap end: labels climb a ladder, each tied to its star by a line
        ax.annotate(
            name,
            (c, q),
            xytext=(12, -10 - 13 * i) if len(chosen) > 1 else (5, 5),
            textcoords="offset points",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.3"} if len(chosen) > 1 else None,
            zorder=6,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path_png)


def plot_effect_heatmap(
    path_png: str | Path,
    onebody: np.ndarray,
    mixer_names: Sequence[str],
    reference: int = 0,
    std: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of one-body effects [L, M] (layers down, non-reference mixers across; blue = better).

    Shows at a glance which layers tolerate conversion away from the reference mixer. With ``std`` the
    cells whose |effect| is under 2 std are hatched as not significant.
    """
    from matplotlib.figure import Figure

    a = np.asarray(onebody, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"onebody must be [n_layers, n_mixers], got shape {a.shape}")
    L, M = a.shape
    if len(mixer_names) != M:
        raise ValueError(f"{len(mixer_names)} mixer names for {M} mixers")
    if not 0 <= reference < M:
        raise ValueError(f"reference must be in 0..{M - 1}, got {reference}")
    cols = [m for m in range(M) if m != reference] or [reference]
    data = a[:, cols]
    lim = float(np.abs(data).max()) or 1.0
    fig = Figure(figsize=(1.2 + 1.1 * len(cols), 1.2 + 0.18 * L + 0.6))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), [str(mixer_names[m]) for m in cols])
    step = max(1, math.ceil(L / 32))
    ax.set_yticks(range(0, L, step))
    ax.set_ylabel("layer")
    ax.set_title(title or f"effect of converting a layer from {mixer_names[reference]}", fontsize=9)
    if std is not None:
        s = np.asarray(std, dtype=float)
        if s.shape != a.shape:
            raise ValueError(f"std must have the shape of onebody {a.shape}, got {s.shape}")
        weak = np.abs(data) < 2 * s[:, cols]
        for i, j in zip(*np.nonzero(weak), strict=True):
            ax.add_patch(_hatch_patch(j, i))
    if L * len(cols) <= 400:
        for i in range(L):
            for j in range(len(cols)):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:+.3g}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if abs(data[i, j]) > 0.6 * lim else "k",
                )
    fig.colorbar(im, ax=ax, shrink=0.8, label="quality change")
    fig.tight_layout()
    return _save(fig, path_png)


def _hatch_patch(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.4", lw=0)


# ----------------------------------------------------------------------------------------------------------
# interactive HTML


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
svg text {{ font-size: 12px; }}
.measured {{ fill: #999; fill-opacity: .7; }}
.frontier {{ fill: #1f77b4; }}
.preset {{ fill: #d62728; stroke: #000; stroke-width: .6; }}
[data-tip]:hover {{ stroke: #000; stroke-width: 2; }}
#tip {{ position: fixed; pointer-events: none; background: #fff; border: 1px solid #888; padding: 4px 7px;
  font: 12px ui-monospace, monospace; white-space: pre; display: none; box-shadow: 2px 2px 4px #0003; }}
</style></head><body>
<h2>{title}</h2>
<svg id="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">
{body}
</svg>
<div id="tip"></div>
<script type="application/json" id="frontier-data">{data}</script>
<script>
(function () {{
  var tip = document.getElementById("tip");
  document.querySelectorAll("[data-tip]").forEach(function (el) {{
    el.addEventListener("mousemove", function (ev) {{
      tip.textContent = el.getAttribute("data-tip");
      tip.style.display = "block";
      tip.style.left = (ev.clientX + 12) + "px";
      tip.style.top = (ev.clientY + 12) + "px";
    }});
    el.addEventListener("mouseleave", function () {{ tip.style.display = "none"; }});
  }});
}})();
</script>
</body></html>
"""


def frontier_html(
    path_html: str | Path,
    measured: Any = None,
    frontier: Any = None,
    presets: Sequence[tuple[str, float, float]] | None = None,
    xlabel: str = "relative cost",
    ylabel: str = "quality",
    title: str = "gearshift placement frontier",
    mixer_letters: Sequence[str] | str | None = None,
    width: int = 820,
    height: int = 520,
) -> Path:
    """Write a self-contained page (inline SVG + vanilla JS, no network) whose points show tooltips.

    Hovering a point shows its placement string, cost and quality, which is how presets get picked. The
    points are also embedded as JSON (``#frontier-data``) for reuse.
    """
    meas = _points(measured, mixer_letters, "measured")
    front = _points(frontier, mixer_letters, "frontier")
    pres = _presets(presets)
    groups = {"measured": meas, "frontier": front}
    xs = [g[0] for g in groups.values() if g is not None] + [np.array([p[1] for p in pres])]
    ys = [g[1] for g in groups.values() if g is not None] + [np.array([p[2] for p in pres])]
    allx, ally = np.concatenate(xs), np.concatenate(ys)
    if allx.size == 0:
        raise ValueError("nothing to plot: give measured points, a frontier or presets")
    x0, x1 = float(allx.min()), float(allx.max())
    y0, y1 = float(ally.min()), float(ally.max())
    padx = (x1 - x0) * 0.05 or 0.5
    pady = (y1 - y0) * 0.05 or 0.5
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    ml, mr, mt, mb = 70, 20, 20, 50
    pw, ph = width - ml - mr, height - mt - mb

    def sx(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (width - ml - mr)

    def sy(v: float) -> float:
        return height - mb - (v - y0) / (y1 - y0) * (height - mt - mb)

    parts: list[str] = []
    for t in _nice_ticks(x0, x1):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" y2="{height - mb}" stroke="#eee"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(y0, y1):
        parts.append(f'<line x1="{ml}" x2="{width - mr}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    xl, yl = html.escape(xlabel), html.escape(ylabel)
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 12}" text-anchor="middle">{xl}</text>')
    rotate = f"translate(16 {mt + ph / 2:.1f}) rotate(-90)"
    parts.append(f'<text transform="{rotate}" text-anchor="middle">{yl}</text>')

    records: dict[str, list[dict[str, Any]]] = {"measured": [], "frontier": [], "presets": []}
    if front is not None and front[0].size:
        order = np.argsort(front[0], kind="stable")
        pts = []
        for a, b in zip(order[:-1], order[1:], strict=True):  # staircase, like the PNG
            pts += [(front[0][a], front[1][a]), (front[0][b], front[1][a])]
        pts.append((front[0][order[-1]], front[1][order[-1]]))
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.3"/>')
    for name, g, radius in (("measured", meas, 3.5), ("frontier", front, 4.5)):
        if g is None:
            continue
        for i in range(g[0].size):
            label = g[2][i] if g[2] is not None else ""
            tip = f"{label}\n{xlabel}: {g[0][i]:.4g}\n{ylabel}: {g[1][i]:.4g}".lstrip()
            records[name].append({"cost": float(g[0][i]), "quality": float(g[1][i]), "placement": label})
            parts.append(
                f'<circle class="{name}" cx="{sx(g[0][i]):.1f}" cy="{sy(g[1][i]):.1f}" r="{radius}" '
                f'data-tip="{html.escape(tip)}"><title>{html.escape(tip)}</title></circle>'
            )
    for name, c, q in pres:
        tip = f"{name}\n{xlabel}: {c:.4g}\n{ylabel}: {q:.4g}"
        records["presets"].append({"name": name, "cost": c, "quality": q})
        x, y = sx(c), sy(q)
        diamond = f"{x:.1f},{y - 7:.1f} {x + 7:.1f},{y:.1f} {x:.1f},{y + 7:.1f} {x - 7:.1f},{y:.1f}"
        parts.append(
            f'<polygon class="preset" points="{diamond}" data-tip="{html.escape(tip)}">'
            f"<title>{html.escape(tip)}</title></polygon>"
        )
        parts.append(f'<text x="{x + 9:.1f}" y="{y - 6:.1f}">{html.escape(name)}</text>')
    legend = [(cls, text) for cls, text in (("measured", "measured"), ("frontier", "predicted frontier"))]
    legend = [(cls, text) for cls, text in legend if records[cls]]
    for i, (cls, text) in enumerate(legend):
        y = mt + 16 + 18 * i
        parts.append(f'<circle class="{cls} legend" cx="{ml + 14}" cy="{y - 4}" r="4"/>')
        parts.append(f'<text x="{ml + 24}" y="{y}">{text}</text>')
    data = json.dumps(records).replace("</", "<\\/")
    page = _PAGE.format(title=html.escape(title), w=width, h=height, body="\n".join(parts), data=data)
    path_html = Path(path_html)
    path_html.parent.mkdir(parents=True, exist_ok=True)
    path_html.write_text(page, encoding="utf-8")
    return path_html
