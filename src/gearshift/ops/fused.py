"""Chains of small element-wise ops fused into one kernel each by torch.compile, for inference on CUDA.

A decode step is memory- and launch-bound: an RMSNorm written in plain PyTorch is six kernels, a GDN layer's
gates and norms two dozen, and a batch that mixes presets runs one such chain per mixer group (the engine's
mixed steps launch about twice the kernels of a single-preset step: benchmarks/engine_mixed.py --profile,
BENCHMARKS.md, "Mixed-preset batches"). ``@fusible`` marks a pure function
of tensors whose eager body is the reference; where fusion is active, calls go to a ``torch.compile`` version of
the same body (dynamic shapes, one graph, no breaks). Fusion is for decode steps captured in CUDA graphs (see
``fusion_active``): the engine's graphs and ``Supernet.generate``'s. Training (gradients on), eager calls and the
CPU run the eager body, so CI tests the math and the H200 verifies the compiled kernels against it
(``benchmarks/engine_graphs.py``: graphs vs eager token for token, fused vs eager logits).

``GEARSHIFT_COMPILE``: ``auto`` (default: CUDA graphs), ``0`` (never), ``1`` (every inference call, also on the
CPU: slow to compile, for checking the compiled path without a GPU). ``fusion(True)`` turns it on inside a block
(the warm-up before a capture), ``fusion(False)`` off (benchmarks). A compile failure warns once and that
function stays eager.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

from .. import envs

_switched: list[bool] = []  # fusion() blocks, innermost last

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Turn the compiled paths on (unless GEARSHIFT_COMPILE is 0) or off inside a ``with`` block."""
    _switched.append(enabled)
    try:
        yield
    finally:
        _switched.pop()


def fusion_active(device: torch.device) -> bool:
    """Whether a fusible call on ``device`` runs compiled now. On CUDA (``auto``): inside a CUDA-graph capture or a
    ``fusion(True)`` block (the warm-up steps that compile before a capture). A graph replays the fused kernels
    for free, while an eager call pays dynamo's guards and inductor's wrapper on the host: on the H200 a prefill
    forward of the SmolLM2 supernet took 339 ms with compiled bodies against 266 ms eager, while a decode step
    replayed from a graph took 3.0 ms fused against 4.3-4.9 ms."""
    if False in _switched or torch.is_grad_enabled():  # an outer fusion(False) wins
        return False
    mode = envs.COMPILE
    if mode == "0":
        return False
    if mode == "1":
        return True
    return device.type == "cuda" and (bool(_switched) or _capturing())


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def fusible(fn: F) -> F:
    """Run ``fn`` compiled where ``fusion_active`` says so, else eagerly; ``fn.eager`` is the plain body."""
    compiled: list[Callable | None] = [None]
    failed: list[bool] = [False]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        first = next(a for a in args if isinstance(a, Tensor))
        if failed[0] or torch.compiler.is_compiling() or not fusion_active(first.device):
            return fn(*args, **kwargs)
        if compiled[0] is None:
            _allow_variants()
            compiled[0] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            if first.is_cuda and _capturing():
                # inside a CUDA-graph capture nothing may compile (it runs kernels); callers warm up first, and a
                # shape never seen before runs the eager body into the graph instead
                with torch.compiler.set_stance("eager_on_recompile"):
                    return compiled[0](*args, **kwargs)
            return compiled[0](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep serving on the eager body
            failed[0] = True
            warnings.warn(f"torch.compile of {fn.__name__} failed ({exc}); it runs eagerly", stacklevel=2)
            return fn(*args, **kwargs)

    call.eager = fn  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def _allow_variants() -> None:
    """Each body compiles a few variants (dtypes, one token or many, one row or many): allow more than dynamo's
    default of 8 per function before it stops compiling."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)


# ---------------------------------------------------------------------------------------------- the fused chains
@fusible
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x), computed in fp32 and cast back before the scale (the Llama/Mistral convention)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@fusible
def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (the q/k normalisation of GDN and KDA)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@fusible
def activate_qkv(
    y: Tensor, key_dim: int, key_head_dim: int, value_head_dim: int, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The short conv's output [B, T, q | k | v] -> q, k (L2-normalised per head), v, each [B, T, heads, dim] and
    contiguous (the delta-rule kernels want that): the activation (silu or sigmoid) and both norms in one pass."""
    b, t, _ = y.shape
    act = torch.sigmoid(y) if activation == "sigmoid" else torch.nn.functional.silu(y)
    q, k, v = act.split([key_dim, key_dim, act.shape[-1] - 2 * key_dim], dim=-1)
    q = l2norm(q.reshape(b, t, -1, key_head_dim))
    k = l2norm(k.reshape(b, t, -1, key_head_dim))
    return q, k, v.reshape(b, t, -1, value_head_dim).contiguous()


@fusible
def gated_rms_norm(x: Tensor, weight: Tensor, gate: Tensor, eps: float, activation: str) -> Tensor:
    """weight * rmsnorm(x) * act(gate), per head over the last dim (the output norm of GDN and KDA)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    act = torch.sigmoid(gate.float()) if activation == "sigmoid" else torch.nn.functional.silu(gate.float())
    return (y.float() * act).to(x.dtype)


@fusible
def gated_activation(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """act(gate) * up, the gated MLP's hidden (SwiGLU and its relatives)."""
    return ACTIVATIONS[activation](gate) * up


@fusible
def decay_gates(a: Tensor, beta_logit: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The delta rule's log-decay g = -exp(A_log) * softplus(a + dt_bias) and write strength beta =
    sigmoid(beta_logit), in fp32. ``A_log`` broadcasts against ``a``: per head (GDN) or per head and channel (KDA)."""
    g = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(beta_logit.float())


@fusible
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D]; non-interleaved rotate-half convention (mistral_1d / Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": torch.relu,
}
