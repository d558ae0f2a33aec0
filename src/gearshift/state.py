"""What a mixer keeps between decode steps, described once per mixer (``Mixer.state_spec()``).

Everything that holds or measures decoding state derives from these descriptions: the decoding caches
(``new_cache``), the serving engine's pools (``serve.pools.pool_for``), the benchmarks' synthetic caches
(``cache.synthetic_cache``) and the modelled costs (``report.py``). A new mixer whose state is a KV cache or a
recurrent state with conv tails writes only its ``state_spec()``; a new kind of state is a new spec class here.

Keys, values and conv tails are held in the model's dtype (given when measuring or allocating); a recurrent state
in ``state_dtype`` (fp32: it accumulates over the whole context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import FullKVCache, RecurrentCache, WindowKVCache


@dataclass(frozen=True)
class KVSpec:
    """Keys and values of an attention layer: ``heads`` KV heads of ``head_size``, every past token (``window``
    None: full attention) or the last ``window`` tokens (sliding window)."""

    heads: int
    head_size: int
    window: int | None = None

    def held(self, context: int) -> int:
        """Token positions one sequence holds at ``context`` tokens."""
        return context if self.window is None else min(context, self.window)

    def nbytes(self, context: int, dtype_bytes: int = 2) -> int:
        """Bytes of one sequence's keys and values at ``context`` tokens."""
        return 2 * self.heads * self.head_size * self.held(context) * dtype_bytes

    def step_bytes(self, context: int, dtype_bytes: int = 2) -> int:
        """Bytes one decode step moves for one sequence: it reads every key and value held, writes one token's."""
        return self.nbytes(context, dtype_bytes) + 2 * self.heads * self.head_size * dtype_bytes

    def new_cache(self, rollback: int = 0, capacity: int = 0) -> FullKVCache | WindowKVCache:
        """An empty decoding cache (``rollback``: tokens it can return; ``capacity``: positions to reserve)."""
        if self.window is None:
            return FullKVCache(capacity)
        return WindowKVCache(self.window, rollback)

    def random_cache(
        self, batch: int, context: int, extra: int, device: torch.device, dtype: torch.dtype
    ) -> FullKVCache | WindowKVCache:
        """A cache as if ``context`` tokens had been read, random keys and values (room for ``extra`` more)."""
        cache = self.new_cache()
        if isinstance(cache, FullKVCache):
            cache.k = torch.randn(batch, self.heads, context + extra, self.head_size, device=device, dtype=dtype)
            cache.v = torch.randn_like(cache.k)
        else:
            cap = cache.capacity
            cache.k = torch.randn(batch, self.heads, cap, self.head_size, device=device, dtype=dtype)
            cache.v = torch.randn_like(cache.k)
            held = torch.arange(max(0, context - cap), context, device=device)
            cache.index = torch.full((cap,), -1, dtype=torch.long, device=device)
            cache.index[held % cap] = held
        cache.length = context
        return cache


@dataclass(frozen=True)
class RecurrentSpec:
    """A delta-rule layer's state: the recurrent state [heads, key_dim, value_dim] in ``state_dtype`` and one
    conv tail [conv_kernel - 1, channels] per entry of ``conv_channels`` (the short convs' last inputs)."""

    heads: int
    key_dim: int
    value_dim: int
    conv_channels: tuple[int, ...]
    conv_kernel: int
    state_dtype: torch.dtype = torch.float32

    def nbytes(self, context: int = 0, dtype_bytes: int = 2) -> int:
        """Bytes of one sequence's state (the same at every context)."""
        state = self.heads * self.key_dim * self.value_dim * self.state_dtype.itemsize
        return state + sum(self.conv_channels) * (self.conv_kernel - 1) * dtype_bytes

    def step_bytes(self, context: int = 0, dtype_bytes: int = 2) -> int:
        """Bytes one decode step moves for one sequence: the whole state read and written."""
        return 2 * self.nbytes(context, dtype_bytes)

    def new_cache(self, rollback: int = 0, capacity: int = 0) -> RecurrentCache:
        """An empty decoding cache (``rollback``: tokens it can return; ``capacity`` does not apply)."""
        return RecurrentCache(n_convs=len(self.conv_channels), rollback=rollback)

    def random_cache(
        self, batch: int, context: int, extra: int, device: torch.device, dtype: torch.dtype
    ) -> RecurrentCache:
        """A cache as if ``context`` tokens had been read: a small random state and random conv tails."""
        cache = self.new_cache()
        shape = (batch, self.heads, self.key_dim, self.value_dim)
        cache.state = 0.01 * torch.randn(shape, device=device, dtype=self.state_dtype)
        cache.conv = [
            torch.randn(batch, self.conv_kernel - 1, c, device=device, dtype=dtype) for c in self.conv_channels
        ]
        cache.length = context
        return cache


StateSpec = KVSpec | RecurrentSpec
