"""Decoding state: one cache per layer, holding only the state of the mixer that layer uses.

- ``FullKVCache``: keys/values of every past token (full attention).
- ``WindowKVCache``: a ring buffer of the last ``window`` keys/values (sliding window attention), plus
  ``rollback`` spare slots when roll-back is wanted.
- ``RecurrentCache``: conv tails + the fp32 recurrent state (GDN, KDA), plus snapshots of the last ``rollback``
  positions so that speculative decoding can return to any of them without recomputation.

All caches of a batch share one timeline of token *indices*; batches are left-padded and ``SupernetCache.start``
holds each row's first real index (RoPE positions are index - start). Every cache can be cloned, truncated
(rolled back) and asked for its memory. What mixers need of a cache is written down as protocols
(``AttentionCache``, ``RecurrentStateCache``), which the serving engine's pool views speak too; what a layer's
cache holds comes from its mixer's ``state_spec()`` (``gearshift.state``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class CacheError(RuntimeError):
    """A cache used in a way its state cannot support (e.g. rolling back further than it remembers)."""


@runtime_checkable
class AttentionCache(Protocol):
    """What an attention mixer needs of its cache: the decoding caches below and the engine's pool views
    (``serve.pools.AttentionView``) both speak it."""

    exact: bool  # ``update`` returns only real past keys (no empty or stale slots): no mask needed

    def update(self, k_new: Tensor, v_new: Tensor, q_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys/values [B, Hkv, T, D] at token indices ``q_index``; return (keys, values, key
        indices) to attend over, the new ones included."""
        ...


@runtime_checkable
class RecurrentStateCache(Protocol):
    """What a delta-rule mixer (GDN, KDA) needs of its cache: ``RecurrentCache`` and the engine's
    ``serve.pools.RecurrentView`` both speak it."""

    state: Tensor | None  # [B, H, K, V] fp32, None before the first call
    conv: list[Tensor | None]  # conv tails, each [B, K-1, C]
    rollback: int  # keep the state after each of a call's last ``rollback`` tokens (``record``)
    in_place: bool  # the mixer may write the new state over ``state``
    length: int  # tokens read so far

    def update(self, state: Tensor, conv: Sequence[Tensor], t: int) -> None:
        """Store the state and conv tails after this call's ``t`` tokens."""
        ...

    def record(self, length: int, state: Tensor, conv: Sequence[Tensor]) -> None:
        """Keep a roll-back point: the state after ``length`` tokens."""
        ...


@runtime_checkable
class LayerCache(Protocol):
    """What ``SupernetCache`` needs of each layer's cache, besides the mixer's side above."""

    length: int

    def truncate(self, length: int) -> None:
        """Roll back to the state after the first ``length`` tokens."""
        ...

    def make_static(self, capacity: int) -> None:
        """Fix the buffers' shapes and addresses (CUDA-graph decoding)."""
        ...

    def positions_held(self) -> int:
        """Token positions whose keys/values are held (0 for a recurrent state)."""
        ...

    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        ...

    def select(self, rows: Tensor) -> None:
        """Keep only these batch rows, in this order."""
        ...


