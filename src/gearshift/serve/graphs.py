"""The model runner's forwards replayed from CUDA graphs, one per batch composition, on CUDA only.

A decode step, a speculative round's draft steps and its verify pass repeat the same composition (placements and
pool slots) step after step; replaying a captured graph of it costs the host one launch instead of an eager
forward's hundreds. Checked token for token against eager decoding on the H200 by ``benchmarks/engine_graphs.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..placement import Placement

if TYPE_CHECKING:
    from .runner import ModelRunner


class DecodeGraph:
    """One forward of a fixed batch composition, captured: static token/position inputs [B, T], static logits
    [B, T, vocab] and, with roll-back, the recurrent views whose snapshots the replay refreshes.

    Also holds what a padded replay needs (``GraphCache.padded``): its cache key, the rows' codes and slots."""

    def __init__(
        self, runner: ModelRunner, key: tuple, placements: Sequence[Placement], slots, codes=None, tokens=1, rollback=0
    ) -> None:
        self.key, self.codes, self.slots = key, codes, list(slots)
        self.decode = tokens == 1 and rollback == 0  # a plain decode step: may replay padded (GraphCache.padded)
        b = len(placements)
        self.tokens = torch.zeros(b, tokens, dtype=torch.long, device=runner.device)
        self.positions = torch.zeros(b, tokens, dtype=torch.long, device=runner.device)
        self.plan = runner.plan(placements, slots, codes)  # index tensors must outlive any eviction from the cache
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's event-loop thread may make CUDA calls (a seeded request's generator) while
        # the engine's worker thread captures; under the default "global" mode such calls fail during a capture
        pool = runner.graphs.pool
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"), torch.no_grad():
            # max_position=0 only marks the positions as checked: the real bound is checked before each replay
            self.logits, self.views = runner.mixed_forward(
                self.tokens, self.positions, placements, slots, rollback=rollback, max_position=0, codes=codes
            )
        if pool is None:
            runner.graphs.pool = self.graph.pool()


class GraphCache:
    """A runner's captured graphs, keyed by batch composition, token count and roll-back (the most recently
    replayed last, at most 8), and the lookups that decide when to capture and when a shrunk batch may replay a
    larger graph padded. It holds no reference to its runner (whose pools a benchmark frees by dropping it): the
    runner passes itself to the calls that capture or read its pools."""

    def __init__(self) -> None:
        self.captured: dict[tuple, DecodeGraph] = {}  # least recently replayed first
        # one memory pool for all the graphs' intermediates: graphs replay one at a time and keep only their
        # outputs (held by the graph objects, so never handed to another capture). A pool per graph held up to
        # eight graphs' intermediates, which at the 15B shape and batch 78 ran the GPU out of memory
        self.pool = None
        self._padding: dict[tuple, tuple] = {}  # a shrunk batch's codes -> the graph it replays padded (padded)
        self._eager_seen: deque[tuple] = deque(maxlen=4)  # keys of the latest eager forwards (see lookup)

    def clear(self) -> None:
        """Forget every graph (the composition codes they are keyed by start over); the next capture starts a
        fresh memory pool."""
        self.captured.clear()
        self.pool = None
        self._padding.clear()
        self._eager_seen.clear()

    def lookup(
        self, runner: ModelRunner, key: tuple, placements, slots, codes, tokens: int, rollback: int
    ) -> DecodeGraph | None:
        """The cached graph of ``key``, captured now if that key ran eagerly among the last few eager forwards, or
        None: the caller then runs this forward eagerly, with the fused bodies a graph would replay, so they
        compile now and not inside a capture (capture only records: it neither runs nor writes the pools). A
        batch in flux (rows coming and going) thus pays no capture per step, while a composition that recurs --
        a steady decode batch, a speculative round's draft steps and verify pass -- is captured on its second
        forward."""
        graph = self.captured.pop(key, None)
        if graph is None:
            if key not in self._eager_seen:
                self._eager_seen.append(key)
                return None
            graph = DecodeGraph(runner, key, placements, slots, codes, tokens, rollback)
            if len(self.captured) >= 8:  # keep the recently replayed ones (each holds its outputs and index tensors)
                self.captured.pop(next(iter(self.captured)))
        self.captured[key] = graph  # (re)inserted last: the most recently replayed
        return graph

    def padded(self, runner: ModelRunner, codes: tuple[int, ...]) -> tuple[DecodeGraph, Tensor] | None:
        """A cached graph to replay for a batch that lost rows: its composition holds these rows in this order
        (rows keep their rank order, see Scheduler._admit) plus at most as many others, and every slot of those
        others is free (their requests ended and no one took the slots since), so they can decode a dummy token
        there: their output is dropped, and a slot is reset when it is next taken. Returns (graph, the live rows'
        indices in it). Without this, a draining batch (requests ending at different times, none waiting) pays
        an eager step and a capture at every size."""
        found = self._padding.get(codes)
        if found is None or self.captured.get(found[0].key) is not found[0]:
            found = None
            for graph in reversed(self.captured.values()):  # the most recent first
                full = graph.codes
                if full is None or not graph.decode or not len(codes) < len(full) <= 2 * len(codes):
                    continue  # (a verify pass's graph holds the same kind of codes, but k + 1 tokens)
                live = _subsequence(codes, full)
                if live is not None:
                    gone = sorted(set(range(len(full))) - set(live))
                    found = (graph, torch.tensor(live, device=runner.device), [graph.slots[j] for j in gone])
                    break
            if found is None:
                return None
            if len(self._padding) >= 64:
                self._padding.pop(next(iter(self._padding)))
            self._padding[codes] = found
        graph, live, gone = found
        pools = runner.pools
        if any(pools[i][name].alloc.busy[slot] for row in gone for (i, name), slot in row.items()):
            return None
        return graph, live


def _subsequence(part: tuple, whole: tuple) -> list[int] | None:
    """Indices in ``whole`` of the items of ``part``, matched in order, or None if ``part`` is not a subsequence."""
    found, j = [], 0
    for item in part:
        while j < len(whole) and whole[j] != item:
            j += 1
        if j == len(whole):
            return None
        found.append(j)
        j += 1
    return found
