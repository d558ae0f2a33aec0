"""Choosing the kernel for the delta rule: fla's Triton kernels on CUDA, the pure-PyTorch forms elsewhere.

The choice is made by device, never by whether fla imports: on a CPU machine with triton installed, fla imports
but every kernel fails at call time. ``GEARSHIFT_BACKEND=torch`` (or ``use_backend("torch")``) forces the
reference path on any device, which is how the fla path is verified on the GPU; ``GEARSHIFT_TRAIN_BACKEND=torch``
does so only where gradients are wanted (training), keeping the kernels for inference.

Training (and packed rows) run fla's varlen chunk kernels: the batch flattened to one row, its documents (or rows)
given by ``cu_seqlens``, so one kernel variant serves packed and unpacked data. Before a kernel trains, its
gradients are checked once per GPU against the reference on packed random inputs (``delta_rule_gradients_agree``).
GDN trains through fla's GDN kernel where that passes; where it does not (fla #640: Hopper with Triton in
[3.4, 3.7.1) refuses GDN's backward), through fla's KDA kernel with GDN's decay broadcast over the key channels --
the same recurrence, since a decay that is one scalar per head is a diagonal with equal entries -- checked the same
way against GDN's reference (``GEARSHIFT_GDN_VIA_KDA=0`` turns this route off). Only if every check fails does a
layer train on the PyTorch chunk form, compiled on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import re
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .. import envs
from ..envs import BACKENDS
from .delta_rule import chunk_delta_rule, recurrent_delta_rule, wants_grad
from .documents import Documents


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the delta-rule backend inside a ``with`` block: 'torch', 'fla' or 'auto' -- for training too (the
    block's ``GEARSHIFT_BACKEND``, with ``GEARSHIFT_TRAIN_BACKEND`` back to following it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    with envs.override(BACKEND=name, TRAIN_BACKEND="auto"):
        yield


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
    name = envs.BACKEND
    if training and envs.TRAIN_BACKEND != "auto":
        name = envs.TRAIN_BACKEND
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
    documents: Documents | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run the gated delta rule (GDN when g is [B,T,HV], KDA when g is [B,T,HV,K]).

    Returns (o, final fp32 state, states after each of the last ``record_last`` tokens or None). The recorded
    tail always runs token by token, so roll-back points cost no recomputation later.
    ``in_place``: the final state is written over ``initial_state`` (contiguous fp32), which is returned. A
    serving engine's state pools then need no copy-back: at the 15B shape, 2 MB a row and layer, which took a
    fifth of a GDN-heavy decode step at batch 249 on the H200. Not with ``record_last``.
    ``documents``: the rows are packed documents, the state restarts at each; no cache then, and no final state
    (None is returned for it). Runs in eager mode even inside compiled code (the kernels are opaque to it).
    """
    if torch.compiler.is_compiling():  # inside a compiled block: the kernels (and their checks) run eagerly
        return _eager_delta_rule(q, k, v, g, beta, scale, initial_state, record_last, in_place, documents)
    if in_place and (record_last or initial_state is None):
        raise ValueError("in_place needs an initial state and no recorded tail")
    if documents is not None and (record_last or initial_state is not None):
        raise ValueError("packed documents start from an empty state and record nothing (no cache)")
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
    per_channel = g.dim() == 4
    fla = backend_for(q.device, training) == "fla"
    starts = None if documents is None or documents.single else documents.starts
    varlen = None  # training and packed rows: fla's varlen kernel ('gdn' or 'kda'), if one may run here
    if fla and (training or documents is not None):
        heads = (q.shape[2], v.shape[2], q.shape[3])
        varlen = training_kernel(q.device, per_channel, heads) if training else ("kda" if per_channel else "gdn")
        fla = varlen is not None
    if varlen is not None:
        o, state = _fla_varlen(q, k, v, g, beta, scale, initial_state, varlen, documents)
    elif fla:
        o, state = _fla_delta_rule(q, k, v, g, beta, scale, initial_state, in_place)
    elif t == 1 or (t <= 16 and not torch.is_grad_enabled()):
        o, state = recurrent_delta_rule(q, k, v, g, beta, scale, initial_state, starts=starts)
    else:
        o, state = _reference_chunks(q, k, v, g, beta, scale, initial_state, starts, training)
    if documents is not None:
        return o, None, None
    if in_place and state is not initial_state:  # a path without an in-place kernel: the same contract, by copy
        state = initial_state.copy_(state)
    return o, state, None


_eager_delta_rule = torch.compiler.disable(delta_rule)


def _reference_chunks(q, k, v, g, beta, scale, initial_state, starts, training):
    """The PyTorch chunk form; when training on CUDA (no usable kernel there), with its per-block math compiled."""
    return chunk_delta_rule(q, k, v, g, beta, scale, initial_state, starts=starts, compiled=training and q.is_cuda)


