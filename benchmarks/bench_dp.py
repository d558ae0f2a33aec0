"""Time the exact Pareto DP at production size (48 layers, 4 mixers) and record the result as JSON.

Run from the repository root: ``python3 benchmarks/bench_dp.py [--out PATH] [--repeats N]``. The costs are
the realistic relative per-layer costs FA 1.0 / SWA 0.48 / KDA 0.21 / GDN 0.14 at resolution 0.01; the
quality terms are random (the DP's work does not depend on their values, only on the state space).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from gearshift.search.dp import pareto_frontier  # noqa: E402

MIXERS = ("attention", "sliding_window", "kda", "gdn")
COSTS = (1.0, 0.48, 0.21, 0.14)
CASES = (  # (r, k_best)
    (1, None),
    (2, None),
    (3, None),
    (2, 4),
)


def run_case(L: int, r: int, k_best: int | None, resolution: float, repeats: int, seed: int) -> dict:
    """Best-of-``repeats`` wall time of one full frontier, plus its size and end points."""
    rng = np.random.default_rng(seed)
    h = rng.normal(0.0, 0.01, (L, len(COSTS)))
    h[:, 0] = 0.0
    J = rng.normal(0.0, 0.003, (r, L, len(COSTS), len(COSTS)))
    J[:, :, 0, :] = 0.0
    J[:, :, :, 0] = 0.0
    cost = np.tile(COSTS, (L, 1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sols = pareto_frontier(0.0, h, J, cost, cost_resolution=resolution, k_best=k_best)
        times.append(time.perf_counter() - t0)
    return {
        "n_layers": L,
        "n_mixers": len(COSTS),
        "r": r,
        "k_best": k_best,
        "cost_resolution": resolution,
        "seconds_best": min(times),
        "seconds_all": times,
        "frontier_points": len(sols),
        "min_cost": sols[0].cost,
        "max_cost": sols[-1].cost,
    }


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = here / "results" / "bench_dp.json"
    parser.add_argument("--out", type=Path, default=default_out, help="JSON output path")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--resolution", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = [run_case(args.layers, r, k, args.resolution, args.repeats, args.seed) for r, k in CASES]
    print(f"{'L':>3} {'M':>2} {'r':>2} {'k_best':>6} {'seconds':>8} {'frontier':>8} {'cost range':>16}")
    for row in rows:
        k = "-" if row["k_best"] is None else str(row["k_best"])
        span = f"{row['min_cost']:.2f}..{row['max_cost']:.2f}"
        print(
            f"{row['n_layers']:>3} {row['n_mixers']:>2} {row['r']:>2} {k:>6} {row['seconds_best']:>8.3f} "
            f"{row['frontier_points']:>8} {span:>16}"
        )
    result = {
        "benchmark": "place.dp.pareto_frontier",
        "mixers": dict(zip(MIXERS, COSTS, strict=True)),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "repeats": args.repeats,
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
