"""Choosing the kernel for the delta rule: fla's Triton kernels on CUDA, the pure-PyTorch forms elsewhere.

The choice is made by device, never by whether fla imports: on a CPU machine with triton installed, fla imports
but every kernel fails at call time. ``GEARSHIFT_BACKEND=torch`` (or ``use_backend("torch")``) forces the
reference path on any device, which is how the fla path is verified on the GPU; ``GEARSHIFT_TRAIN_BACKEND=torch``
does so only where gradients are wanted (training), keeping the kernels for inference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import re
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .delta_rule import chunk_delta_rule, recurrent_delta_rule, wants_grad

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


@functools.cache
def _fla_recurrent_in_place():
    """fla's per-channel-decay recurrent forward that can write the final state over the initial one
    (``fused_recurrent_kda_fwd(inplace_final_state=True)``, fla-core 0.6), or None where this fla lacks it."""
    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    except Exception:  # noqa: BLE001 - an fla without it decodes through the public kernels and a copy
        return None
    if "inplace_final_state" not in inspect.signature(fused_recurrent_kda_fwd).parameters:
        return None
    return fused_recurrent_kda_fwd


def backend_for(device: torch.device, training: bool = False) -> str:
    """The delta-rule backend for a call on ``device``; ``training`` (gradients wanted) also honours
    ``GEARSHIFT_TRAIN_BACKEND``, so training can take the reference path while inference keeps the kernels."""
    name = _forced[-1] if _forced else os.environ.get("GEARSHIFT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"GEARSHIFT_BACKEND={name!r} is not one of {BACKENDS}")
    if training and not _forced and os.environ.get("GEARSHIFT_TRAIN_BACKEND", "auto") != "auto":
        name = os.environ["GEARSHIFT_TRAIN_BACKEND"]
        if name not in BACKENDS:
            raise ValueError(f"GEARSHIFT_TRAIN_BACKEND={name!r} is not one of {BACKENDS}")
    if name == "auto":
        name = "fla" if device.type == "cuda" else "torch"
    if name == "fla":
        if device.type != "cuda":
            raise RuntimeError("the fla backend needs a CUDA device; use the torch backend on CPU")
        if _fla_ops() is None:
            return "torch"
    return name


def gated_backward_broken(capability: tuple[int, int], triton_version: str | None, has_tilelang: bool) -> bool:
    """Whether fla's GDN (scalar-gate) chunk backward is unusable: on Hopper with Triton in [3.4, 3.7.1) it gives
    wrong gradients, so fla raises in the backward pass unless tilelang is installed (fla issue #640)."""
    if triton_version is None or has_tilelang:
        return False
    parts = re.findall(r"\d+", triton_version)[:3]
    version = tuple(int(x) for x in parts) + (0,) * (3 - len(parts))
    return capability[0] == 9 and (3, 4, 0) <= version < (3, 7, 1)


@functools.cache
def _gdn_backward_broken_on(index: int) -> bool:
    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    has_tilelang = importlib.util.find_spec("tilelang") is not None
    broken = gated_backward_broken(torch.cuda.get_device_capability(index), version, has_tilelang)
    if broken:
        warnings.warn(
            f"fla's GDN backward is wrong on this GPU with Triton {version} (fla #640): GDN layers train on the "
            "pure-PyTorch path (forward-only use keeps fla). Triton >= 3.7.1 or tilelang lifts this.",
            stacklevel=3,
        )
    return broken


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    record_last: int = 0,
    in_place: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the gated delta rule (GDN when g is [B,T,HV], KDA when g is [B,T,HV,K]).

    Returns (o, final fp32 state, states after each of the last ``record_last`` tokens or None). The recorded
    tail always runs token by token, so roll-back points cost no recomputation later.
    ``in_place``: the final state is written over ``initial_state`` (contiguous fp32), which is returned. A
    serving engine's state pools then need no copy-back: at the 15B shape, 2 MB a row and layer, which took a
    fifth of a GDN-heavy decode step at batch 249 on the H200. Not with ``record_last``.
    """
    if in_place and (record_last or initial_state is None):
        raise ValueError("in_place needs an initial state and no recorded tail")
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
    training = wants_grad(q, k, v, g, beta)
    if backend_for(q.device, training) == "fla" and not (training and not _fla_trainable(q, g.dim() == 4)):
        o, state = _fla_delta_rule(q, k, v, g, beta, scale, initial_state, in_place)
    elif t == 1 or (t <= 16 and not torch.is_grad_enabled()):
        o, state = recurrent_delta_rule(q, k, v, g, beta, scale, initial_state)
    else:
        o, state = chunk_delta_rule(q, k, v, g, beta, scale, initial_state)
    if in_place and state is not initial_state:  # a path without an in-place kernel: the same contract, by copy
        state = initial_state.copy_(state)
    return o, state, None


def delta_rule_gradients_agree(
    fn,
    reference,
    per_channel: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, int, int, int] = (2, 192, 2, 64),
    min_cosine: float = 0.99,
) -> tuple[bool, float]:
    """Whether ``fn``'s gradients (inputs in ``dtype``) point where the fp32 ``reference``'s do, on random
    delta-rule inputs shaped like a layer's: (agree, lowest cosine over q, k, v, g, beta and the output).

    A kernel can run and still return wrong gradients (fla #640 did, on one GPU and Triton range): training on
    it would silently not learn, so its gradients are checked once before the first training step uses it."""
    b, t, h, d = shape
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).to(device)

    q = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    k = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    v, beta = rand(b, t, h, d), torch.sigmoid(rand(b, t, h))
    g = (
        torch.nn.functional.logsigmoid(rand(b, t, h, d) + 4)
        if per_channel
        else -torch.rand(b, t, h, generator=gen).to(device)
    )
    weight = rand(b, t, h, d)
    results = []
    for impl, kind in ((reference, torch.float32), (fn, dtype)):
        leaves = [
            x.to(kind if i < 3 else torch.float32).clone().requires_grad_() for i, x in enumerate((q, k, v, g, beta))
        ]
        with torch.autocast(torch.device(device).type, enabled=False), torch.enable_grad():
            o, _ = impl(*leaves, d**-0.5, None)
            (o.float() * weight).sum().backward()
        results.append([o.detach().float()] + [x.grad.float() for x in leaves])
    cosines = [
        torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        for a, b in zip(*results, strict=True)
    ]
    worst = min(cosines)
    return worst >= min_cosine, worst


def _fla_trainable(q: Tensor, per_channel: bool) -> bool:
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return not (not per_channel and _gdn_backward_broken_on(index)) and _fla_gradients_check(index, per_channel)[0]


def kernel_gradient_checks() -> dict[str, float]:
    """The fla gradient checks run so far in this process: {'kda@cuda:0': lowest cosine, ...}."""
    return {
        f"{'kda' if per_channel else 'gdn'}@cuda:{index}": _fla_gradients_check(index, per_channel)[1]
        for index, per_channel in _checked
    }


_checked: list[tuple[int, bool]] = []


@functools.cache
def _fla_gradients_check(index: int, per_channel: bool) -> tuple[bool, float]:
    device = torch.device("cuda", index)
    try:
        agree, cosine = delta_rule_gradients_agree(
            _fla_delta_rule, chunk_delta_rule, per_channel, device, torch.bfloat16
        )
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run its backward here is not used to train
        warnings.warn(f"fla's backward failed on {device} ({exc})", stacklevel=3)
        agree, cosine = False, float("nan")
    if not agree:
        warnings.warn(
            f"fla's {'KDA' if per_channel else 'GDN'} chunk backward disagrees with the reference on this GPU "
            f"(gradient cosine {cosine:.3f}): these layers train on the pure-PyTorch path (inference keeps fla)",
            stacklevel=3,
        )
    _checked.append((index, per_channel))
    return agree, cosine


_in_place_verdicts: dict[tuple[int, bool], bool] = {}


def _in_place_usable(device: torch.device, per_channel: bool) -> bool:
    """Whether decoding may use ``_fla_recurrent_in_place``: it exists, and on this GPU it gives what fla's public
    decode kernel gives (output and final state, written in place) on random inputs. Checked once per GPU and
    kind, in an eager call: never inside a graph capture, whose eager warm-up step has checked already."""
    if _fla_recurrent_in_place() is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, per_channel)
    if key not in _in_place_verdicts:
        if torch.cuda.is_current_stream_capturing():
            return False
        _in_place_verdicts[key] = in_place_decode_agrees(torch.device("cuda", index), per_channel)
    return _in_place_verdicts[key]


def in_place_decode_agrees(device: torch.device, per_channel: bool, atol: float = 1e-4) -> bool:
    """fla's in-place recurrent forward against its public decode kernel (GDN: ``fused_recurrent_gated_delta_rule``,
    the decay broadcast over K for the in-place one; KDA: ``fused_recurrent_kda``), fp32, random inputs shaped
    like a layer's. A kernel that runs can still compute something else; decoding keeps the public kernels
    (and a copy of the state) if these disagree."""
    _, public_gdn, _, public_kda = _fla_ops()
    gen = torch.Generator().manual_seed(0)
    b, t, h, hv, d = 2, 3, 2, 4, 64

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).to(device)

    q = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    k = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    v, beta, state = rand(b, t, hv, d), torch.rand(b, t, hv, generator=gen).to(device), rand(b, hv, d, d)
    g = -torch.rand(b, t, hv, d, generator=gen).to(device)
    if not per_channel:
        g = g[..., :1].expand(b, t, hv, d).contiguous()  # one decay per head, broadcast over K
    public = public_kda if per_channel else public_gdn
    try:
        with torch.no_grad():
            ref_o, ref_state = public(
                q, k, v, g=g if per_channel else g[..., 0], beta=beta, scale=d**-0.5,
                initial_state=state.clone(), output_final_state=True,
            )  # fmt: skip
            fwd = _fla_recurrent_in_place()
            o, final = fwd(q, k, v, g, beta, initial_state=state, scale=d**-0.5, output_final_state=True,
                           inplace_final_state=True)  # fmt: skip
        agree = (
            final.data_ptr() == state.data_ptr()
            and torch.allclose(o.float(), ref_o.float(), atol=atol)
            and torch.allclose(state, ref_state.float(), atol=atol)
        )
    except Exception as exc:  # noqa: BLE001 - a kernel that fails here is not used
        warnings.warn(f"fla's in-place recurrent forward failed on {device} ({exc})", stacklevel=3)
        return False
    if not agree:
        warnings.warn(
            f"fla's in-place recurrent forward disagrees with its {'KDA' if per_channel else 'GDN'} decode kernel on "
            f"{device}: decoding keeps the public kernel and copies the state back",
            stacklevel=3,
        )
    return agree


def _fla_delta_rule(q, k, v, g, beta, scale, initial_state, in_place=False):
    chunk_gdn, recurrent_gdn, chunk_kda, recurrent_kda = _fla_ops()
    per_channel = g.dim() == 4
    decoding = q.shape[1] <= 64 and not torch.is_grad_enabled()
    dtype = v.dtype  # autocast can leave q/k/v in different dtypes; the kernels want one
    q, k = q.to(dtype), k.to(dtype)
    g = g.float()
    state = None if initial_state is None else initial_state.float()
    fwd = _fla_recurrent_in_place() if decoding and _in_place_usable(q.device, per_channel) else None
    if fwd is not None:
        # decode through the per-channel kernel for GDN too (its scalar decay broadcast over K: the same
        # recurrence), writing the final state over the initial one when asked and possible
        if not per_channel:
            g = g[..., None].expand(*g.shape, k.shape[-1])
        args = [x.contiguous() for x in (q, k, v, g, beta.to(dtype))]
        over = in_place and state.is_contiguous()  # else delta_rule copies the new state over the old
        init = state if state is None or over else state.contiguous()
        return fwd(*args, initial_state=init, scale=scale, output_final_state=True, inplace_final_state=over)
    kwargs = dict(scale=scale, initial_state=state, output_final_state=True)
    if per_channel:
        fn = recurrent_kda if decoding else chunk_kda
    else:
        fn = recurrent_gdn if decoding else chunk_gdn
    o, final = fn(q, k, v, g=g, beta=beta.to(dtype), **kwargs)
    return o, final.float()
