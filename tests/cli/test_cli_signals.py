"""Issue 24, item 3: Ctrl-C (SIGINT) or SIGTERM never costs the user a traceback or their work.

Training (align / distill) finishes its step, writes a checkpoint atomically and exits with one line saying how to
resume; the resumed run says where it resumes. Measuring, tracing and evaluating exit with one line too. Each
command runs as a real subprocess and gets a real signal once its progress bar shows that the work has started."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_fixtures as fx
from gearshift.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GEARSHIFT_PROGRESS": "1"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    fx.supernet_dir(root / "supernet")
    fx.trace_shards(root / "shards", root / "supernet")
    return root


def interrupt(args, ready, sig=signal.SIGINT, timeout=180.0):
    """Run ``gearshift ARGS``, send ``sig`` once ``ready(stderr so far)`` holds; returns (code, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gearshift", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    os.set_blocking(proc.stderr.fileno(), False)
    err = b""
    deadline = time.monotonic() + timeout
    try:
        while not ready(err.decode(errors="replace")):
            assert proc.poll() is None, f"finished before the signal: {err.decode(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, "never got ready"
            time.sleep(0.05)
            err += proc.stderr.read() or b""
        proc.send_signal(sig)
        out, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), (err + rest).decode(errors="replace")


def last_line(stderr: str) -> str:
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize(("mode", "sig"), [("distill", signal.SIGINT), ("align", signal.SIGTERM)])
def test_training_saves_a_checkpoint_and_says_how_to_resume(workdir, tmp_path, capsys, mode, sig):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {workdir / 'supernet'}\noutput: {tmp_path / 'out'}\n"
        f"data: {{train: [{workdir / 'shards'}], seq_len: 16, eval_sequences: 4}}\n"
        "optim: {steps: 5000, batch_size: 2, lr: 1.0e-3, warmup_steps: 1, dtype: float32}\n"
        "eval: {every: 0, placements: [all-gdn]}\ncheckpoint: {every: 1000}\nlog_every: 1\n"
    )
    metrics = tmp_path / "out" / "metrics.jsonl"

    def three_steps(_err):
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    code, _, err = interrupt([mode, cfg, "--device", "cpu"], three_steps, sig)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    line = last_line(err)
    assert line.startswith("interrupted at step ") and f"resume with: gearshift {mode} {cfg}" in line, line
    step = int(line.split()[3])
    assert step >= 3
    saved = tmp_path / "out" / "checkpoints" / f"step-{step:07d}.pt"
    assert saved.exists() and str(saved) in line  # written although checkpoint.every is 1000
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == saved.name
    # the resumed run (here in this process) says where it starts, and finishes
    assert main([mode, str(cfg), "--device", "cpu", "--set", f"optim.steps={step + 1}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step {step}" in out
    assert json.loads(out[out.index("{") :])["last_step"]["step"] == step + 1


def test_measure_traces_and_eval_exit_in_one_line(workdir, tmp_path):
    table = tmp_path / "t.jsonl"
    code, _, err = interrupt(
        ["place", "measure", workdir / "supernet", "--data", workdir / "shards", "--placements", "stratified:500"]
        + ["--out", table, "--device", "cpu"],
        lambda e: "measure:" in e and table.exists() and len(table.read_text().splitlines()) >= 3,
    )
    assert code == 130 and "Traceback" not in err
    assert last_line(err).startswith("interrupted: gearshift place measure stopped; the placements measured so far")
    kept = len(table.read_text().splitlines()) - 1
    assert kept >= 2  # durable rows: the same command measures the rest

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2}" for i in range(8, 56)) + "\n")
    code, _, err = interrupt(
        ["traces", workdir / "supernet", "--prompts", prompts, "--out", tmp_path / "traces", "--batch-size", "1"]
        + ["--max-new-tokens", "200", "--device", "cpu"],
        lambda e: "traces:" in e and "prompt/s" in e,
    )
    assert code == 130 and "Traceback" not in err
    assert "run the same command to continue" in last_line(err)

    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(" ".join(f"w{i % 50 + 8}" for i in range(4000)))
    code, _, err = interrupt(
        ["eval", "niah", workdir / "supernet", "--haystack", hay, "--lengths", "200", "300", "--depths", "0", "50"]
        + ["--trials", "40", "--device", "cpu", "--out", tmp_path / "eval", "--preset", "all-gdn"],
        lambda e: "niah:" in e and "cell/s" in e,
    )
    assert code == 130 and "Traceback" not in err
    assert last_line(err) == "interrupted: gearshift eval niah stopped; results are written when a run completes; " \
        "nothing was written"  # fmt: skip
