"""Resumable stages: each stage's result is a JSON file written when it ends, and a log records every start and end.

A build on a rented GPU can be cut off at any moment, and its weights cannot leave the machine: what must survive
is which stages finished and what they measured. ``RUN/stages/NAME.json`` holds a finished stage's result
(written atomically), ``RUN/stages.jsonl`` one line per event, ``RUN/stages.log`` the same for people polling it.
Running the build again skips every stage whose result file exists (``redo`` names stages to run again).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.tokens import atomic_write_json


class StageLog:
    def __init__(self, run: str | Path) -> None:
        self.root = Path(run)
        self.dir = self.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def result_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def done(self, name: str) -> dict[str, Any] | None:
        """The result of a stage that finished before, else None."""
        path = self.result_path(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def forget(self, name: str) -> None:
        self.result_path(name).unlink(missing_ok=True)

    def event(self, name: str, event: str, **fields: Any) -> None:
        row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "stage": name, "event": event, **fields}
        with open(self.root / "stages.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if k != "error")
        with open(self.root / "stages.log", "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {event:<5} {name} {extra}".rstrip() + "\n")

    def run(self, name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> tuple[str, dict]:
        """Run one stage: ("ok", result) or ("failed", {"error": traceback}); failures are logged, not raised."""
        self.event(name, "start")
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - an unattended build records the failure and goes on with what it can
            err = traceback.format_exc()
            log(err)
            self.event(name, "end", status="failed", seconds=round(time.perf_counter() - t0, 1), error=err)
            return "failed", {"error": err.strip().splitlines()[-1], "traceback": err}
        seconds = time.perf_counter() - t0
        result = {**result, "seconds": seconds}
        atomic_write_json(self.result_path(name), result)
        self.event(name, "end", status="ok", seconds=round(seconds, 1))
        return "ok", result
