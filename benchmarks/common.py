"""Shared helpers of the benchmark scripts: timing, synthetic caches, result files."""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gearshift.cache import synthetic_cache  # noqa: E402, F401 - re-exported for the scripts
from gearshift.timing import median_seconds as time_it  # noqa: E402, F401 - re-exported for the scripts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": date.today().isoformat(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2))
