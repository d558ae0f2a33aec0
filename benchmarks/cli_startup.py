"""Start-up time of the command line: ``gearshift --help``, ``--version``, ``info`` and a stage's ``--help``.

Each command runs as a fresh process (``python -m gearshift``, PYTHONPATH = the source tree measured) ``--reps``
times after ``--warmup`` untimed runs; the table gives median, mean +- standard error and min in milliseconds.
Two reference rows: the bare interpreter (``python -c pass``) and ``import torch`` (what every command paid
before imports became lazy). ``--before SRC`` also measures an older source tree in the same run, its runs
interleaved with this tree's, so both see the same machine load and the ratio is like for like.

    python benchmarks/cli_startup.py --out benchmarks/results/cli_startup.json
    git worktree add /tmp/before a868809   # the last commit before lazy imports
    python benchmarks/cli_startup.py --before /tmp/before/src --out benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_commands(runs: dict[str, tuple[list[str], dict]], reps: int, warmup: int) -> dict[str, list[float] | None]:
    """Each command ``warmup + reps`` times, round robin (one run of each in turn), so a change of machine load
    falls on all of them alike; None for a command that fails (e.g. --version in a tree that predates it)."""
    times: dict[str, list[float] | None] = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, (cmd, env) in runs.items():
            if times[name] is None:
                continue
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if done.returncode:
                times[name] = None
            elif i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarise(name: str, times: list[float]) -> dict:
    ms = [1e3 * t for t in times]
    sem = statistics.stdev(ms) / len(ms) ** 0.5 if len(ms) > 1 else 0.0
    return {
        "command": name,
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "sem_ms": sem,
        "min_ms": min(ms),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(ROOT / "src"), help="source tree to measure (PYTHONPATH)")
    p.add_argument("--before", help="an older source tree measured in the same run, interleaved (rows 'before: ...')")
    p.add_argument("--reps", type=int, default=20, help="timed runs per command")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (fills the OS file cache)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    trees = {"": args.src} | ({"before: ": args.before} if args.before else {})
    py = [sys.executable]
    runs: dict[str, tuple[list[str], dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prefix, src in trees.items():
            env = {**os.environ, "PYTHONPATH": src}
            ckpt = str(Path(tmp) / f"tiny{len(runs)}")
            subprocess.run([*py, "-m", "gearshift", "init", ckpt], env=env, check=True, stdout=subprocess.DEVNULL)
            if not prefix:
                runs["python -c pass"] = ([*py, "-c", "pass"], env)
                runs["python -c 'import torch'"] = ([*py, "-c", "import torch"], env)
            for name, argv in (
                ("gearshift --help", ["--help"]),
                ("gearshift --version", ["--version"]),
                ("gearshift info CKPT", ["info", ckpt]),
                ("gearshift place --help", ["place", "--help"]),
            ):
                runs[prefix + name] = ([*py, "-m", "gearshift", *argv], env)
        times = time_commands(runs, args.reps, args.warmup)
    rows = [
        summarise(name, t) if t is not None else {"command": name, "n": 0, "error": "command failed"}
        for name, t in times.items()
    ]
    print(f"{'command':<36} {'n':>3} {'median ms':>10} {'mean +- sem ms':>16} {'min ms':>8}")
    for r in rows:
        if r["n"]:
            mean = f"{r['mean_ms']:.0f} +- {r['sem_ms']:.0f}"
            print(f"{r['command']:<36} {r['n']:>3} {r['median_ms']:>10.0f} {mean:>16} {r['min_ms']:>8.0f}")
        else:
            print(f"{r['command']:<36}   - {r['error']}")
    if args.out:
        payload = {
            "date": date.today().isoformat(),
            "command": " ".join(sys.argv),
            "src": args.src,
            "before": args.before,
            "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
