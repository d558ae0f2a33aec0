"""torch.compile for training-size calls, with the eager body kept as the reference and the fallback.

Training on a GPU is bound by kernel launches when every element-wise op of a layer is its own kernel (the H200
saw 40k-160k launches per distillation step). Regional compilation fuses them: ``compiled(fn)`` compiles ``fn``
(static shapes: training shapes repeat) on first use and calls the compiled version after; ``fn.eager`` is the plain
body. Callers decide where to use it (CUDA training, ``Supernet.compile_blocks``); the CPU and CI run the eager
bodies, and the GPU tests check the compiled ones against them. A compile failure warns once and that function
runs eagerly from then on. ``GEARSHIFT_TRAIN_COMPILE=0`` turns every such compile off.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from .. import envs

F = TypeVar("F", bound=Callable)

_switched: list[bool] = []  # compilation() blocks, innermost last
# One function compiles a variant per mixer kind, grad mode, dtype and shape: more than dynamo's default of 8.
RECOMPILE_LIMIT = 256


def compiled(fn: F, *, name: str | None = None, dynamic: bool = False) -> F:
    """``fn`` compiled on first call (see the module docstring); inside code being compiled, the plain body."""
    state: dict = {"fn": None, "failed": False}
    label = name or getattr(fn, "__name__", "function")

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if state["failed"] or torch.compiler.is_compiling() or not compile_enabled():
            return fn(*args, **kwargs)
        if state["fn"] is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
            state["fn"] = torch.compile(fn, dynamic=dynamic)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep training on the eager body
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            state["failed"] = True
            warnings.warn(
                f"torch.compile of {label} failed ({type(exc).__name__}: {exc}); it runs eagerly", stacklevel=2
            )
            return fn(*args, **kwargs)

    call.eager = fn  # type: ignore[attr-defined]
    call.compile_failed = lambda: state["failed"]  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def compile_enabled() -> bool:
    """Whether ``compiled`` functions compile now: the innermost ``compilation`` block says (on outside any), and
    GEARSHIFT_TRAIN_COMPILE=0 overrules it."""
    return (_switched[-1] if _switched else True) and envs.TRAIN_COMPILE


@contextlib.contextmanager
def compilation(enabled: bool) -> Iterator[None]:
    """Turn every ``compiled`` function on (unless GEARSHIFT_TRAIN_COMPILE=0) or off inside a block (benchmarks)."""
    _switched.append(enabled)
    try:
        yield
    finally:
        _switched.pop()
