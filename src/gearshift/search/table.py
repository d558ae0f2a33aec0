"""Measurement tables: one JSON line per measured placement, appended durably so that long runs resume.

Line 1 is a header saying what was measured (the placement space, a fingerprint of the data, the settings that
change the numbers); every other line is one placement's record, e.g. ``{"placement": "FSGK", "loglik": -3.1,
"kl": 0.2, ...}``. Each line goes out in one write followed by flush + fsync, so a crash leaves at most a partial
last line: readers skip it, and the next writer cuts it off before appending. Measuring at a cluster with
preemption is the normal case, not an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .space import PlaceError, PlacementSpace

__all__ = ["FORMAT", "MeasurementTable", "TableError"]

FORMAT = "gearshift-placements/1"
# Header fields that must agree before new records may be appended to an existing table: they change the values.
_MUST_MATCH = ("model", "space", "data", "reference", "reference_topk", "max_len", "dtype")


class TableError(PlaceError):
    """A measurement table that cannot be used: missing, malformed, empty, or measured differently."""


def _parse(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Header, records, and the byte length of the well-formed prefix (everything before a torn last line)."""
    if not path.exists():
        raise TableError(f"{path}: no such measurement table")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good = len(raw)
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:  # no final newline: the last write may have been cut short
        try:
            last = json.loads(lines[-1])
            if not isinstance(last, dict) or not ({"placement", "format"} & set(last)):
                raise ValueError("incomplete record")
        except ValueError:
            good -= len(lines[-1])
            lines.pop()
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TableError(f"{path}: line {n} is not a JSON object")
        if n == 1 and obj.get("format") == FORMAT:
            header = obj
        elif "placement" in obj:
            records.append(obj)
        else:
            raise TableError(f"{path}: line {n} is neither the header nor a placement record")
    return header, records, good


class MeasurementTable:
    """Records of one table; ``open`` to append (resuming), ``read`` for analysis only."""

    def __init__(self, path: Path, header: dict[str, Any] | None, records: list[dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.records = records
        self._writable = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def read(cls, path: str | Path) -> MeasurementTable:
        """Read a table (a torn last line is skipped); raises ``TableError`` when it holds no records."""
        path = Path(path)
        header, records, _ = _parse(path)
        if not records:
            raise TableError(f"{path}: the table holds no measured placements")
        return cls(path, header, records)

    @classmethod
    def open(cls, path: str | Path, header: Mapping[str, Any]) -> MeasurementTable:
        """Open for appending: create with ``header``, or resume an existing table measured the same way."""
        path = Path(path)
        header = {"format": FORMAT, **header}
        old, records, good = _parse(path) if path.exists() else (None, [], 0)
        if good:
            if old is None:
                raise TableError(f"{path}: not a gearshift measurement table (no header line)")
            for key in _MUST_MATCH:
                if key == "model" and (old.get(key) is None or header.get(key) is None):
                    continue  # a table (or a run) without a checkpoint fingerprint: only the rest can be checked
                if old.get(key) != header.get(key):
                    what = (
                        "another checkpoint"
                        if key == "model"
                        else f"{key}={old.get(key)!r}, this run has {header.get(key)!r}"
                    )
                    raise TableError(
                        f"{path}: was measured with {what}; use another --out table (values measured "
                        "differently must not be mixed)"
                    )
            table = cls(path, old, records)
        else:
            table = cls(path, dict(header), [])
        if path.exists():  # cut a torn last line off (or end a complete one) before appending
            with open(path, "r+b") as f:
                f.truncate(good)
                if good:
                    f.seek(good - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not good:
            table._write_line(table.header)
        table._writable = True
        return table

    # ------------------------------------------------------------------ writing
    def _write_line(self, obj: Mapping[str, Any]) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one placement's record durably (one line, flushed and fsynced)."""
        if not self._writable:
            raise TableError(f"{self.path}: opened read-only; use MeasurementTable.open to append")
        if "placement" not in record:
            raise TableError("a record needs a 'placement'")
        self._write_line(record)
        self.records.append(dict(record))

    # ------------------------------------------------------------------ reading
    @property
    def space(self) -> PlacementSpace | None:
        if self.header is None or "space" not in self.header:
            return None
        return PlacementSpace.from_json(self.header["space"])

    @property
    def done(self) -> set[str]:
        """Placements with a record (letter strings)."""
        return {str(r["placement"]) for r in self.records}

    def metrics(self) -> list[str]:
        """Numeric fields present in every record (what ``values`` can return)."""
        keys = None
        for r in self.records:
            numeric = {k for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            keys = numeric if keys is None else keys & numeric
        return sorted(keys or ())

    def values(self, metric: str) -> tuple[list[str], np.ndarray]:
        """(placements, values) of one metric; the latest record wins when a placement was measured twice."""
        latest: dict[str, float] = {}
        for r in self.records:
            if metric not in r:
                raise TableError(
                    f"{self.path}: record of {r['placement']!r} has no {metric!r}; available: {self.metrics()}"
                )
            latest[str(r["placement"])] = float(r[metric])
        names = list(latest)
        return names, np.array([latest[n] for n in names], dtype=float)

    def as_mapping(self, metric: str) -> dict[str, float]:
        names, vals = self.values(metric)
        return dict(zip(names, vals.tolist(), strict=True))

    def check_space(self, space: PlacementSpace, placements: Sequence[str] | None = None) -> None:
        """Raise when the table was measured on another model or holds placements this model cannot run."""
        own = self.space
        if own is not None:
            space.require_same(own, f"table {self.path}")
        for p in placements if placements is not None else self.done:
            try:
                space.check(p)
            except PlaceError as exc:
                raise TableError(f"{self.path}: {exc}") from None