def _into(buffer: Tensor | None, value: Tensor) -> Tensor:
    """``value`` stored in ``buffer`` (in place) when shapes agree, else ``value`` itself."""
    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
        return value.clone()
    return buffer.copy_(value)


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class FullKVCache:
    """All past keys/values of one attention layer.

    Eager mode grows storage by doubling and returns exactly the stored keys. Static mode (CUDA graphs) keeps
    one fixed buffer, writes with ``index_copy_`` at device-side indices and returns the whole buffer; the
    attention mask (key index <= query index) hides the slots not written yet.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.k: Tensor | None = None  # [B, Hkv, capacity, D]
        self.v: Tensor | None = None
        self.length = 0
        self.capacity = capacity
        self.static = False
        self._slots: Tensor | None = None

    @property
    def exact(self) -> bool:
        """True when ``update`` returns only real past keys (no empty slots), so decoding needs no mask."""
        return not self.static

    def update(self, k_new: Tensor, v_new: Tensor, q_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append the new keys; return (keys, values, key indices) to attend over, new ones included."""
        b, h, t, d = k_new.shape
        need = self.length + t
        if self.k is None or self.k.shape[2] < need:
            if self.static:
                raise CacheError(f"static KV cache of {self.k.shape[2]} positions is full")
            cap = max(need, self.capacity, 2 * (0 if self.k is None else self.k.shape[2]), 16)
            k = k_new.new_zeros(b, h, cap, d)
            v = v_new.new_zeros(b, h, cap, d)
            if self.k is not None:
                k[:, :, : self.length] = self.k[:, :, : self.length]
                v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k, v
        self.length = need
        if self.static:
            self.k.index_copy_(2, q_index, k_new)
            self.v.index_copy_(2, q_index, v_new)
            return self.k, self.v, self._slots
        self.k[:, :, need - t : need] = k_new
        self.v[:, :, need - t : need] = v_new
        return self.k[:, :, :need], self.v[:, :, :need], torch.arange(need, device=k_new.device)

    def make_static(self, capacity: int) -> None:
        """Fix the buffer at ``capacity`` positions (a prerequisite for CUDA-graph decoding)."""
        if self.k is None:
            raise CacheError("prefill before making a cache static")
        if self.k.shape[2] < capacity:
            grow = capacity - self.k.shape[2]
            pad = self.k.new_zeros(*self.k.shape[:2], grow, self.k.shape[3])
            self.k, self.v = torch.cat([self.k, pad], 2), torch.cat([self.v, pad], 2)
        self._slots = torch.arange(self.k.shape[2], device=self.k.device)
        self.static = True

    def truncate(self, length: int) -> None:
        if length > self.length:
            raise CacheError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def positions_held(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)

    def select(self, rows: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class WindowKVCache:
    """The last ``window + rollback`` keys/values of a sliding-window layer, in a ring buffer.

    Key order inside the ring does not matter to attention (masks are built from each slot's token index), so
    a token is written at slot ``index % capacity`` and never moved. Holding ``window`` positions (the current
    token's window) rather than ``window - 1`` lets a decode step write its key first and attend over the ring
    alone, with no copy of the ring per step.
    """

    exact = False  # the ring holds stale slots; attention always masks by index

    def __init__(self, window: int, rollback: int = 0) -> None:
        self.window = window
        self.capacity = window + rollback
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.index: Tensor | None = None  # [capacity] token index held by each slot, -1 when empty
        self.length = 0

    def update(self, k_new: Tensor, v_new: Tensor, q_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, h, t, d = k_new.shape
        if self.k is None:
            self.k = k_new.new_zeros(b, h, self.capacity, d)
            self.v = v_new.new_zeros(b, h, self.capacity, d)
            self.index = torch.full((self.capacity,), -1, dtype=torch.long, device=k_new.device)
        self.length += t
        if t <= self.capacity - self.window + 1:
            # Writing first evicts only tokens older than the first query's window: attend over the ring itself.
            self._write(k_new, v_new, q_index)
            return self.k, self.v, self.index
        keys = torch.cat([self.k, k_new], dim=2)  # long chunk (prefill): its early queries need evicted keys
        values = torch.cat([self.v, v_new], dim=2)
        index = torch.cat([self.index, q_index])
        keep = min(t, self.capacity)
        self._write(k_new[:, :, t - keep :], v_new[:, :, t - keep :], q_index[t - keep :])
        return keys, values, index

    def _write(self, k: Tensor, v: Tensor, index: Tensor) -> None:
        slots = index % self.capacity
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.index[slots] = index

    def truncate(self, length: int) -> None:
        if length > self.length:
            raise CacheError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.index is not None and length < self.length:
            # The window before `length` must still be fully present: the ring holds [self.length - cap, ...).
            oldest_needed = max(0, length - (self.window - 1))
            if oldest_needed < self.length - self.capacity:
                raise CacheError(
                    f"sliding-window cache can roll back at most {self.capacity - self.window + 1} tokens "
                    f"(asked {self.length - length}); create the cache with a larger rollback"
                )
            self.index[self.index >= length] = -1
        self.length = length

    def make_static(self, capacity: int) -> None:
        pass  # the ring is fixed-size already and written at device-side slots

    def positions_held(self) -> int:
        return 0 if self.index is None else int((self.index >= 0).sum())

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v, self.index)

    def select(self, rows: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class RecurrentCache:
    """Conv tails and the fp32 recurrent state of a GDN or KDA layer (one tail each: both run their short convs
    as one depthwise conv over the channels side by side)."""

    def __init__(self, n_convs: int, rollback: int = 0) -> None:
        self.conv: list[Tensor | None] = [None] * n_convs  # each [B, K-1, C]
        self.state: Tensor | None = None  # [B, HV, K, V] float32
        self.rollback = rollback
        self.in_place = False  # mixers may not write the new state over ``state`` (it is not ours alone)
        self.length = 0
        # snapshots[n] = (state, conv tails) after the first n tokens, for the last `rollback` positions
        self.snapshots: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def update(self, state: Tensor, conv: Sequence[Tensor], t: int) -> None:
        # Copy into the existing buffers: their addresses stay fixed, which CUDA-graph replay relies on.
        self.state = _into(self.state, state)
        self.conv = [_into(old, new) for old, new in zip(self.conv, conv, strict=True)]
        self.length += t
        if self.rollback:
            self.snapshots[self.length] = (state, list(conv))
            self._prune()

    def record(self, length: int, state: Tensor, conv: Sequence[Tensor]) -> None:
        """Keep a roll-back point: the state after ``length`` tokens (only the last ``rollback`` are kept)."""
        if self.rollback and length >= self.length - self.rollback:
            self.snapshots[length] = (state, list(conv))

    def _prune(self) -> None:
        for n in [n for n in self.snapshots if n < self.length - self.rollback]:
            del self.snapshots[n]

    def truncate(self, length: int) -> None:
        if length > self.length:
            raise CacheError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if length == self.length:
            return
        if length not in self.snapshots:
            raise CacheError(
                f"recurrent cache cannot roll back {self.length - length} tokens: it keeps roll-back points for the "
                f"last {self.rollback}; create the cache with rollback >= {self.length - length}"
            )
        state, conv = self.snapshots[length]
        self.state = _into(self.state, state)
        self.conv = [_into(old, new) for old, new in zip(self.conv, conv, strict=True)]
        self.length = length
        for n in [n for n in self.snapshots if n > length]:
            del self.snapshots[n]

    def make_static(self, capacity: int) -> None:
        if self.state is None:
            raise CacheError("prefill before making a cache static")

    def positions_held(self) -> int:
        return 0

    def nbytes(self) -> int:
        snaps = sum(_nbytes(s, *c) for s, c in self.snapshots.values() if s is not self.state)
        return _nbytes(self.state, *self.conv) + snaps

    def select(self, rows: Tensor) -> None:
        self.state = None if self.state is None else self.state[rows]
        self.conv = [None if c is None else c[rows] for c in self.conv]
        self.snapshots = {n: (s[rows], [c[rows] for c in cs]) for n, (s, cs) in self.snapshots.items()}


class SupernetCache:
    """The decoding state of a batch under one placement: one layer cache per layer + the shared timeline."""

    def __init__(self, placement: Sequence[str], layers: list[LayerCache], batch_size: int, device: torch.device):
        self.placement = tuple(placement)
        self.layers = layers
        self.batch_size = batch_size
        self.length = 0  # tokens processed, in index space (padding included)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)  # first real index per row
        self.max_start = 0  # host copies, so that decoding never waits on the device to know about padding
        self.min_start = 0
        self.static_index: Tensor | None = None  # device-side position counter of a static (graph) cache

    @property
    def static(self) -> bool:
        return self.static_index is not None

    def make_static(self, capacity: int) -> None:
        """Freeze buffer shapes and keep the position counter on the device, so a decode step can be
        captured once in a CUDA graph and replayed (see ``gearshift.cuda_graphs``)."""
        if self.length + 1 > capacity:
            raise CacheError(f"capacity {capacity} is below the current length {self.length}")
        for layer in self.layers:
            layer.make_static(capacity)
        self.static_index = torch.tensor([self.length], dtype=torch.long, device=self.start.device)

    def copy_(self, other: SupernetCache) -> None:
        """Copy another cache's contents into this one's buffers (addresses kept), e.g. to undo graph warm-up."""
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.copy_(theirs)
        self.length = other.length
        for a, b in zip(self.layers, other.layers, strict=True):
            a.length = b.length

    def _tensors(self) -> list[Tensor]:
        out = [self.start] + ([self.static_index] if self.static_index is not None else [])
        for layer in self.layers:
            for name in ("k", "v", "index", "state"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    out.append(t)
            out.extend(c for c in getattr(layer, "conv", []) if c is not None)
        return out

    def set_padding(self, attention_mask: Tensor) -> None:
        """Record the left padding of the prompt (mask [B, T]: 0 = padding) before anything is processed."""
        if self.length:
            raise CacheError("padding can only be set on an empty cache")
        mask = attention_mask.to(self.start.device).bool()
        if mask.shape[0] != self.batch_size:
            raise ValueError(f"attention_mask has {mask.shape[0]} rows, the cache {self.batch_size}")
        real = mask.sum(1)
        if bool((real == 0).any()):
            raise ValueError("every row needs at least one real (unpadded) token")
        start = mask.shape[1] - real
        if not torch.equal(torch.arange(mask.shape[1], device=mask.device)[None] >= start[:, None], mask):
            raise ValueError("with a cache, prompts must be left-padded (attention_mask 0...0 1...1 per row)")
        self.start = start
        self.max_start, self.min_start = int(start.max()), int(start.min())

    def __len__(self) -> int:
        return self.length

    def clone(self) -> SupernetCache:
        """An independent copy (tensors copied), e.g. to branch one prefix into several continuations."""
        return copy.deepcopy(self)

    def truncate(self, length: int) -> None:
        """Roll back to the state after the first ``length`` tokens (speculative decoding's rejection step)."""
        if not 0 <= length <= self.length:
            raise CacheError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if length < self.max_start:
            raise CacheError("cannot roll back into a row's prompt padding")
        for layer in self.layers:
            layer.truncate(length)
        self.length = length

    def select(self, rows: Sequence[int] | Tensor) -> None:
        """Keep only the given batch rows (in that order), e.g. to drop finished sequences."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.start.device)
        for layer in self.layers:
            layer.select(rows)
        self.start = self.start[rows]
        self.batch_size = len(rows)
        if len(rows):
            self.max_start, self.min_start = int(self.start.max()), int(self.start.min())

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers) + _nbytes(self.start)

    def layer_nbytes(self) -> list[int]:
        return [layer.nbytes() for layer in self.layers]


@torch.no_grad()
def synthetic_cache(
    model, placement, batch: int, context: int, extra: int = 16, dtype: torch.dtype | None = None
) -> SupernetCache:
    """A cache as if ``context`` tokens had been processed, filled with random state shaped by each mixer's
    ``state_spec()`` (decode speed does not depend on the values; prefilling big batches at 32k would take minutes
    of device time). Full-attention layers keep room for ``extra`` more tokens."""
    device = model.device
    dtype = dtype or model.model.embed_tokens.weight.dtype
    placement = model.resolve(placement)
    layers = [
        block.mixer.mixers[name].state_spec().random_cache(batch, context, extra, device, dtype)
        for block, name in zip(model.blocks, placement, strict=True)
    ]
    cache = SupernetCache(placement, layers, batch, device)
    cache.length = context
    return cache
