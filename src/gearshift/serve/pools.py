"""Per-request decoding state in preallocated pools, one pool per (layer, mixer).

A request owns one slot in the pool of every (layer, mixer) its placement uses, and nothing elsewhere: an
all-GDN request holds no KV cache at all. Mixers read and write their pools through *views* that speak the
same cache protocols as ``gearshift.cache`` (``AttentionCache``, ``RecurrentStateCache``), so the mixer modules run
unchanged on a group of requests at different positions. Which pool a mixer gets, and its shapes, follow from
the mixer's ``state_spec()`` (``pool_for``).
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from ..state import KVSpec, RecurrentSpec, StateSpec

LENGTH_ALIGN = 256


class PoolFullError(RuntimeError):
    """No free slot in a pool (admission control should have prevented this)."""


class SlotAllocator:
    """Hands out the lowest free slot, so the slots of a steady batch stay a consecutive range (views, not
    gathers: see AttentionView)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.free = list(range(n))  # a heap
        self.busy = bytearray(n)  # 1 where a slot is handed out

    def take(self) -> int:
        if not self.free:
            raise PoolFullError("no free slot")
        slot = heapq.heappop(self.free)
        self.busy[slot] = 1
        return slot

    def give(self, slot: int) -> None:
        self.busy[slot] = 0
        heapq.heappush(self.free, slot)

    @property
    def available(self) -> int:
        return len(self.free)


