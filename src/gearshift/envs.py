"""Every ``GEARSHIFT_*`` environment switch, typed, checked and read when used (never at import).

One place to find what can be switched without touching code: ``gearshift.envs.SPLIT_KV`` reads the variable each
time it is accessed, so a test's ``monkeypatch.setenv`` or a benchmark's ``with envs.override(SPLIT_KV=0):`` takes
effect at once, and no module caches a copy. Options of a running engine are not switches: they live in its frozen
``EngineConfig``. ``python -m gearshift.envs`` prints the table with the current values.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "torch", "fla")


def _auto_bool(raw: str) -> bool | None:
    return {"auto": None, "1": True, "0": False}[raw]


def _flag(raw: str) -> bool:
    return raw != "0"


def _split_kv(raw: str) -> int:
    if raw == "auto":
        return -1
    value = int(raw)
    if value < 0:
        raise ValueError("must be auto, 0 or a positive chunk size")
    return value


def _progress(raw: str) -> bool | None:
    return None if raw == "auto" else raw.strip().lower() not in ("0", "false", "no")


def _text(value: Any) -> str:
    """A Python value as the variable's text: True / False / None as 1 / 0 / auto, anything else as str()."""
    if value is None or isinstance(value, bool):
        return {True: "1", False: "0", None: "auto"}[value]
    return str(value)


@dataclass(frozen=True)
class Switch:
    """One environment variable: its default, how its text becomes a value, and what it does."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def var(self) -> str:
        return f"GEARSHIFT_{self.name}"

    def read(self) -> Any:
        raw = os.environ.get(self.var)
        return self.value_of(self.default if raw is None or raw == "" else raw)

    def value_of(self, raw: str) -> Any:
        """What the text ``raw`` means for this switch; a ValueError naming the variable when it means nothing."""
        if self.choices is not None and raw not in self.choices:
            raise ValueError(f"{self.var}={raw!r}: choose from {', '.join(self.choices)}")
        try:
            return self.parse(raw)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{self.var}={raw!r}: {exc}") from None


SWITCHES: dict[str, Switch] = {
    s.name: s
    for s in (
        Switch("BACKEND", "auto", str, "delta-rule kernels: fla (CUDA), torch (reference) or auto", BACKENDS),
        Switch(
            "TRAIN_BACKEND",
            "auto",
            str,
            "delta-rule kernels for calls that need gradients (auto: as BACKEND)",
            BACKENDS,
        ),
        Switch("GDN_VIA_KDA", "1", _flag, "GDN may train through fla's KDA kernels (0: never)", ("0", "1")),
        Switch("TRAIN_COMPILE", "1", _flag, "torch.compile of training's layer blocks and losses", ("0", "1")),
        Switch(
            "COMPILE",
            "auto",
            str,
            "fused inference ops via torch.compile: auto (in CUDA graphs), 1 (always, CPU too), 0",
            ("auto", "0", "1"),
        ),
        Switch("SPLIT_KV", "auto", _split_kv, "split-KV decode attention: auto, 0 (never) or a chunk of N keys"),
        Switch("CUDNN_SDPA", "auto", _auto_bool, "SDPA on cuDNN's kernels: auto (long keys), 1, 0", ("auto", "0", "1")),
        Switch("FLEX", "1", _flag, "flex attention for masked CUDA training (0: dense-mask SDPA)", ("0", "1")),
        Switch(
            "GROUP_STREAMS",
            "auto",
            _auto_bool,
            "engine mixer groups on their own CUDA streams: auto (CUDA), 1, 0",
            ("auto", "0", "1"),
        ),
        Switch("PROGRESS", "auto", _progress, "progress bars: 1 / 0 force on / off (auto: on a terminal)"),
    )
}


def __getattr__(name: str) -> Any:
    """``envs.NAME``: the switch's current value (read now, checked, typed)."""
    switch = SWITCHES.get(name)
    if switch is None:
        raise AttributeError(f"module 'gearshift.envs' has no switch {name!r}; known: {', '.join(SWITCHES)}")
    return switch.read()


def _texts(values: dict[str, Any]) -> dict[str, str]:
    """The variables' texts for these switch values, each checked as the environment's would be."""
    unknown = set(values) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown switch(es) {sorted(unknown)}; known: {', '.join(SWITCHES)}")
    texts = {name: _text(value) for name, value in values.items()}
    for name, text in texts.items():
        SWITCHES[name].value_of(text)  # a bad value fails here, not at its first use
    return texts


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set switches inside a block (``override(SPLIT_KV=0, CUDNN_SDPA="auto")``), restoring them after; values are
    written as the variable's text, so they are checked as the environment's would be. Process-wide."""
    texts = _texts(values)
    saved = {name: os.environ.get(SWITCHES[name].var) for name in values}
    try:
        for name, text in texts.items():
            os.environ[SWITCHES[name].var] = text
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(SWITCHES[name].var, None)
            else:
                os.environ[SWITCHES[name].var] = old


def assign(**values: Any) -> None:
    """Set switches for the rest of the process and the processes it starts, checked as ``override`` checks them
    (``assign(TRAIN_BACKEND="torch")``: a build moves training to the PyTorch path after a kernel failed)."""
    for name, text in _texts(values).items():
        os.environ[SWITCHES[name].var] = text


def table(now: bool = True) -> str:
    """The switches as a Markdown table: variable, default, current value (``now``; without it, the table that
    README.md's "Configuration" holds) and meaning."""
    rows = ["| variable | default | now | meaning |", "|---|---|---|---|"]
    if not now:
        rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SWITCHES.values():
        value = f" {os.environ.get(s.var, '') or s.default} |" if now else ""
        rows.append(f"| `{s.var}` | {s.default} |{value} {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