def delta_rule_gradients_agree(
    fn,
    reference,
    per_channel: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, int, int, int] = (2, 192, 2, 64),
    min_cosine: float = 0.99,
    packed: bool = False,
    value_heads: int | None = None,
) -> tuple[bool, float]:
    """Whether ``fn``'s gradients (inputs in ``dtype``) point where the fp32 ``reference``'s do, on random
    delta-rule inputs shaped like a layer's: (agree, lowest cosine over q, k, v, g, beta and the output).

    A kernel can run and still return wrong gradients (fla #640 did, on one GPU and Triton range): training on
    it would silently not learn, so its gradients are checked once before the first training step uses it.
    ``packed``: the rows hold several documents (a boundary inside a chunk, one on a chunk's edge, a document
    shorter than a chunk), passed to both as ``starts=`` [B, T] bool. ``value_heads``: v, g and beta have that many
    heads, q and k ``shape``'s (grouped value heads, as GDN's)."""
    b, t, h, d = shape
    hv = value_heads or h
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen).to(device)

    q = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    k = torch.nn.functional.normalize(rand(b, t, h, d), dim=-1)
    v, beta = rand(b, t, hv, d), torch.sigmoid(rand(b, t, hv))
    g = (
        torch.nn.functional.logsigmoid(rand(b, t, hv, d) + 4)
        if per_channel
        else -torch.rand(b, t, hv, generator=gen).to(device)
    )
    weight = rand(b, t, hv, d)
    extra = {}
    if packed:
        starts = torch.zeros(b, t, dtype=torch.bool)
        starts[:, 0] = True
        starts[0, [t // 3, t // 3 + 5, 2 * (t // 3) // 64 * 64 or 1]] = True
        starts[-1, [37, t - 9]] = True
        extra["starts"] = starts.to(device)
    results = []
    for impl, kind in ((reference, torch.float32), (fn, dtype)):
        leaves = [
            x.to(kind if i < 3 else torch.float32).clone().requires_grad_() for i, x in enumerate((q, k, v, g, beta))
        ]
        with torch.autocast(torch.device(device).type, enabled=False), torch.enable_grad():
            o, _ = impl(*leaves, d**-0.5, None, **extra)
            (o.float() * weight).sum().backward()
        results.append([o.detach().float()] + [x.grad.float() for x in leaves])
    cosines = [
        torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        for a, b in zip(*results, strict=True)
    ]
    worst = min(cosines)
    return worst >= min_cosine, worst


KERNELS = ("gdn", "kda", "gdn-via-kda")  # kernels that may train, by what they compute: GDN, KDA, GDN on KDA's


def training_kernel(device: torch.device, per_channel: bool, heads: tuple[int, int, int] = (2, 2, 64)) -> str | None:
    """The fla kernel that trains KDA (per_channel) or GDN layers of these ``heads`` (key heads, value heads, head
    dim) on this GPU: 'gdn' or 'kda' (for GDN: its decay broadcast over K), or None for the PyTorch path. Each
    candidate's gradients are checked first, once per GPU and head shape (so the check compiles the very kernel
    variants training then runs)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if per_channel:
        return "kda" if _gradients_check(index, "kda", heads)[0] else None
    if not _gdn_backward_broken_on(index) and _gradients_check(index, "gdn", heads)[0]:
        return "gdn"
    if envs.GDN_VIA_KDA and _gradients_check(index, "gdn-via-kda", heads)[0]:
        return "kda"
    return None


def kernel_gradient_checks() -> dict[str, float]:
    """The fla gradient checks run so far in this process: {'kda@cuda:0 heads 9/9 dim 64': lowest cosine, ...}."""
    return {
        f"{name}@cuda:{index} heads {h}/{hv} dim {d}": _gradients_check(index, name, (h, hv, d))[1]
        for index, name, (h, hv, d) in _checked
    }


_checked: list[tuple[int, str, tuple[int, int, int]]] = []


@functools.cache
def _gradients_check(index: int, name: str, heads: tuple[int, int, int]) -> tuple[bool, float]:
    """fla's varlen kernel ``name`` (KERNELS) against the PyTorch chunk form on packed bf16 inputs with these
    (key heads, value heads, head dim)."""
    device = torch.device("cuda", index)
    kernel = "gdn" if name == "gdn" else "kda"
    h, hv, d = heads

    def fla(q, k, v, g, beta, scale, state, starts):
        return _fla_varlen(q, k, v, g, beta, scale, state, kernel, Documents.from_starts(starts))

    try:
        agree, cosine = delta_rule_gradients_agree(
            fla, chunk_delta_rule, name == "kda", device, torch.bfloat16, (2, 192, h, d), packed=True, value_heads=hv
        )
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run its backward here is not used to train
        warnings.warn(f"fla's {name} backward failed on {device} ({exc})", stacklevel=3)
        agree, cosine = False, float("nan")
    if not agree:
        warnings.warn(
            f"fla's {name} chunk backward disagrees with the reference on this GPU (gradient cosine {cosine:.3f}): "
            "it does not train here",
            stacklevel=3,
        )
    _checked.append((index, name, heads))
    return agree, cosine


def _fla_varlen(q, k, v, g, beta, scale, initial_state, kernel: str, documents: Documents | None):
    """fla's chunk kernel ('gdn' or 'kda') over the batch flattened to one row, whose documents (the rows when
    ``documents`` is None) ``cu_seqlens`` delimits. GDN's scalar decay is broadcast over K for the KDA kernel.
    Returns (o [B, T, HV, V], the final state per row or None with documents)."""
    chunk_gdn, _, chunk_kda, _ = _fla_ops()
    b, t = q.shape[:2]
    if documents is None:
        cu_cpu = torch.arange(0, (b + 1) * t, t, dtype=torch.int64)
        cu = cu_cpu.to(q.device)
    else:
        cu, cu_cpu = documents.cu_seqlens, documents.cu_seqlens_cpu
    dtype = v.dtype  # autocast can leave q/k/v in different dtypes; the kernels want one
    q, k = q.to(dtype), k.to(dtype)
    g = g.float()
    if kernel == "kda" and g.dim() == 3:
        g = g[..., None].expand(*g.shape, q.shape[-1])
    fn = chunk_kda if kernel == "kda" else chunk_gdn

    def flat(x: Tensor) -> Tensor:
        return x.reshape(1, b * t, *x.shape[2:])

    o, final = fn(
        flat(q), flat(k), flat(v), g=flat(g), beta=flat(beta.to(dtype)), scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=documents is None, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu,
    )  # fmt: skip
    return o.reshape(b, t, *o.shape[2:]), None if final is None else final.float()


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
