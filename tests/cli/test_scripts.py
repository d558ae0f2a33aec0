"""The GPU session driver is bash that runs unattended on a rented GPU: at least make sure it parses, names the
stages BENCHMARKS.md cites, and refuses to start without its arguments."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_driver_parses():
    subprocess.run(["bash", "-n", str(DRIVER)], check=True)


def test_stages_named_in_benchmarks_exist():
    script = DRIVER.read_text()
    named = set(
        re.findall(
            r"`(engine_graphs|serve_traces|serve_spec|evals_teacher|pipeline|place_measure)`",
            (ROOT / "BENCHMARKS.md").read_text(),
        )
    )
    assert named and all(f"stage {name} " in script for name in named)


def test_driver_needs_its_arguments(tmp_path):
    out = subprocess.run(["bash", str(DRIVER)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "unbound variable" in out.stderr


@pytest.mark.parametrize(
    "script,args",
    [
        (
            "engine_mixed.py",
            ["--shape", "tiny", "--context", "48", "--batch", "4", "--steps", "2", "--split-kv", "0", "8"],
        ),
        ("decode_attention.py", ["--contexts", "100", "--rows", "1", "3", "--chunks", "16", "--reps", "1"]),
        (
            "engine_spec.py",
            ["--shape", "tiny", "--context", "32", "--batch", "2", "--ks", "1", "2", "--steps", "2", "--rounds", "2"],
        ),
    ],
)
def test_decode_benchmarks_run_on_cpu(tmp_path, script, args):
    """The decode benchmarks' CPU smoke runs: every setting ends in the JSON (split-KV included)."""
    import json
    import os
    import sys

    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--out", str(out), *args],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    if script == "engine_mixed.py":
        assert [run["split_kv"] for run in report["runs"]] == [0, 8]
        assert all(row["tokens_per_s"] > 0 for run in report["runs"] for row in run["rows"])
    elif script == "engine_spec.py":
        assert [(row["draft"], row["k"]) for row in report["rows"]] == [
            (d, k) for d in ("all-gdn", "Reg|Lklhd-10") for k in (1, 2)
        ]
        for row in report["rows"]:  # timings measured, not compared (wall times are not asserted in tests) ...
            assert row["t_round_ms"] > 0 and row["t_target_ms"] > 0 and row["t_draft_ms"] > 0
            k, t_round, t_draft = row["k"], row["t_round_ms"], row["t_draft_ms"]
            for a, gain in row["speedup_at_acceptance"].items():  # ... and the speed-ups follow from them
                a = float(a)
                emitted = (1 - a ** (k + 1)) / (1 - a)
                assert gain == pytest.approx(emitted * row["t_target_ms"] / (t_round + a**k * t_draft))
    else:
        assert {row["method"] for row in report["rows"]} == {"fused", "split-16"}
        assert max(row["max_abs_diff"] for row in report["rows"]) < 1e-5
