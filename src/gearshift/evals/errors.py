"""The one error type evaluations raise for bad input, so the CLI can print it instead of a traceback."""

from __future__ import annotations


class EvalError(ValueError):
    """Evaluation input gearshift cannot use: an unknown task, a missing data package, a too-long context."""


class DataPackageMissing(EvalError):
    """An evaluation data package (read by path, never imported) is not installed."""
