"""What every mixer sees besides its input: token positions, padding, and shared per-call resources."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import LayerCache, RecurrentStateCache
from ..config import RopeConfig
from ..ops.attention import rope_cos_sin, rope_inv_freq
from ..ops.documents import Documents
from ..ops.fused import rms_norm
from ..state import StateSpec


@dataclass
class StepContext:
    """Positions and padding of the tokens of one forward call.

    ``q_index`` [T]: token indices in the batch timeline (shared by all rows). ``positions`` [B, T]: RoPE
    positions. ``token_mask`` [B, T] bool: real tokens (None when there is no padding in this call).
    ``start`` [B]: first real index of each row when a cache is in use (left padding), else None.
    ``documents``: the rows are packed documents (training): no mixer reads across their boundaries.
    """

    q_index: Tensor
    positions: Tensor
    token_mask: Tensor | None = None
    start: Tensor | None = None
    padded: bool = False  # any padding among the keys (decided once per call, not per layer)
    documents: Documents | None = None
    _rope: dict = field(default_factory=dict)

    def rope(self, head_size: int, rope: RopeConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin for these positions, computed once per call and shared by all layers with the same rope."""
        key = (head_size, rope, dtype)
        if key not in self._rope:
            inv = rope_inv_freq(head_size, rope, self.positions.device)
            self._rope[key] = rope_cos_sin(self.positions, inv, dtype)
        return self._rope[key]

    def document_starts(self) -> Tensor | None:
        """[B, T] bool where a packed row's documents begin, or None when each row is one sequence."""
        return None if self.documents is None or self.documents.single else self.documents.starts

    def key_valid(self, k_index: Tensor) -> Tensor | None:
        """Which keys are real tokens, [B, Tk] (None when every key is)."""
        if not self.padded:
            return None
        if self.start is not None:
            return k_index[None, :] >= self.start[:, None]
        return self.token_mask


class Mixer(nn.Module):
    """A token mixer: [B, T, hidden] -> [B, T, hidden], optionally reading and advancing a layer cache."""

    kind: str

    def fuse_(self) -> None:
        """Lay out the weights that read the same input as one tensor each (``fuse_parameters_``), so inference
        runs one matmul where it ran several. Names, shapes and values do not change."""

    def state_spec(self) -> StateSpec:  # pragma: no cover - interface
        """What this mixer keeps between decode steps (shapes, window, conv tails): the one description that the
        decoding cache, the serving pools, synthetic caches and the cost report derive from."""
        raise NotImplementedError

    def new_cache(self, rollback: int = 0, capacity: int = 0) -> LayerCache:
        """An empty decoding cache for this mixer's state (``rollback``: tokens it can return to)."""
        return self.state_spec().new_cache(rollback, capacity)

    def state_bytes(self, context: int, dtype_bytes: int = 2) -> int:
        """Bytes of decoding state one sequence needs at ``context`` tokens."""
        return self.state_spec().nbytes(context, dtype_bytes)


def fuse_parameters_(params: Sequence[Tensor], stack: bool = False) -> None:
    """Re-lay ``params`` as consecutive parts of one new tensor, in place: concatenated along dim 0, or stacked
    (``stack``, equal shapes). Each parameter keeps its name, shape and value and becomes a view of that tensor,
    which ``fused_view`` returns. Projections that read the same input then take one matmul in decoding instead
    of one each: a decode step is a chain of small kernels, and a mixed batch runs one chain per mixer group."""
    if fused_view(params, stack, inference=False) is not None:
        return  # already laid out together
    with torch.no_grad():
        whole = torch.stack(list(params)) if stack else torch.cat(list(params))
    start = 0
    for p in params:
        rows = 1 if stack else p.shape[0]
        p.data = whole[start] if stack else whole[start : start + rows]
        start += rows


