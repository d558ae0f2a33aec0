"""Training checkpoints: everything a killed run needs to continue exactly, written atomically.

A checkpoint is ``checkpoints/step-NNNNNNN.pt`` (trainable weights, optimizer, scheduler, RNG states, step);
``checkpoints/latest`` names the newest complete one. Both are written to a temporary file and renamed, so a
run killed at any moment leaves the previous checkpoint intact and ``latest`` never points at a partial file.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tokens import atomic_write_bytes

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:07d}.pt"
    buf = io.BytesIO()
    torch.save({"step": step, "rng": rng_state(), **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(directory / LATEST, path.name.encode())
    for old in sorted(directory.glob("step-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    return path if path.exists() else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)
