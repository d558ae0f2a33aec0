"""Start-up time of the command line: ``gearshift --help``, ``--version``, ``info`` and a stage's ``--help``.

Each command runs as a fresh process (``python -m gearshift``, PYTHONPATH = the source tree measured) ``--reps``
times after ``--warmup`` untimed runs; the table gives median, mean +- standard error and min in milliseconds.
Two reference rows: the bare interpreter (``python -c pass``) and ``import torch`` (what every command paid
before imports became lazy). ``--src`` measures another tree, e.g. an older checkout, like for like.

    python benchmarks/cli_startup.py --out benchmarks/results/cli_startup.json
    python benchmarks/cli_startup.py --src /path/to/old/checkout/src --out /tmp/old.json
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


def time_command(cmd: list[str], env: dict[str, str], reps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
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
    p.add_argument("--reps", type=int, default=20, help="timed runs per command")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (fills the OS file cache)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": args.src}
    py = [sys.executable]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "tiny")
        subprocess.run([*py, "-m", "gearshift", "init", ckpt], env=env, check=True, stdout=subprocess.DEVNULL)
        commands = {
            "python -c pass": [*py, "-c", "pass"],
            "python -c 'import torch'": [*py, "-c", "import torch"],
            "gearshift --help": [*py, "-m", "gearshift", "--help"],
            "gearshift --version": [*py, "-m", "gearshift", "--version"],
            "gearshift info CKPT": [*py, "-m", "gearshift", "info", ckpt],
            "gearshift place --help": [*py, "-m", "gearshift", "place", "--help"],
        }
        rows = []
        for name, cmd in commands.items():
            try:
                rows.append(summarise(name, time_command(cmd, env, args.reps, args.warmup)))
            except subprocess.CalledProcessError:  # e.g. --version in a tree that predates it
                rows.append({"command": name, "n": 0, "error": "command failed"})
    print(f"{'command':<28} {'n':>3} {'median ms':>10} {'mean +- sem ms':>16} {'min ms':>8}")
    for r in rows:
        if r["n"]:
            mean = f"{r['mean_ms']:.0f} +- {r['sem_ms']:.0f}"
            print(f"{r['command']:<28} {r['n']:>3} {r['median_ms']:>10.0f} {mean:>16} {r['min_ms']:>8.0f}")
        else:
            print(f"{r['command']:<28}   - {r['error']}")
    if args.out:
        payload = {
            "date": date.today().isoformat(),
            "command": " ".join(sys.argv),
            "src": args.src,
            "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
