"""The GPU session driver is bash that runs unattended on a rented GPU: at least make sure it parses, names the
stages BENCHMARKS.md tells users to skip or look for, and refuses to start without its arguments."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
