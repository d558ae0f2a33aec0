"""Choosing the kernel for the delta rule: fla's Triton kernels on CUDA, the pure-PyTorch forms elsewhere.

The choice is made by device, never by whether fla imports: on a CPU machine with triton installed, fla imports
but every kernel fails at call time. ``GEARSHIFT_BACKEND=torch`` (or ``use_backend("torch")``) forces the
reference path on any device, which is how the fla path is verified on the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .delta_rule import chunk_delta_rule, recurrent_delta_rule

_forced: list[str] = []
BACKENDS = ("auto", "torch", "fla")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the delta-rule backend inside a ``with`` block: 'torch', 'fla' or 'auto'."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


@functools.cache
def _fla_ops():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception as exc:  # noqa: BLE001 - any import failure means: no fla here
        warnings.warn(f"fla-core is not usable ({exc}); GDN/KDA run on the pure-PyTorch path", stacklevel=3)
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_kda, fused_recurrent_kda


def backend_for(device: torch.device) -> str:
    name = _forced[-1] if _forced else os.environ.get("GEARSHIFT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"GEARSHIFT_BACKEND={name!r} is not one of {BACKENDS}")
    if name == "auto":
        name = "fla" if device.type == "cuda" else "torch"
    if name == "fla":
        if device.type != "cuda":
            raise RuntimeError("the fla backend needs a CUDA device; use the torch backend on CPU")
        if _fla_ops() is None:
            return "torch"
    return name


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    record_last: int = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the gated delta rule (GDN when g is [B,T,HV], KDA when g is [B,T,HV,K]).

    Returns (o, final fp32 state, states after each of the last ``record_last`` tokens or None). The recorded
    tail always runs token by token, so roll-back points cost no recomputation later.
    """
    t = q.shape[1]
    r = min(record_last, t)
    if r:
        split = t - r
        o1, mid, _ = (
            delta_rule(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], scale, initial_state)
            if split
            else (None, initial_state, None)
        )
        o2, state, states = recurrent_delta_rule(
            q[:, split:],
            k[:, split:],
            v[:, split:],
            g[:, split:],
            beta[:, split:],
            scale,
            mid,
            return_states=True,
        )
        if mid is None:
            mid = torch.zeros_like(state)
        o = o2 if o1 is None else torch.cat([o1, o2], dim=1)
        return o, state, torch.cat([mid[:, None], states], dim=1)
    if t == 0:
        raise ValueError("empty input")
    if backend_for(q.device) == "fla":
        o, state = _fla_delta_rule(q, k, v, g, beta, scale, initial_state)
        return o, state, None
    if t == 1 or (t <= 16 and not torch.is_grad_enabled()):
        o, state = recurrent_delta_rule(q, k, v, g, beta, scale, initial_state)
    else:
        o, state = chunk_delta_rule(q, k, v, g, beta, scale, initial_state)
    return o, state, None


def _fla_delta_rule(q, k, v, g, beta, scale, initial_state):
    chunk_gdn, recurrent_gdn, chunk_kda, recurrent_kda = _fla_ops()
    per_channel = g.dim() == 4
    decoding = q.shape[1] <= 64 and not torch.is_grad_enabled()
    g = g.float()
    state = None if initial_state is None else initial_state.float()
    kwargs = dict(scale=scale, initial_state=state, output_final_state=True)
    if per_channel:
        fn = recurrent_kda if decoding else chunk_kda
    else:
        fn = recurrent_gdn if decoding else chunk_gdn
    o, final = fn(q, k, v, g=g, beta=beta.to(q.dtype), **kwargs)
    return o, final.float()