def fused_view(params: Sequence[Tensor], stack: bool = False, inference: bool = True) -> Tensor | None:
    """``params`` as one tensor (as ``fuse_parameters_`` lays them out), a view and no copy, or None where they
    are not laid out so (never fused, or their data was replaced since: ``.to()``, ``load_state_dict(assign=True)``,
    FSDP) or, with ``inference``, where gradients are wanted (a view of one parameter's storage would route
    every gradient to that parameter)."""
    if torch.compiler.is_compiling():  # compiled training: separate parameters (their storage is not traced)
        return None
    first = params[0]
    if inference and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in params:
        same_shape = p.shape == first.shape if stack else p.shape[1:] == first.shape[1:]
        if not (
            same_shape
            and p.dtype == first.dtype
            and p.is_contiguous()
            and p.untyped_storage().data_ptr() == storage
            and p.storage_offset() == offset
        ):
            return None
        offset += p.numel()
    size = (len(params), *first.shape) if stack else (sum(p.shape[0] for p in params), *first.shape[1:])
    strides, step = [], 1
    for n in reversed(size):
        strides.insert(0, step)
        step *= n
    return first.detach().as_strided(size, strides, first.storage_offset())


def fused_linear(x: Tensor, linears: Sequence[nn.Linear]) -> Tensor | None:
    """The outputs of ``linears`` on the same input ``x`` side by side, [..., sum of out_features], from one matmul
    where ``Mixer.fuse_`` laid their weights (and biases) out together; else None."""
    weight = fused_view([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if weight is None:
        return None
    if all(b is None for b in biases):
        return F.linear(x, weight)
    bias = None if any(b is None for b in biases) else fused_view(biases)
    return None if bias is None else F.linear(x, weight, bias)


def linear_outputs(x: Tensor, linears: Sequence[nn.Linear]) -> list[Tensor]:
    """Each of ``linears`` applied to ``x``: views of one matmul's output where their weights are laid out
    together (``fused_linear``), else one matmul each."""
    y = fused_linear(x, linears)
    if y is None:
        return [m(x) for m in linears]
    return list(y.split([m.out_features for m in linears], dim=-1))


def fuse_linears_(linears: Sequence[nn.Linear]) -> None:
    """``fuse_parameters_`` for the weights (and biases) of linear layers that read the same input."""
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return  # some with a bias, some without: they stay separate matmuls
    fuse_parameters_([m.weight for m in linears])
    if biases[0] is not None:
        fuse_parameters_(biases)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, then scaled (the Llama/Mistral convention)."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class ShortConv(nn.Module):
    """Depthwise causal conv weights, [C, 1, K] like nn.Conv1d, so checkpoint names end in ``.weight``."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel), 1 / math.sqrt(kernel))


class NormWeight(nn.Module):
    """Holds a norm weight under the checkpoint name ``norm.weight``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


def advance_recurrent_cache(
    cache: RecurrentStateCache,
    state: Tensor,
    new_tails: list[Tensor],
    conv_inputs: list[tuple[Tensor | None, Tensor]],
    states: Tensor | None,
    kernel: int,
) -> None:
    """Store the new state and conv tails; with roll-back enabled, keep a snapshot after each recent token.

    ``states`` [B, r+1, ...] holds the states after the last r+1 prefixes of this call (from the delta rule's
    recorded tail); the matching conv tails are slices of [old tail | this call's conv input].
    """
    t = conv_inputs[0][1].shape[1]
    start_len = cache.length
    full = []
    if states is not None:  # before update(): it overwrites the old tail buffers in place
        for tail, inp in conv_inputs:
            if tail is None:
                tail = inp.new_zeros(inp.shape[0], kernel - 1, inp.shape[2])
            full.append(torch.cat([tail.to(inp.dtype), inp], dim=1))  # [B, K-1+T, C]
    cache.update(state, new_tails, t)
    if states is None:
        return
    r = states.shape[1] - 1
    for j in range(r + 1):
        end = t - r + j  # tokens of this call consumed at this snapshot
        cache.record(start_len + end, states[:, j], [f[:, end : end + kernel - 1] for f in full])
