"""CUDA-graph decoding: capture one decode step of a (static) cache once, replay it for every token.

At batch 1 a decode step of a large model is hundreds of small kernels; launching them from Python costs more
than the math. A graph replays them with one launch. Requirements met by ``SupernetCache.make_static``: fixed
buffer addresses, device-side positions, no host decisions that change between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import SupernetCache
from .ops.fused import fusion


class GraphDecoder:
    """Replays a captured single-token forward. ``step(tokens [B]) -> logits [B, vocab]`` advances the cache."""

    def __init__(self, model, cache: SupernetCache, capacity: int, warmup: int = 2, keep_state: bool = True) -> None:
        if cache.length == 0:
            raise ValueError("prefill the cache before capturing decode steps")
        if cache.length < cache.max_start:
            raise ValueError("the prompt must be fully processed before decoding with a graph")
        if any(getattr(layer, "rollback", 0) for layer in cache.layers):
            raise ValueError("roll-back snapshots are host-side bookkeeping; capture a cache with rollback=0")
        self.capacity = capacity
        self.model = model
        self.cache = cache
        cache.make_static(capacity)
        device = cache.start.device
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        saved = cache.clone() if keep_state else None  # warm-up and capture write to the cache: undo them
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), fusion(True):
            for _ in range(warmup):  # autotuning, compiling and lazy allocations happen outside the graph
                model(self.tokens, cache=cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = model(self.tokens, cache=cache)[:, -1]
        if saved is not None:
            cache.copy_(saved)
            del saved
        else:
            cache.length -= warmup + 1
            for layer in cache.layers:
                layer.length -= warmup + 1
            cache.static_index.fill_(cache.length)

    def step(self, tokens: Tensor) -> Tensor:
        if self.cache.length + 1 > self.capacity:
            raise ValueError(f"the graph's cache is full ({self.capacity} positions)")
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        self.cache.length += 1
        for layer in self.cache.layers:
            layer.length += 1
        return self.logits
