"""Training checkpoints: everything a killed run needs to continue exactly, written atomically.

A checkpoint is ``checkpoints/step-NNNNNNN.pt`` (trainable weights, optimizer, scheduler, RNG states, step);
``checkpoints/latest`` names the newest complete one. Both are written to a temporary file and renamed, so a
run killed at any moment leaves the previous checkpoint intact and ``latest`` never points at a partial file.
"""

from __future__ import annotations

import io
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tokens import atomic_write_bytes

LATEST = "latest"


class StopRequest:
    """Within ``with``, Ctrl-C (SIGINT) and SIGTERM only ask the run to stop (``requested``): it finishes its step
    and saves a checkpoint rather than dying mid-write with a traceback. A second signal interrupts at once.
    Outside the main thread (where signals cannot be handled) it never requests anything."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log=print) -> None:
        self.log = log
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (again to abort now)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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