def attention_length(capacity: int, window: int | None, spare: int) -> int:
    """Positions per slot: the context (FA) or the window plus room for a chunk (SWA ring), but never more than
    the context (a window longer than the context never wraps). Long pools come in whole multiples of
    LENGTH_ALIGN, so split-KV decoding chunks them by a view."""
    length = capacity if window is None else min(capacity, window + spare)
    return -(-length // LENGTH_ALIGN) * LENGTH_ALIGN if length > 4 * LENGTH_ALIGN else length


def pool_for(spec: StateSpec, max_context: int, spare: int) -> tuple[type[AttentionPool | RecurrentPool], dict]:
    """The pool class and its settings (all but slots, device and dtype) that hold one mixer's decoding state,
    from its ``state_spec()``: ``max_context`` tokens per request at most, ``spare`` positions of a window's ring
    beyond the window (a chunk's keys written before its queries attend)."""
    if isinstance(spec, KVSpec):
        return AttentionPool, dict(
            heads=spec.heads, head_size=spec.head_size, capacity=max_context, window=spec.window, spare=spare
        )
    if isinstance(spec, RecurrentSpec):
        return RecurrentPool, dict(
            heads=spec.heads,
            dk=spec.key_dim,
            dv=spec.value_dim,
            conv_channels=list(spec.conv_channels),
            kernel=spec.conv_kernel,
        )
    raise TypeError(f"no pool holds decoding state described by {type(spec).__name__}")


class AttentionPool:
    """Full KV [slots, Hkv, capacity, D] (FA) or a ring [slots, Hkv, window + spare, D] with slot indices (SWA)."""

    def __init__(
        self, slots: int, heads: int, head_size: int, capacity: int, window: int | None, spare: int, device, dtype
    ) -> None:
        self.window = window
        length = attention_length(capacity, window, spare)
        self.wraps = window is not None and length < capacity  # a ring that overwrites its oldest positions
        self.k = torch.zeros(slots, heads, length, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        # token index held by each position of each slot (-1 empty); full attention stores token i at i
        self.index = torch.full((slots, length), -1, dtype=torch.long, device=device)
        self.alloc = SlotAllocator(slots)

    def reset(self, slots: list[int]) -> None:
        """Mark these slots empty (one fill for all of them: an admission pass may hand out hundreds)."""
        self.index[_rows(slots, self.index.device)] = -1

    def nbytes_per_slot(self) -> int:
        return (self.k[0].numel() + self.v[0].numel()) * self.k.element_size() + self.index[0].numel() * 8

    def fill_random(self, slot: int, context: int, generator: torch.Generator | None = None) -> None:
        """Give ``slot`` random keys and values as if it had read ``context`` tokens (benchmarks: prefilling
        long contexts would dominate their runs)."""
        length = self.k.shape[2]
        held = torch.arange(max(0, context - length), context, device=self.k.device)
        self.k[slot].normal_(generator=generator)
        self.v[slot].normal_(generator=generator)
        self.index[slot] = -1
        self.index[slot, held % length if self.window is not None else held] = held

    @staticmethod
    def slot_bytes(heads: int, head_size: int, capacity: int, window: int | None, spare: int, dtype) -> int:
        """``nbytes_per_slot`` of a pool with these settings, before allocating it."""
        length = attention_length(capacity, window, spare)
        return 2 * heads * length * head_size * torch.empty((), dtype=dtype).element_size() + length * 8

    def view(
        self, slots: Tensor, span: slice | None = None, checked: bool = False, fresh: bool = False
    ) -> AttentionView:
        return AttentionView(self, slots, span, checked, fresh)


class AttentionView:
    """Cache interface over the pool slots of a group of requests (rows), each at its own positions.

    ``span``: the slots are the contiguous range ``span`` (in row order), so reads are views of the pool instead
    of gathers. Gathering copies every row's whole KV each layer and step, which at long contexts costs more
    than the attention itself; the engine hands out lowest-free slots, so a steady batch is contiguous.
    """

    def __init__(
        self, pool: AttentionPool, slots: Tensor, span: slice | None = None, checked: bool = False, fresh: bool = False
    ) -> None:
        self.pool, self.slots = pool, slots
        self.read: Tensor | slice = slots if span is None else span
        self.checked = checked  # the caller bounded the positions on the host: no device sync per write
        # ``fresh``: every row starts at position 0 in this call (the first chunk of a prompt), so the pool holds
        # nothing these queries may see: they attend to the new keys alone, causally, with no mask and no read of
        # the pool (for a prefill that is SDPA's fast causal kernel instead of a masked one over the capacity)
        self.fresh = fresh
        self.exact = fresh

    def update(self, k_new: Tensor, v_new: Tensor, q_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.pool
        length = p.k.shape[2]
        t = k_new.shape[2]
        pos = q_index if q_index.dim() == 2 else q_index[None].expand(len(self.slots), -1)  # [G, T]
        rows = self.slots[:, None].expand_as(pos)
        if self.fresh:
            keep = min(t, length)  # a ring keeps the last ``length`` tokens
            self._write(
                rows[:, t - keep :], pos[:, t - keep :], k_new[:, :, t - keep :], v_new[:, :, t - keep :], length
            )
            return k_new, v_new, pos
        write_first = not p.wraps or t <= length - p.window + 1
        if write_first:
            self._write(rows, pos, k_new, v_new, length)
            return p.k[self.read], p.v[self.read], p.index[self.read]
        # a chunk longer than the ring's spare room: its early queries need keys it is about to evict
        keys = torch.cat([p.k[self.read], k_new], dim=2)
        values = torch.cat([p.v[self.read], v_new], dim=2)
        index = torch.cat([p.index[self.read], pos], dim=1)
        keep = min(t, length)
        self._write(rows[:, t - keep :], pos[:, t - keep :], k_new[:, :, t - keep :], v_new[:, :, t - keep :], length)
        return keys, values, index

    def _write(self, rows: Tensor, pos: Tensor, k: Tensor, v: Tensor, length: int) -> None:
        p = self.pool
        # a ring wraps; padding of a fresh chunk (negative positions) wraps to the end of a slot, which no real
        # token of the chunk reaches, and its index stays negative: never visible
        where = pos % length
        if p.window is None and not self.checked and int(pos.max()) >= length:
            raise PoolFullError(f"request exceeds the KV capacity of {length} tokens")
        p.k[rows, :, where] = k.permute(0, 2, 1, 3)
        p.v[rows, :, where] = v.permute(0, 2, 1, 3)
        p.index[rows, where] = pos


class RecurrentPool:
    """fp32 recurrent state [slots, H, K, V] + conv tails [slots, K-1, C] (GDN: one conv over [q | k | v]; KDA:
    its three convs side by side)."""

    def __init__(
        self, slots: int, heads: int, dk: int, dv: int, conv_channels: list[int], kernel: int, device, dtype
    ) -> None:
        self.state = torch.zeros(slots, heads, dk, dv, device=device, dtype=torch.float32)
        self.conv = [torch.zeros(slots, kernel - 1, c, device=device, dtype=dtype) for c in conv_channels]
        self.alloc = SlotAllocator(slots)

    def reset(self, slots: list[int]) -> None:
        """Zero these slots' state and conv tails (one fill per buffer for all of them)."""
        rows = _rows(slots, self.state.device)
        self.state[rows] = 0
        for c in self.conv:
            c[rows] = 0

    def nbytes_per_slot(self) -> int:
        return self.state[0].numel() * 4 + sum(c[0].numel() * c.element_size() for c in self.conv)

    def fill_random(self, slot: int, context: int, generator: torch.Generator | None = None) -> None:
        """Give ``slot`` a small random state as if it had read ``context`` tokens (its conv tails stay as they
        are: they hold a few tokens and do not change what a decode step costs)."""
        self.state[slot].normal_(0, 0.01, generator=generator)

    @staticmethod
    def slot_bytes(heads: int, dk: int, dv: int, conv_channels: list[int], kernel: int, dtype) -> int:
        """``nbytes_per_slot`` of a pool with these settings, before allocating it."""
        return heads * dk * dv * 4 + sum(conv_channels) * (kernel - 1) * torch.empty((), dtype=dtype).element_size()

    def view(
        self, slots: Tensor, rollback: int = 0, index: Tensor | None = None, span: slice | None = None
    ) -> RecurrentView:
        return RecurrentView(self, slots, rollback, index, span)

    def restore(self, read: Tensor | slice, states: list[Tensor], convs: list[list[Tensor]], choice: Tensor) -> None:
        """Write back, for each row i of a group (slots ``read``), its candidate ``choice[i]`` among ``states``
        ([G, H, K, V] each) and the matching conv tails (speculative roll-back, on the device)."""
        rows = torch.arange(len(choice), device=choice.device)
        self.state[read] = torch.stack(states, 1)[rows, choice]
        for i, pool_c in enumerate(self.conv):
            pool_c[read] = torch.stack([conv[i] for conv in convs], 1)[rows, choice].to(pool_c.dtype)


class RecurrentView:
    """The state of a group of requests; ``update`` writes it back. With ``rollback`` it also keeps the state
    after each of the call's last tokens, so speculative decoding can return to any of them. ``index``: the batch
    rows of the group, on the device (None: every row of the batch).

    ``span``: the slots are the contiguous range ``span``, so the state is read as a view of the pool and written
    back by a plain copy. Otherwise both gather and scatter: at the 15B shape a step's recurrent state is ~2 MB a
    row and layer, and the index kernels moved it at a quarter of the copy's bandwidth."""

    def __init__(
        self,
        pool: RecurrentPool,
        slots: Tensor,
        rollback: int = 0,
        index: Tensor | None = None,
        span: slice | None = None,
    ) -> None:
        self.pool, self.slots, self.rollback, self.index = pool, slots, rollback, index
        self.read: Tensor | slice = slots if span is None else span
        self.state = pool.state[self.read]  # read before ``update`` overwrites it (the mixers do)
        # decode kernels may write the new state over ``state``: for a view of the pool that is the write-back
        self.in_place = not rollback
        self.conv = [c[self.read] for c in pool.conv]
        self.length = 0
        self.snapshots: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def update(self, state: Tensor, conv: list[Tensor], t: int) -> None:
        if state is not self.state or not isinstance(self.read, slice):  # else already written, in place
            self.pool.state[self.read] = state
        for pool_c, c in zip(self.pool.conv, conv, strict=True):
            pool_c[self.read] = c.to(pool_c.dtype)
        self.length += t
        if self.rollback:
            self.snapshots[self.length] = (state, list(conv))

    def record(self, length: int, state: Tensor, conv: list[Tensor]) -> None:
        if self.rollback:
            self.snapshots[length] = (state, list(conv))

    def restore_rows(self, consumed: Tensor) -> None:
        """Set each row's state to the snapshot after ``consumed[i]`` tokens of this call. ``consumed`` [B] covers
        every row of the batch and stays on the device (no read-back: a speculative round restores before its one
        sync); this view restores its own rows."""
        keys = sorted(self.snapshots)
        if keys != list(range(keys[0], keys[0] + len(keys))):
            raise ValueError(f"snapshots after {keys} tokens: restoring needs consecutive ones")
        choice = (consumed if self.index is None else consumed[self.index]) - keys[0]
        states, convs = zip(*(self.snapshots[k] for k in keys), strict=True)
        self.pool.restore(self.read, list(states), list(convs), choice)


def consecutive_span(slots: list[int]) -> slice | None:
    """``slots`` as a slice when they are consecutive and ascending (reads become views, not gathers)."""
    first = slots[0]
    return slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None


def _rows(slots: list[int], device: torch.device) -> slice | Tensor:
    """Slots as a slice when they are consecutive (no host-to-device copy), else an index tensor."""
    slots = sorted(slots)
    span = consecutive_span(slots)
    return span if span is not None else torch.tensor(slots, device=device)
