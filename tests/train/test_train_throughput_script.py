"""benchmarks/train_throughput.py's CPU smoke run: every variant's cell ends in the JSON with its figures, and the
loss check holds on the tiny shape."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_runs_on_cpu(tmp_path):
    out = tmp_path / "out.json"
    variants = ["distill", "hf-eager", "loss-check", "distill-before", "distill-packed"]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", "cpu", "--shape", "tiny",
         "--seq", "32", "--rows", "2", "--warmup", "0", "--steps", "1", "--variants", *variants, "--out", str(out)],
        check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
    )  # fmt: skip
    cells = {c["variant"]: c for c in json.loads(out.read_text())["cells"]}
    assert set(cells) == set(variants) and not any("error" in c for c in cells.values())
    for name in ("distill", "distill-before", "distill-packed", "hf-eager"):
        assert cells[name]["tokens_per_s"] > 0 and cells[name]["flops_per_step"] > 0
    assert cells["distill"]["of_hf_eager"] > 0
    assert cells["distill-packed"]["documents_per_row"] > 1
    assert cells["loss-check"]["within_bf16_noise"]
