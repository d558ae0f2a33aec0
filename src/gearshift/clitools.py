"""What every ``gearshift`` command shares: help that shows defaults, argument types with one-line errors, the
extra each stage needs, output directories that are never overwritten silently, and interrupts without tracebacks.

Nothing here imports torch: ``gearshift --help`` and ``gearshift info`` must start in a blink.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import envs

# the PyPI name of a module, where they differ
PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow"}


class CliError(ValueError):
    """Bad command-line input that the command reports in one line (exit code 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help, except where there is no default worth showing (None, False,
    an empty list) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        shown = shown.replace("%", "%%")  # the help is a format string
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the defaults-showing formatter (sub-parsers inherit the class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = _bounded_int(1)
nonnegative_int = _bounded_int(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def missing_extra_message(exc: ModuleNotFoundError, command: str, extra: str | None) -> str | None:
    """One line naming the pip command for a third-party module a command lacks (None: not a missing extra)."""
    top = (exc.name or "").split(".")[0]
    if not top or top == "gearshift":
        return None
    package = PIP_NAMES.get(top, top)
    fix = f"pip install 'gearshift[{extra}]'" if extra else f"pip install {package}"
    return f"gearshift {command} needs the {package} package, which is not installed: {fix}"


def check_output_dir(path: str | Path, overwrite: bool, *, source: str | Path | None = None) -> None:
    """Refuse to write a checkpoint over an existing, non-empty directory (or over ``source``, the checkpoint being
    read) unless ``overwrite``: the user's trained weights must never vanish without a word."""
    out = Path(path)
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise CliError(f"{out} exists and is not a directory")
    if source is not None and out.resolve() == Path(source).resolve():
        raise CliError(
            f"{out} is the checkpoint being read: writing there replaces it (mixers and presets it drops are lost); "
            "give another output directory, or pass --overwrite"
        )
    if any(out.iterdir()):
        what = "a checkpoint" if (out / "config.json").exists() else "not empty"
        raise CliError(f"{out} exists ({what}); give another output directory, or pass --overwrite to replace it")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="write over an existing checkpoint in the output directory")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler or ``kill``) handled like Ctrl-C: one path for clean shutdown."""

    def raise_interrupt(signum, frame):  # noqa: ARG001 - the signal handler signature
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_disabled() -> bool | None:
    """tqdm's ``disable`` value: GEARSHIFT_PROGRESS=1 / 0 forces bars on / off; by default they show on a terminal."""
    shown = envs.PROGRESS
    return None if shown is None else not shown


def progress(
    iterable=None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    **kwargs,
):
    """A tqdm progress bar on stderr with rate and ETA (see ``progress_disabled``); ``enabled=False`` hides it."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=progress_disabled() if enabled else True,
        **kwargs,
    )


def progress_write(bar, message: str) -> None:
    """A log line that does not tear an active progress bar."""
    if bar is not None and not bar.disable:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
