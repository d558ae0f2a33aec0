"""Shared helpers of the benchmark scripts: timing, synthetic caches, result files."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gearshift.cache import synthetic_cache  # noqa: E402, F401 - re-exported for the scripts
from gearshift.timing import device_name  # noqa: E402, F401 - re-exported for the scripts
from gearshift.timing import median_seconds as time_it  # noqa: E402, F401 - re-exported for the scripts


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock timer sees it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": date.today().isoformat(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2))
