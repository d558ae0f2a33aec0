"""Issue 24, item 6: each stage works with its own documented extra, installed alone in a fresh venv.

``pip install gearshift[train]`` then ``gearshift convert`` (the teacher built here, saved the Hugging Face way),
``[place]`` -> ``place fit`` / ``optimize``, ``[serve]`` -> ``serve`` answering a request, ``[eval]`` -> ``eval niah`` /
``report``. And a command whose extra is missing says so in one line, naming the pip command.

The venvs see nothing of this one (no --system-site-packages, which would hide a missing dependency): torch comes
first from this machine's CPU wheel (``pip install torch==2.13.0``: a bare torch requirement could pull a
multi-GB CUDA build), then the wheel of this checkout with the extra. pip's cache makes repeats quick; the four
venvs are built two at a time. Minutes: marked ``install`` (CI runs them; ``-m 'not install'`` skips them)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import train_fixtures as fx
from gearshift.cli import main

ROOT = Path(__file__).resolve().parents[2]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
EXTRAS = ("train", "place", "serve", "eval")

pytestmark = pytest.mark.install


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _pip(venv: Path, *args):
    """This interpreter's pip installing into ``venv`` (``pip --python``: the venv needs no pip of its own)."""
    return _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile",
                 "--disable-pip-version-check", *args])  # fmt: skip


def _venv(root: Path, wheel: Path, extra: str) -> Path:
    venv = root / f"venv-{extra}"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _pip(venv, TORCH_SPEC)
    _pip(venv, f"{wheel}[{extra}]")
    return venv


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src-copy"  # build from a copy: pip builds in-tree and must not litter the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "wheel", src])
    (wheel,) = (root / "wheel").glob("gearshift-*.whl")
    with ThreadPoolExecutor(2) as pool:
        built = dict(zip(EXTRAS, pool.map(lambda e: _venv(root, wheel, e), EXTRAS), strict=True))
    return built


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Made here, with every extra: a Hugging Face teacher directory, a converted supernet with its tokenizer,
    teacher traces, and a measurement table."""
    root = tmp_path_factory.mktemp("inputs")
    teacher = fx.teacher()
    teacher.save_pretrained(root / "teacher")
    fx.tokenizer().save_pretrained(root / "teacher")
    fx.supernet_dir(root / "supernet")
    fx.trace_shards(root / "shards", root / "supernet", n=16, new_tokens=16)
    table = root / "table.jsonl"
    args = ["--data", root / "shards", "--placements", "stratified:30", "--out", table, "--device", "cpu"]
    assert main(["place", "measure", str(root / "supernet"), *map(str, args)]) == 0
    return root


def gearshift(venv: Path, *args, **kw):
    return subprocess.run(
        [str(venv / "bin" / "gearshift"), *map(str, args)], capture_output=True, text=True, timeout=600, **kw
    )


def test_train_extra_converts_a_teacher(venvs, inputs, tmp_path):
    venv = venvs["train"]
    out = gearshift(venv, "convert", inputs / "teacher", tmp_path / "supernet", "--window", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all-attention vs teacher max |diff|" in out.stdout and (tmp_path / "supernet" / "tokenizer.json").exists()
    # a stage whose extra is missing: one line naming the pip command, no traceback
    out = gearshift(venv, "place", "fit", inputs / "table.jsonl", "--out", tmp_path / "fit.json")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "pip install 'gearshift[place]'" in out.stderr and ("scikit-learn" in out.stderr or "scipy" in out.stderr)
    out = gearshift(venv, "serve", tmp_path / "supernet")
    assert out.returncode == 2 and "pip install 'gearshift[serve]'" in out.stderr and "Traceback" not in out.stderr


def test_place_extra_fits_and_optimizes(venvs, inputs, tmp_path):
    venv = venvs["place"]
    fit = tmp_path / "fit.json"
    out = gearshift(venv, "place", "fit", inputs / "table.jsonl", "--out", fit)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "fit.effects.png").exists()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(inputs / "supernet", ckpt)
    out = gearshift(venv, "place", "optimize", ckpt, "--fit", fit, "--presets", "2", "--write")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((ckpt / "presets.json").read_text())["presets"]
    out = gearshift(venv, "info", ckpt)  # the core commands come with every extra
    assert out.returncode == 0 and "F/S/G/K" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_extra_serves(venvs, inputs):
    venv = venvs["serve"]
    port = _free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "gearshift"), "serve", str(inputs / "supernet"), "--port", str(port), "--max-batch", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("decoding state: reserved"), proc.stderr.read() if proc.poll() is not None else line
        body = json.dumps({"model": "gearshift:all-gdn", "prompt": "w9 w10", "max_tokens": 4, "temperature": 0})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        for _ in range(300):  # uvicorn binds just after the line above
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    answer = json.loads(reply.read())
                break
            except OSError:
                if proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err


def test_eval_extra_runs_niah_and_report(venvs, inputs, tmp_path):
    venv = venvs["eval"]
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "essay.txt").write_text(" ".join(f"w{i % 40 + 8}" for i in range(2000)))
    out = gearshift(
        venv, "eval", "niah", inputs / "supernet", "--haystack", hay, "--lengths", "48", "--depths", "50",
        "--preset", "all-gdn", "--device", "cpu", "--out", tmp_path / "eval",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "eval" / "niah.json").exists()
    out = gearshift(
        venv, "eval", "report", inputs / "supernet", "--results", tmp_path / "eval" / "niah.json",
        "--out", tmp_path / "report",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "report" / "report.png").exists() and "all-gdn" in out.stdout
