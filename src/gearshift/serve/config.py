"""The serving engine's options, frozen: set once when the engine is built, read by its scheduler and runner.

``Engine(model, config=EngineConfig(...))``, or the same options as keyword arguments (they build this). A
benchmark that compares settings builds an engine per setting instead of switching attributes of a running one.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import envs
from ..placement import PlacementSpec


@dataclass(frozen=True)
class EngineConfig:
    """``max_batch``: requests running at once. ``max_context``: tokens per request, prompt included (default and
    upper bound: the model's context). ``max_queue``: requests waiting at most (beyond: QueueFullError).

    ``prefill_chunk``: prompt tokens a request reads per step. ``prefill_tokens``: prompt tokens (padding included)
    of one batched prefill forward. Default: about ``scheduler.PREFILL_FLOP`` of work, at least 8 chunks and at
    most 16384 tokens -- an eager forward costs the host about the same whatever its size (~20 ms for 30 layers),
    so a small model needs many tokens per forward to keep the GPU busy, while a large one must not stall the
    running requests' decode steps for long.

    ``spec_k_max``: the most tokens a speculative round drafts (requests' ``spec_k`` adapts up to it).

    ``pool_slots``: slots per pool (default ``max_batch``; speculative requests hold draft slots too).
    ``state_memory``: bytes for all decoding state. When the pools of ``pool_slots`` requests exceed it, the
    full-attention pools (the only ones that grow with the context) get fewer slots, and requests that need them
    wait while others run. Default: no limit on CPU, 85% of the free memory on CUDA.
    ``placements``: the only placements (and drafts) the engine will serve, as preset names or letters. Pools are
    then allocated only for the (layer, mixer) pairs they use -- a KV pool only in the layers where one of them
    has full attention -- so the memory holds more requests; others get a RequestError. Default: every mixer of
    every layer.
    ``placement_slots``: the served placements (and drafts) with the number of requests of each that the pools
    hold room for at once. Each pool then gets the sum over the placements that use it, rather than
    ``pool_slots`` apiece: with pools sized for every request in every pool, a mix of presets holds, per request,
    the state of every mixer any of them uses; sized this way, each request holds only its own. Requests beyond a
    placement's count run when the pools they need have room (slots that other placements share with it and
    leave free), else wait. Must fit the state budget; give it alone (without ``placements`` and ``pool_slots``).

    ``cuda_graphs``: decode steps (and speculative rounds' forwards) replayed from CUDA graphs, on CUDA only.
    ``overlap``: decode one step ahead -- the next step is launched from the sampled tokens on the device before
    the host books this step's (None: on CUDA). ``contiguous_reads``: read the pool slices of consecutive slots
    as views (False: always gather). ``group_streams``: a layer's mixer groups on their own CUDA streams (None:
    ``gearshift.envs.GROUP_STREAMS`` when the engine is built; on CUDA only either way).
    """

    max_batch: int = 16
    max_context: int | None = None
    prefill_chunk: int = 256
    prefill_tokens: int | None = None
    max_queue: int = 256
    spec_k_max: int = 8
    pool_slots: int | None = None
    cuda_graphs: bool = True
    state_memory: int | None = None
    placements: Sequence[PlacementSpec] | None = None
    placement_slots: Mapping[PlacementSpec, int] | None = None
    overlap: bool | None = None
    contiguous_reads: bool = True
    group_streams: bool | None = None

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1 or (self.prefill_tokens is not None and self.prefill_tokens < 1):
            raise ValueError(
                f"prefill_chunk ({self.prefill_chunk}) and prefill_tokens ({self.prefill_tokens}) must be >= 1"
            )
        # frozen all the way down: a caller's list or dict changed later must not change the engine's options
        if self.placements is not None:
            object.__setattr__(self, "placements", tuple(self.placements))
        if self.placement_slots is not None:
            object.__setattr__(self, "placement_slots", types.MappingProxyType(dict(self.placement_slots)))

    def streams(self) -> bool:
        """Whether mixer groups may run on side streams (the environment's switch unless set here)."""
        chosen = envs.GROUP_STREAMS if self.group_streams is None else self.group_streams
        return chosen is not False
