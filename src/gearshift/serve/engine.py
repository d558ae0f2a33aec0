"""The serving engine: continuous batching where every request brings its own placement.

Each step admits waiting requests (if every pool their placement needs has a free slot), runs one prefill chunk
per request still reading its prompt, then one decode forward for all requests ready to emit a token. Inside
that forward, every layer splits the batch by the mixer each request uses there and runs each group on its own
pool slots (``mixed_forward``): no weights are reloaded and no cache is cleared when presets differ. Requests
with a draft placement decode speculatively (``speculative.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation import is_greedy
from ..layers.base import StepContext
from ..model import Block, Supernet
from ..ops.fused import fusion
from ..placement import Placement, PlacementSpec, placement_letters
from .logprobs import TokenLogprob, token_logprobs
from .pools import AttentionPool, PoolFullError, RecurrentPool, RecurrentView, consecutive_span

log = logging.getLogger("gearshift.engine")

PREFILL_FLOP = 4e12  # work of one batched prefill forward (default prefill_tokens): ~5 ms of an H200's bf16 matmuls
AUTO_STATE_FRACTION = 0.85  # CUDA: decoding state may take this share of the free memory (the rest: activations)
ADMIT_LOOKAHEAD = 256  # waiting requests passed over (blocked) at most per admission pass, beyond the free rows
# The mixer groups of a layer run on their own CUDA streams (see Engine.mixed_forward). GEARSHIFT_GROUP_STREAMS:
# auto (default: on CUDA), 0 (one stream, as before), 1 (same as auto; there are no streams on the CPU).
_streams_env = os.environ.get("GEARSHIFT_GROUP_STREAMS", "auto")
if _streams_env not in ("auto", "0", "1"):
    raise ValueError(f"GEARSHIFT_GROUP_STREAMS must be auto, 0 or 1, not {_streams_env!r}")
GROUP_STREAMS = _streams_env != "0"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _grows(cls: type, window: int | None) -> bool:
    """Full-attention pools (attention pools without a window): the only ones whose size grows with the context."""
    return cls is AttentionPool and window is None


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine cannot serve: unknown preset, prompt longer than the context, bad parameters."""


@dataclass
class SamplingParams:
    """``max_tokens`` 0 scores the prompt only (with ``prompt_logprobs``): nothing is generated.
    ``logprobs``: record each generated token's log-probability under the model (its raw distribution, before
    temperature and filtering) and this many most likely alternatives; ``prompt_logprobs`` the same for every
    prompt token after the first. None: nothing is computed (no full-vocabulary work for such requests)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        numbers = (self.temperature, self.top_p)
        if (
            not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers)
            or self.temperature < 0
            or not 0 < self.top_p <= 1
            or self.top_k < 0
            or self.max_tokens < 0
            or (self.max_tokens == 0 and self.prompt_logprobs is None)
            or any(k is not None and k < 0 for k in (self.logprobs, self.prompt_logprobs))
        ):
            raise RequestError(
                f"bad sampling parameters: temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
                f"max_tokens={self.max_tokens} (0 only to score the prompt: with prompt_logprobs), "
                f"logprobs={self.logprobs}, prompt_logprobs={self.prompt_logprobs}"
            )


@dataclass(eq=False)  # identity: requests are looked up in lists every step (value equality is O(fields))
class Request:
    id: int
    prompt: list[int]
    placement: Placement
    params: SamplingParams
    draft: Placement | None = None
    spec_k: int = 4
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    processed: int = 0  # tokens whose state is in the target pools
    draft_processed: int = 0
    slots: dict[tuple[int, str], int] = field(default_factory=dict)
    draft_slots: dict[tuple[int, str], int] = field(default_factory=dict)
    generator: torch.Generator | None = None
    finished: bool = False
    finish_reason: str | None = None
    cancelled: bool = False
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # speculative verify rounds (each emits accepted + 1 tokens)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    new_tokens: list[int] = field(default_factory=list)  # emitted since the last step (consumed by callers)
    label: str = ""  # the placement as letters (metrics), set on submission
    code: int = -1  # its (placement, slots) as a small int, set on admission (cheap batch-composition keys)
    draft_code: int = -1  # the same for its draft's placement and slots (the speculative draft steps' graphs)
    key: tuple = ()  # its placement and slots, set on admission (see Engine._code)
    rank: int = 0  # its row's place in the running batch, set on admission (see Engine._admit)
    needs: dict[tuple[int, str], int] = field(default_factory=dict)  # slots per (layer, mixer) pool, set on submission
    stops: frozenset[int] = frozenset()  # the stop token ids (the model's EOS ids by default), set on submission
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None first), with prompt_logprobs
    error: str | None = None  # why the engine failed this request (finish_reason "error")
    scoring: bool = False  # it only scores its prompt (max_tokens 0): it reads all but its last token, emits nothing

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


class Engine:
    def __init__(
        self,
        model: Supernet,
        *,
        max_batch: int = 16,
        max_context: int | None = None,
        prefill_chunk: int = 256,
        prefill_tokens: int | None = None,
        max_queue: int = 256,
        spec_k_max: int = 8,
        pool_slots: int | None = None,
        cuda_graphs: bool = True,
        state_memory: int | None = None,
        placements: Sequence[PlacementSpec] | None = None,
        placement_slots: Mapping[PlacementSpec, int] | None = None,
    ) -> None:
        """The engine lays out ``model``'s weights for inference, in place (``Supernet.fuse_projections_``: same
        names and values, fewer matmuls per step).
        ``pool_slots``: slots per pool (default ``max_batch``; speculative requests hold draft slots too).
        ``state_memory``: bytes for all decoding state. When the pools of ``pool_slots`` requests exceed it, the
        full-attention pools (the only ones that grow with the context) get fewer slots, and requests that need
        them wait while others run. Default: no limit on CPU, 85% of the free memory on CUDA.
        ``prefill_tokens``: prompt tokens (padding included) of one batched prefill forward. Default: about
        PREFILL_FLOP of work, at least 8 chunks and at most 16384 tokens -- an eager forward costs the host about
        the same whatever its size (~20 ms for 30 layers), so a small model needs many tokens per forward to keep
        the GPU busy, while a large one must not stall the running requests' decode steps for long.
        ``placements``: the only placements (and drafts) this engine will serve, as preset names or letters. Pools
        are then allocated only for the (layer, mixer) pairs they use -- a KV pool only in the layers where one
        of them has full attention -- so the memory holds more requests; others get a RequestError. Default:
        every mixer of every layer.
        ``placement_slots``: the served placements (and drafts) with the number of requests of each that the pools
        hold room for at once. Each pool then gets the sum over the placements that use it, rather than
        ``pool_slots`` apiece: with pools sized for every request in every pool, a mix of presets holds, per
        request, the state of every mixer any of them uses; sized this way, each request holds only its own.
        Requests beyond a placement's count run when the pools they need have room (slots that other placements
        share with it and leave free), else wait. Must fit the state budget."""
        self.model = model.eval().fuse_projections_()  # fewer, larger matmuls per mixer group
        self.config = model.config
        self.device = model.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_batch = max_batch
        self.max_context = min(max_context or self.config.max_position_embeddings, self.config.max_position_embeddings)
        if prefill_chunk < 1 or (prefill_tokens is not None and prefill_tokens < 1):
            raise ValueError(f"prefill_chunk ({prefill_chunk}) and prefill_tokens ({prefill_tokens}) must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens or _prefill_budget(model, prefill_chunk)
        self.max_queue = max_queue
        self.spec_k_max = spec_k_max
        slots = pool_slots or max_batch
        self.served: tuple[Placement, ...] | None = None
        reserved: dict[Placement, int] | None = None
        if placement_slots is not None:
            if placements is not None or pool_slots is not None:
                raise ValueError("placement_slots names the served placements and sizes the pools: give it alone")
            reserved = {}
            for p, count in placement_slots.items():
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ValueError(f"placement_slots: {p!r} needs a whole number of requests >= 1, got {count!r}")
                key = model.resolve(p)
                reserved[key] = reserved.get(key, 0) + count
            placements = list(reserved)
        if placements is not None:
            self.served = tuple(dict.fromkeys(model.resolve(p) for p in placements))
            if not self.served:
                raise ValueError("placements: name at least one placement to serve")
        used = None if self.served is None else {key for p in self.served for key in enumerate(p)}
        specs = [
            {
                name: self._pool_spec(mixer)
                for name, mixer in block.mixer.mixers.items()
                if used is None or (i, name) in used
            }
            for i, block in enumerate(model.blocks)
        ]
        self.state_budget = state_memory
        if state_memory is None and self.device.type == "cuda":  # free memory, counting torch's unused cache
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self.state_budget = int(AUTO_STATE_FRACTION * (torch.cuda.mem_get_info(self.device)[0] + cached))
        if reserved is None:
            self.full_attention_slots = self._full_attention_slots(specs, slots, self.state_budget)
            counts = [
                {
                    name: self.full_attention_slots if _grows(cls, kw.get("window")) else slots
                    for name, (cls, kw) in layer.items()
                }
                for layer in specs
            ]
        else:
            counts = self._reserved_slots(specs, reserved, self.state_budget)
            grow = {
                (i, n)
                for i, layer in enumerate(specs)
                for n, (cls, kw) in layer.items()
                if _grows(cls, kw.get("window"))
            }
            self.full_attention_slots = min(max_batch, sum(c for p, c in reserved.items() if grow & set(enumerate(p))))
        self.placement_slots = reserved
        self.pools: list[dict[str, AttentionPool | RecurrentPool]] = [
            {name: cls(count[name], **kw, device=self.device, dtype=self.dtype) for name, (cls, kw) in layer.items()}
            for layer, count in zip(specs, counts, strict=True)
        ]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.lock = threading.RLock()  # the server submits from its event loop while a worker thread steps
        self.finished_count = 0
        self.failed_steps = 0  # consecutive steps in which some requests failed (see _contain); 0 after a clean one
        self.last_failure_at = -math.inf  # time.perf_counter() of the last failed step
        self._logprob_requests = 0  # queued or running requests with params.logprobs (0: no step looks for them)
        self._step_failed = False
        self._admit_idle: tuple | None = None  # see _admit
        self.tokens_by_placement: dict[str, int] = {}
        self.contiguous_reads = True  # read the pool slices of consecutive slots as views (False: always gather)
        self._plans: dict[tuple, list[list[_Group]]] = {}  # index tensors per batch composition (see _plan)
        self._codes: dict[tuple, int] = {}  # (placement, slots) of a request -> a small int (see _code)
        self._rank_counter = itertools.count()  # row ranks (see _admit)
        self._vacated: dict[tuple, int] = {}  # (placement, slots) of a finished request -> its row rank
        # decode steps replayed from CUDA graphs, one per batch composition (see _graph_decode), on CUDA only;
        # checked token for token against eager decoding on the H200 by benchmarks/engine_graphs.py (BENCHMARKS.md,
        # "GPU equivalence checks")
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, _DecodeGraph] = {}  # least recently replayed first
        # one memory pool for all the graphs' intermediates: graphs replay one at a time and keep only their
        # outputs (held by the graph objects, so never handed to another capture). A pool per graph held up to
        # eight graphs' intermediates, which at the 15B shape and batch 78 ran the GPU out of memory
        self._graph_pool = None
        self._padding: dict[tuple, tuple] = {}  # a shrunk batch's codes -> the graph it replays padded (_padded)
        self._eager_seen: deque[tuple] = deque(maxlen=4)  # keys of the latest eager forwards (see _graph_for)
        # decode one step ahead (see _decode_ahead): the next step is launched from the sampled tokens on the
        # device before the host books this step's tokens, so the GPU does not wait for the host
        self.overlap = self.device.type == "cuda"
        self._pending: _Pending | None = None
        self._sample_index: dict[tuple, list[tuple[tuple, Tensor | None]]] = {}  # see _sample_on_device
        # side streams for a layer's second, third, ... mixer group (see mixed_forward); the same ones every step,
        # so their first (eager) use sets up cuBLAS and cuDNN for them before any graph captures them
        self.group_streams = GROUP_STREAMS and self.device.type == "cuda"
        self._side_streams: list[torch.cuda.Stream] = []

    def _pool_spec(self, mixer) -> tuple[type, dict]:
        """The pool class and its settings (all but slots, device and dtype) for one mixer's decoding state."""
        c = mixer.cfg
        if mixer.kind in ("attention", "sliding_window"):
            return AttentionPool, dict(
                heads=c.head_groups,
                head_size=c.head_size,
                capacity=self.max_context,
                window=c.window_size,
                spare=self.spec_k_max + 1,
            )
        if mixer.kind == "gdn":
            channels = [2 * mixer.key_dim + mixer.value_dim]
            return RecurrentPool, dict(
                heads=c.value_heads,
                dk=c.key_head_dim,
                dv=c.value_head_dim,
                conv_channels=channels,
                kernel=c.conv_kernel,
            )
        channels = [3 * c.heads * c.head_dim]  # one tail for the three convs (see KimiDeltaAttention)
        return RecurrentPool, dict(
            heads=c.heads, dk=c.head_dim, dv=c.head_dim, conv_channels=channels, kernel=c.conv_kernel
        )

    def _full_attention_slots(self, specs: list[dict[str, tuple[type, dict]]], slots: int, budget: int | None) -> int:
        """Slots of each full-attention pool: ``slots`` when every pool fits the state budget, else as many as fit
        beside ``slots`` of every other pool (their size does not depend on the context)."""
        grows = fixed = 0
        for layer in specs:
            for cls, kw in layer.values():
                size = cls.slot_bytes(**kw, dtype=self.dtype)
                if _grows(cls, kw.get("window")):
                    grows += size
                else:
                    fixed += size
        if budget is None or (grows + fixed) * slots <= budget:
            return slots
        fit = (budget - fixed * slots) // grows if grows else 0
        if fit < 1:
            raise ValueError(
                f"decoding state does not fit: {slots} requests' recurrent and window state ({_size(fixed * slots)}) "
                f"plus one request's full-attention KV at a context of {self.max_context} tokens ({_size(grows)}) "
                f"need {_size(fixed * slots + grows)}, over the state budget of {_size(budget)}; lower the context "
                "or the batch, or raise the budget"
            )
        return int(min(slots, fit))

    def _reserved_slots(
        self, specs: list[dict[str, tuple[type, dict]]], reserved: dict[Placement, int], budget: int | None
    ) -> list[dict[str, int]]:
        """Slots per pool for ``placement_slots``: the requests of every placement that uses the pool."""
        counts: list[dict[str, int]] = [dict.fromkeys(layer, 0) for layer in specs]
        for placement, count in reserved.items():
            for i, name in enumerate(placement):
                counts[i][name] += count
        total = sum(
            cls.slot_bytes(**kw, dtype=self.dtype) * counts[i][name]
            for i, layer in enumerate(specs)
            for name, (cls, kw) in layer.items()
        )
        if budget is not None and total > budget:
            raise ValueError(
                f"decoding state does not fit: the reserved requests' pools need {_size(total)} at a context of "
                f"{self.max_context} tokens, over the state budget of {_size(budget)}; reserve fewer requests or "
                "lower the context"
            )
        return counts

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: Sequence[int],
        placement: PlacementSpec = None,
        params: SamplingParams | None = None,
        *,
        draft: PlacementSpec = None,
        spec_k: int = 4,
    ) -> Request:
        """Queue a request; raises RequestError for bad input and QueueFullError when the queue is at its bound."""
        req = self.prepare(prompt, placement, params, draft=draft, spec_k=spec_k)
        self.enqueue([req])
        return req

    def prepare(
        self,
        prompt: Sequence[int],
        placement: PlacementSpec = None,
        params: SamplingParams | None = None,
        *,
        draft: PlacementSpec = None,
        spec_k: int = 4,
    ) -> Request:
        """A checked request, not queued yet (``enqueue``): a server validates every request of an HTTP call before
        it queues any, so a call answered 400 leaves nothing running. Raises RequestError for bad input."""
        params = dataclasses.replace(params or SamplingParams())
        params.validate()
        if is_greedy(params.temperature):
            params.temperature = 0.0  # sampling's own greedy threshold, made explicit for the grouped samplers
        try:
            target = self.model.resolve(placement)
            draft_p = self.model.resolve(draft) if draft is not None else None
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestError("the prompt is empty")
        if any(t < 0 or t >= self.config.vocab_size for t in prompt):
            raise RequestError(f"token ids must lie in [0, {self.config.vocab_size})")
        if len(prompt) + 1 > self.max_context:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_context}")
        if draft_p is not None and not 1 <= spec_k <= self.spec_k_max:  # spec_k means nothing without a draft
            raise RequestError(f"spec_k must lie in [1, {self.spec_k_max}]")
        needs = self._needs(target, draft_p)
        missing = [(i, name) for i, name in needs if name not in self.pools[i]]
        if missing:
            i, name = missing[0]
            served = ", ".join(placement_letters(p, self.config) for p in self.served or ())
            raise RequestError(
                f"this engine holds no {name} state in layer {i}: it serves only the placements {served} (and drafts "
                "among them)"
            )
        for (i, name), count in needs.items():
            pool = self.pools[i][name]
            if count > pool.alloc.n:  # target and draft both use this pool: it must hold two slots
                budget = " (the state budget's limit)" if _grows(type(pool), getattr(pool, "window", None)) else ""
                raise RequestError(
                    f"the request needs {count} slots of layer {i}'s {name} pool, which has {pool.alloc.n}{budget}"
                )
        req = Request(next(self._ids), prompt, target, params, draft=draft_p, spec_k=spec_k, tokens=list(prompt))
        req.needs = needs
        req.scoring = params.max_tokens == 0
        req.label = placement_letters(target, self.config)
        stops = params.stop_token_ids if params.stop_token_ids is not None else self.config.eos_ids()
        req.stops = frozenset(stops)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed % 2**64)
        return req

    def enqueue(self, requests: Sequence[Request]) -> None:
        """Queue prepared requests, all or none: QueueFullError when they do not all fit the queue's bound."""
        with self.lock:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFullError(
                    f"{len(self.waiting)} requests are waiting and {len(requests)} more would pass the bound of "
                    f"{self.max_queue}"
                )
            for req in requests:
                req.arrival = time.perf_counter()
                self._logprob_requests += req.params.logprobs is not None
            self.waiting.extend(requests)

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client disconnected); its slots are freed at the next step."""
        with self.lock:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
                self._finish(request, "cancelled")

    def has_room(self, placement: PlacementSpec) -> bool:
        """Whether a request of this placement submitted now could start at the next step (see ``room_check``)."""
        return self.room_check()(placement)

    def room_check(self) -> Callable[[PlacementSpec], bool]:
        """A snapshot of the free rows and pool slots, as a test of whether a request of a placement submitted now
        could start at the next step: a free row, and a slot in each of its pools beyond those the waiting
        requests need (they go first). For ``auto``, which tries several presets per request: one that would
        wait may give way to one that would start."""
        with self.lock:
            if len(self.running) + len(self.waiting) >= self.max_batch:
                return lambda placement: False
            free = {
                (i, name): pool.alloc.available for i, layer in enumerate(self.pools) for name, pool in layer.items()
            }
            for req in self.waiting:
                for key, count in req.needs.items():
                    free[key] -= count

        def check(placement: PlacementSpec) -> bool:
            try:
                needs = self._needs(self.model.resolve(placement), None)
            except ValueError:
                return False
            return all(free.get(key, 0) >= count for key, count in needs.items())

        return check

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @staticmethod
    def _needs(target: Placement, draft: Placement | None) -> dict[tuple[int, str], int]:
        """Slots a request holds per (layer, mixer) pool: its placement's, plus its draft's."""
        needs: dict[tuple[int, str], int] = {}
        for placement in (target, draft) if draft is not None else (target,):
            for key in enumerate(placement):
                needs[key] = needs.get(key, 0) + 1
        return needs

    def _admit(self) -> None:
        """Start waiting requests in arrival order while the batch has room. A request that finds a pool full
        waits, and reserves that pool: later requests may pass it only if they need none of the reserved pools,
        so it is not starved. Meanwhile, with the full-attention pools taken, requests of presets without full
        attention still start."""
        if not self.waiting or len(self.running) >= self.max_batch:
            return
        # nothing freed and nothing new since a pass that started no one: this pass would start no one either
        state = (self.finished_count, self.waiting[-1].id, len(self.waiting))
        if state == self._admit_idle:
            return
        blocked: set[tuple[int, str]] = set()  # pools reserved by waiting requests ahead
        taken: dict[tuple[int, str], list[int]] = {}  # slots handed out in this pass, reset together below
        pools = self.pools
        started = 0
        # every free row can start a request, and up to ADMIT_LOOKAHEAD blocked ones may be passed over on the way
        for req in list(itertools.islice(self.waiting, self.max_batch - len(self.running) + ADMIT_LOOKAHEAD)):
            if len(self.running) >= self.max_batch:
                break
            short = {key for key, c in req.needs.items() if key in blocked or pools[key[0]][key[1]].alloc.available < c}
            if short:
                blocked |= short
                continue
            started += 1
            self.waiting.remove(req)
            for i, name in enumerate(req.placement):
                req.slots[(i, name)] = self._take(i, name, taken)
            if req.draft is not None:
                for i, name in enumerate(req.draft):
                    req.draft_slots[(i, name)] = self._take(i, name, taken)
            req.key = _composition(req.placement, req.slots)
            req.code = self._code(req.key)
            if req.draft is not None:
                req.draft_code = self._code(_composition(req.draft, req.draft_slots))
            rank = self._vacated.pop(req.key, None)
            req.rank = next(self._rank_counter) if rank is None else rank
            self.running.append(req)
        for (i, name), slots in taken.items():
            self.pools[i][name].reset(slots)
        if started:
            # rows by rank: arrival order, except that a request taking the place of a finished one (same placement,
            # same lowest-free slots) takes its row too. The batch then returns to its earlier composition, whose
            # plan and CUDA graph are still cached. In a batch admitted together, lowest-free slots follow arrival,
            # so every pool's rows have ascending slots and their KV is read as a view, not gathered (ordering by
            # placement would interleave the slots of pools that several placements share); a later request that
            # takes freed low slots without inheriting a rank is read by a gather in those pools
            self.running.sort(key=lambda r: r.rank)
        self._admit_idle = None if started else state

    def _code(self, key: tuple) -> int:
        """A request's placement and slots (its ``key``) as an int, so the key of a batch of B requests is B
        ints (hashed each step) instead of B x layers pairs. Equal contents get equal codes, so a request that
        replaces another in the same slots with the same placement still finds its plan and CUDA graph."""
        if len(self._codes) > 100_000:  # bounded memory: start over, re-coding the running requests
            self._codes.clear()
            self._plans.clear()
            self._graphs.clear()
            self._graph_pool = None  # the next capture starts a fresh pool
            self._padding.clear()
            self._eager_seen.clear()
            for req in self.running:
                req.code = self._code(req.key)
                if req.draft is not None:
                    req.draft_code = self._code(_composition(req.draft, req.draft_slots))
        return self._codes.setdefault(key, len(self._codes))

    def _take(self, layer: int, name: str, taken: dict[tuple[int, str], list[int]]) -> int:
        """A free slot of this pool, noted in ``taken`` to be reset before use (one fill per pool per pass)."""
        slot = self.pools[layer][name].alloc.take()
        taken.setdefault((layer, name), []).append(slot)
        return slot

    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason, req.finished_at = True, reason, time.perf_counter()
        self._logprob_requests -= req.params.logprobs is not None
        for (i, name), slot in list(req.slots.items()) + list(req.draft_slots.items()):
            self.pools[i][name].alloc.give(slot)
        req.slots, req.draft_slots = {}, {}
        if req in self.running:
            self.running.remove(req)
            if len(self._vacated) > 4 * self.max_batch:  # bounded: rows nobody took back are forgotten
                self._vacated.clear()
            self._vacated[req.key] = req.rank  # for a request that will take these slots (see _admit)
        self.finished_count += 1

    # ------------------------------------------------------------------ failures
    def _fail(self, req: Request, error: str, touched: list[Request]) -> None:
        """End one request with an error (finish_reason "error"): its slots are freed, its client told."""
        if req.finished:
            return
        req.error = error
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "error")
        if req not in touched:
            touched.append(req)

    def _contain(self, reqs: Sequence[Request], exc: BaseException, touched: list[Request]) -> None:
        """A part of a step (a prefill forward, a decode step, a speculative round) raised: the requests it served
        fail, with the error, and the engine serves the others on. Their pool slots are freed and reset before
        anyone reads them again (``_take``); a pending decode-ahead step, which may hold their rows, is dropped."""
        log.error("engine step failed for %d request(s)", len(reqs), exc_info=exc)
        message = f"the engine failed on this request: {type(exc).__name__}: {exc}"
        for req in reqs:
            self._fail(req, message, touched)
        self._pending = None
        self._step_failed = True
        self.last_failure_at = time.perf_counter()

    def abort_all(self, error: str) -> list[Request]:
        """Fail every waiting and running request (an unrecoverable step, a shutdown's drain timeout); returns
        them. Call it from the thread that steps the engine."""
        touched: list[Request] = []
        with self.lock:
            for req in [*self.waiting, *self.running]:
                self._fail(req, error, touched)
            self._pending = None
            self._admit_idle = None
        return touched

    # ------------------------------------------------------------------ the forward over a mixed batch
    @torch.no_grad()
    def mixed_forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[dict[tuple[int, str], int]],
        rollback: int = 0,
        max_position: int | None = None,
        last_only: bool = False,
        codes: tuple[int, ...] | None = None,
        fresh: bool = False,
        token_mask: Tensor | None = None,
        hidden: bool = False,
    ) -> tuple[Tensor, list[RecurrentView]]:
        """Logits [B, T, vocab] for rows at their own positions, each under its own placement and pool slots
        (``hidden``: the final normed hidden states [B, T, dim] instead, for callers that want logits of a few
        rows at every position without the [B, T, vocab] tensor).

        With ``rollback``, recurrent views keep per-token snapshots (returned) for speculative rejection; each
        view covers the rows of its group (``RecurrentView.index``).
        ``max_position``: the largest position in ``positions``, known on the host; the pools then skip their
        own (synchronising) capacity checks. ``last_only``: logits of the last position only (prefill).
        ``codes``: the rows' ``Request.code`` (a cheaper key for the batch's plan). ``fresh``: every row starts
        at position 0 (its prompt's first chunk), so attention needs only this call's keys (see AttentionView).
        ``token_mask`` [B, T]: real tokens of fresh rows left-padded to a common length (padding sits at negative
        positions).
        """
        if token_mask is not None and not fresh:
            raise ValueError("only fresh rows (first prompt chunks) may be padded")
        if max_position is not None:
            self._check_context(max_position)
        mix = _GroupedMix(self, self._plan(placements, slots, codes), positions, token_mask, rollback,
                          max_position is not None, fresh)  # fmt: skip
        out = self.model(tokens, mix=mix, last_only=last_only, return_hidden=hidden)
        return out, mix.views

    def _fork(self, n: int) -> list[torch.cuda.Stream]:
        """``n`` side streams that start after the work queued so far on the current stream (none where group
        streams are off). A layer's mixer groups touch disjoint rows and their own pools, so they may run at once:
        a group of a mixed batch is a chain of small kernels (a few dozen rows each), which alone leaves most of
        the GPU idle, and one stream would run the groups' chains one after another."""
        if not self.group_streams or n <= 0:
            return []
        while len(self._side_streams) < n:
            self._side_streams.append(torch.cuda.Stream(self.device))
        main = torch.cuda.current_stream(self.device)
        side = self._side_streams[:n]
        for stream in side:
            stream.wait_stream(main)
        return side

    def _join(self, side: list[torch.cuda.Stream]) -> None:
        """The current stream waits for the side streams' work (everything after reads the groups' outputs).
        Tensors made on a side stream and read later on another stream are ordered through these joins and the
        next forks, and are freed back to their own stream's memory: reuse is ordered too."""
        if not side:
            return
        main = torch.cuda.current_stream(self.device)
        for stream in side:
            main.wait_stream(stream)

    def _graph_decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[dict[tuple[int, str], int]],
        max_position: int,
        codes: tuple[int, ...] | None = None,
    ) -> Tensor:
        """Next-token logits [B, vocab] of a decode step, replayed from a CUDA graph of this batch composition
        (``graph_forward`` of one token). A batch that has only lost rows replays its earlier graph padded (see
        ``_padded``) rather than capturing every smaller size."""
        padded = None
        if codes is not None and self._graph_key(placements, slots, codes, 1, 0) not in self._graphs:
            padded = self._padded(codes)
        if padded is not None:
            graph, live = padded
            self._check_context(max_position)
            graph.tokens.zero_()  # the missing rows decode token 0 at position 0 into their free slots
            graph.positions.zero_()
            graph.tokens[live] = tokens
            graph.positions[live] = positions
            graph.graph.replay()
            return graph.logits[live][:, -1]
        return self.graph_forward(tokens, positions, placements, slots, max_position, codes)[0][:, -1]

    def graph_forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        placements: Sequence[Placement],
        slots: Sequence[dict[tuple[int, str], int]],
        max_position: int,
        codes: tuple[int, ...] | None = None,
        rollback: int = 0,
    ) -> tuple[Tensor, list[RecurrentView]]:
        """``mixed_forward`` of [B, T] tokens replayed from a CUDA graph of this composition, T and roll-back (a
        decode step, a speculative draft step, or a verify pass: k + 1 tokens per row, with per-token snapshots of
        the recurrent state). Returns the graph's own logits and views: valid until the next graph replay (graphs
        share one memory pool). Graphs keep their plan (index tensors) and static inputs alive; the pools are
        fixed buffers, positions are device data and capacity is checked on the host. Eager where ``_graph_for``
        gives no graph (and on the CPU)."""
        t = tokens.shape[1]
        key = self._graph_key(placements, slots, codes, t, rollback)
        graph = self._graph_for(key, placements, slots, codes, t, rollback) if self.cuda_graphs else None
        if graph is None:
            with fusion(self.cuda_graphs):
                return self.mixed_forward(
                    tokens, positions, placements, slots, rollback=rollback, max_position=max_position, codes=codes
                )
        self._check_context(max_position)
        graph.tokens.copy_(tokens)
        graph.positions.copy_(positions)
        graph.graph.replay()
        return graph.logits, graph.views

    def _graph_key(self, placements, slots, codes, tokens: int, rollback: int) -> tuple:
        return (*self._plan_key(placements, slots, codes), tokens, rollback)

    def _graph_for(self, key: tuple, placements, slots, codes, tokens: int, rollback: int) -> _DecodeGraph | None:
        """The cached graph of ``key``, captured now if that key ran eagerly among the last few eager forwards, or
        None: the caller then runs this forward eagerly, with the fused bodies a graph would replay, so they
        compile now and not inside a capture (capture only records: it neither runs nor writes the pools). A
        batch in flux (rows coming and going) thus pays no capture per step, while a composition that recurs --
        a steady decode batch, a speculative round's draft steps and verify pass -- is captured on its second
        forward."""
        graph = self._graphs.pop(key, None)
        if graph is None:
            if key not in self._eager_seen:
                self._eager_seen.append(key)
                return None
            graph = _DecodeGraph(self, key, placements, slots, codes, tokens, rollback)
            if len(self._graphs) >= 8:  # keep the recently replayed ones (each holds its outputs and index tensors)
                self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = graph  # (re)inserted last: the most recently replayed
        return graph

    def _padded(self, codes: tuple[int, ...]) -> tuple[_DecodeGraph, Tensor] | None:
        """A cached graph to replay for a batch that lost rows: its composition holds these rows in this order
        (rows keep their rank order, see _admit) plus at most as many others, and every slot of those others is
        free (their requests ended and no one took the slots since), so they can decode a dummy token there:
        their output is dropped, and a slot is reset when it is next taken. Returns (graph, the live rows'
        indices in it). Without this, a draining batch (requests ending at different times, none waiting) pays
        an eager step and a capture at every size."""
        found = self._padding.get(codes)
        if found is None or self._graphs.get(found[0].key) is not found[0]:
            found = None
            for graph in reversed(self._graphs.values()):  # the most recent first
                full = graph.codes
                if full is None or not graph.decode or not len(codes) < len(full) <= 2 * len(codes):
                    continue  # (a verify pass's graph holds the same kind of codes, but k + 1 tokens)
                live = _subsequence(codes, full)
                if live is not None:
                    gone = sorted(set(range(len(full))) - set(live))
                    found = (graph, torch.tensor(live, device=self.device), [graph.slots[j] for j in gone])
                    break
            if found is None:
                return None
            if len(self._padding) >= 64:
                self._padding.pop(next(iter(self._padding)))
            self._padding[codes] = found
        graph, live, gone = found
        pools = self.pools
        if any(pools[i][name].alloc.busy[slot] for row in gone for (i, name), slot in row.items()):
            return None
        return graph, live

    def _check_context(self, max_position: int) -> None:
        if max_position >= self.max_context:
            raise PoolFullError(f"position {max_position} is beyond the engine's context of {self.max_context}")

    def _plan_key(
        self,
        placements: Sequence[Placement],
        slots: Sequence[dict[tuple[int, str], int]],
        codes: tuple[int, ...] | None = None,
    ) -> tuple:
        if codes is not None:
            return (self.contiguous_reads, "codes", codes)
        return (self.contiguous_reads, tuple(map(tuple, placements)), tuple(tuple(sorted(s.items())) for s in slots))

    def _plan(
        self,
        placements: Sequence[Placement],
        slots: Sequence[dict[tuple[int, str], int]],
        codes: tuple[int, ...] | None = None,
    ) -> list[list[_Group]]:
        """Per layer, the groups of rows that share a mixer, with their row and slot index tensors.

        Kept for the batch's composition (placements and slots), which a steady decode batch repeats every step:
        building index tensors on the host each layer and step costs a host-to-device copy apiece, each of which
        waits for the GPU.
        """
        key = self._plan_key(placements, slots, codes)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        plan = []
        row_tensors: dict[tuple[int, ...], Tensor] = {}  # equal row sets share one tensor (and one StepContext)
        for i in range(len(self.model.blocks)):
            by_mixer: dict[str, list[int]] = {}
            for row, placement in enumerate(placements):
                by_mixer.setdefault(placement[i], []).append(row)
            layer = []
            for name, rows in by_mixer.items():
                slot_list = [slots[r][(i, name)] for r in rows]
                layer.append(
                    _Group(
                        name,
                        None
                        if len(by_mixer) == 1
                        else row_tensors.setdefault(tuple(rows), torch.tensor(rows, device=self.device)),
                        torch.tensor(slot_list, device=self.device),
                        consecutive_span(slot_list) if self.contiguous_reads else None,
                    )
                )
            plan.append(layer)
        if len(self._plans) >= 64:  # compositions change as requests come and go: keep the recent ones
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ one engine iteration
    def step(self) -> list[Request]:
        """Advance every running request by one prefill chunk or one decode step; returns requests that emitted
        tokens or finished (their ``new_tokens`` hold what this step produced). With ``overlap``, a steady decode
        batch emits each step's tokens one call later, while the GPU already computes the next step.
        Each part of a step (a prefill forward, a decode step, a speculative round) is guarded: one that raises
        fails the requests it served, and only those (``_contain``)."""
        touched: list[Request] = []
        self._step_failed = False
        with self.lock:
            for req in self.running:
                req.new_tokens = []
            ahead = self._pending is not None and self._can_continue()
        if ahead:
            self._guarded(self._pending.reqs, touched, self._decode_ahead, touched)
            return self._stepped(touched)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._guarded(pending.reqs, touched, self._flush, pending, touched)
        with self.lock:
            for req in [r for r in self.running if r.cancelled]:
                self._finish(req, "cancelled")
            self._admit()
            running = list(self.running)
        # prefill: one chunk per request still reading its prompt (target and, for speculation, draft state). First
        # chunks of any lengths share forwards (left-padded, see _prefill_chunks); later chunks, which read the
        # pools, share one only with chunks of their own length. Requests that want their prompt's log-probabilities
        # get forwards of their own (logits at every position), so the others never pay for them
        first, later = {}, {}
        for req in running:
            left = len(req.tokens) - req.processed - req.scoring  # a scoring request never reads its last token
            if left > 1 or (req.scoring and left > 0):
                n = min(self.prefill_chunk, left)
                scored = req.prompt_logprobs is not None
                if req.processed == 0:
                    first.setdefault(scored, []).append((req, n))
                else:
                    later.setdefault((n, scored), []).append((req, n))
        for group in [*first.values(), *later.values()]:
            for part in _pack(group, self.prefill_tokens):
                reqs = [req for req, _ in part]
                self._guarded(reqs, touched, self._prefill_chunks, reqs, [n for _, n in part], touched)
        ready = []
        for r in running:
            if not r.finished and len(r.tokens) - r.processed == 1:
                if r.scoring:  # its prompt is scored: done, without generating
                    with self.lock:
                        self._finish(r, "length")
                    touched.append(r)
                else:
                    ready.append(r)
        plain = [r for r in ready if r.draft is None]
        if (
            plain
            and self.overlap
            and len(plain) == len(running)
            and all(r.generator is None for r in plain)
            and (not self._logprob_requests or all(r.params.logprobs is None for r in plain))
        ):  # steady decode: tokens come next call
            self._guarded(plain, touched, self._launch_pending, plain)
        elif plain:
            self._guarded(plain, touched, self._decode, plain, touched)
        spec = [r for r in ready if r.draft is not None]
        if spec:
            from .speculative import speculative_round

            for group in _group_by(spec, lambda r: r.spec_k):
                self._guarded(group, touched, speculative_round, self, group, touched)
        return self._stepped(touched)

    def _guarded(self, reqs: list[Request], touched: list[Request], fn: Callable, *args) -> None:
        """``fn(*args)``, a part of a step serving ``reqs``; if it raises, only they fail (see ``_contain``)."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not stop the engine for everyone
            self._contain(reqs, exc, touched)

    def _stepped(self, touched: list[Request]) -> list[Request]:
        self.failed_steps = self.failed_steps + 1 if self._step_failed else 0
        return touched

    def _launch_pending(self, reqs: list[Request]) -> None:
        self._pending = self._launch(reqs, *self._decode_inputs(reqs))

    def _decode(self, reqs: list[Request], touched: list[Request]) -> None:
        """One plain decode step of these requests, its tokens booked at once."""
        logits = self._decode_logits(reqs, *self._decode_inputs(reqs))
        tokens = self._sample_rows(reqs, logits)
        self._record_logprobs(reqs, logits, tokens)
        for req, token in zip(reqs, tokens, strict=True):
            req.processed += 1
            self._emit(req, [token], touched)

    def _record_logprobs(self, reqs: list[Request], logits: Tensor, tokens: list[int]) -> None:
        """The log-probabilities of the tokens just drawn (``logits`` [B, vocab], one row per request), for the
        requests that asked (``params.logprobs``); nothing at all when none did."""
        if not self._logprob_requests:
            return
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and tokens[i] >= 0]
        if not rows:
            return
        picked = logits if len(rows) == len(reqs) else logits[torch.tensor(rows, device=logits.device)]
        top = max(reqs[i].params.logprobs for i in rows)
        for i, entry in zip(rows, token_logprobs(picked, [tokens[i] for i in rows], top), strict=True):
            k = reqs[i].params.logprobs
            reqs[i].logprobs.append(entry if len(entry.top) <= k else entry._replace(top=entry.top[:k]))

    def _decode_inputs(self, reqs: list[Request]) -> tuple[Tensor, Tensor]:
        """Each request's last token and its position, [B, 1] each, from the host."""
        positions = torch.tensor([r.processed for r in reqs], device=self.device)[:, None]
        tokens = torch.tensor([r.tokens[-1] for r in reqs], device=self.device)[:, None]
        return tokens, positions

    def _decode_logits(self, reqs: list[Request], tokens: Tensor, positions: Tensor) -> Tensor:
        """Next-token logits [B, vocab] of a decode step (from a CUDA graph of the batch composition when enabled)."""
        args = (tokens, positions, [r.placement for r in reqs], [r.slots for r in reqs])
        last, codes = max(r.processed for r in reqs), tuple(r.code for r in reqs)
        if self.cuda_graphs:
            return self._graph_decode(*args, last, codes)
        return self.mixed_forward(*args, max_position=last, codes=codes)[0][:, -1]

    # ------------------------------------------------------------------ decoding one step ahead
    def _launch(self, reqs: list[Request], tokens: Tensor, positions: Tensor) -> _Pending:
        """Queue a decode step of ``reqs`` and the sampling of its tokens, all on the device; the tokens reach the
        host (``_flush``) later. The requests' state then holds the fed token: ``processed`` advances now."""
        logits = self._decode_logits(reqs, tokens, positions)
        for req in reqs:
            req.processed += 1
        sampled, redraws = self._sample_on_device(reqs, logits, tuple(r.code for r in reqs))
        pending = _Pending(reqs, sampled, positions, sampled, None, logits if redraws else None, redraws)
        self._copy_to_host(pending)
        return pending

    @staticmethod
    def _copy_to_host(p: _Pending) -> None:
        """Start copying the pending tokens to the host while the GPU goes on; the event marks their arrival."""
        if p.tokens.is_cuda:
            p.host = torch.empty(p.tokens.shape, dtype=p.tokens.dtype, pin_memory=True)
            p.host.copy_(p.tokens, non_blocking=True)
            p.event = torch.cuda.Event()
            p.event.record()

    def _settle(self, p: _Pending) -> None:
        """Redraw the pending rows whose top-p nucleus was wider than the sampler's candidates (generation.
        sample_candidates). Learning whether there are any is the sampler's one host sync; it is taken here, after
        the host has booked the previous step and before anything reads these tokens (the next launch, the
        flush), so the GPU computed this step meanwhile. The step's logits are still intact: nothing ran since."""
        if p.redraws and self._redraw(p.tokens, p.logits, p.redraws):
            self._copy_to_host(p)
        p.redraws, p.logits = [], None

    @staticmethod
    def _redraw(tokens: Tensor, logits: Tensor, redraws: list) -> bool:
        """Apply ``_sample_on_device``'s pending redraws to ``tokens`` in place; whether any row changed."""
        from ..generation import redraw_wide

        changed = False
        for index, (temperature, _, top_p), wide in redraws:
            part = tokens if index is None else tokens[index]
            fixed = redraw_wide(part, wide, logits if index is None else logits[index], temperature, top_p)
            if fixed is not part:
                changed = True
                if index is None:
                    tokens.copy_(fixed)
                else:
                    tokens[index] = fixed
        return changed

    def _can_continue(self) -> bool:
        """Whether the next step may be launched before the pending tokens are booked: the same requests still
        run (none cancelled, none waiting to be admitted), all inside the context. A pending token that ends its
        request (stop, length) only wastes that request's next step, which is discarded."""
        p = self._pending
        if not self.overlap or (self.waiting and len(self.running) < self.max_batch):
            return False
        if len(self.running) != len(p.reqs) or any(a is not b for a, b in zip(self.running, p.reqs, strict=True)):
            return False
        return not any(r.cancelled for r in p.reqs) and max(r.processed for r in p.reqs) < self.max_context

    def _decode_ahead(self, touched: list[Request]) -> None:
        """Launch the next decode step from the pending (device) tokens, then book the pending tokens on the host
        while the GPU computes it."""
        p = self._pending
        self._settle(p)
        # a row the sampler could not draw for holds -1 (booked as a failure by _flush): feed it a valid id
        self._pending = self._launch(p.reqs, p.tokens.clamp(min=0)[:, None], p.positions + 1)
        self._flush(p, touched)

    def _flush(self, p: _Pending, touched: list[Request]) -> None:
        """Book a launched step's tokens: emit each to its request, skipping requests that ended meanwhile."""
        self._settle(p)
        if p.event is not None:
            p.event.synchronize()
        for req, token in zip(p.reqs, p.host.tolist(), strict=True):
            if not (req.finished or req.cancelled):
                self._emit(req, [token], touched)

    def _sample_on_device(
        self, reqs: list[Request], logits: Tensor, codes: tuple[int, ...]
    ) -> tuple[Tensor, list[tuple[Tensor | None, tuple, Tensor]]]:
        """Next tokens [B] on the device, drawn per group of sampling settings (no seeded requests here), and the
        groups whose rows may need a redraw (see _settle): (row index or None, settings, rows flagged). The
        groups' row indices are kept per batch composition, so no host-to-device copy (a sync) runs per step."""
        from ..generation import sample_candidates

        settings = tuple((r.params.temperature, r.params.top_k, r.params.top_p) for r in reqs)
        key = (codes, settings)
        groups = self._sample_index.get(key)
        if groups is None:
            groups = index_groups(settings, self.device)
            if len(self._sample_index) >= 64:
                self._sample_index.pop(next(iter(self._sample_index)))
            self._sample_index[key] = groups
        out = None if len(groups) == 1 else torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        redraws = []
        for setting, index in groups:
            part = logits if index is None else logits[index]
            try:
                tokens, wide = sample_candidates(part, *setting)
            except Exception:  # noqa: BLE001 - find the rows it fails on, row by row: only they fail
                tokens, wide = _sample_each(part, setting), None
            if wide is not None:
                redraws.append((index, setting, wide))
            if out is None:
                out = tokens
            else:
                out[index] = tokens
        return out, redraws

    def _prefill_chunks(self, reqs: list[Request], lengths: list[int], touched: list[Request]) -> None:
        """The next ``lengths[i]`` prompt tokens of each request, in one forward (rows at their own positions).

        Chunks of different lengths are left-padded to the longest, which only first chunks may be: their padding
        is masked out of attention, an identity for the recurrent mixers (as in a left-padded Supernet.generate),
        and written nowhere a real token is. The last column is then every row's last prompt token."""
        width = max(lengths)
        pads = [width - n for n in lengths]
        tokens = torch.tensor(
            [
                [0] * pad + r.tokens[r.processed : r.processed + n]
                for r, n, pad in zip(reqs, lengths, pads, strict=True)
            ],
            device=self.device,
        )
        starts = torch.tensor([[r.processed - pad] for r, pad in zip(reqs, pads, strict=True)], device=self.device)
        positions = starts + torch.arange(width, device=self.device)  # padding at negative positions
        last = max(r.processed + n for r, n in zip(reqs, lengths, strict=True)) - 1
        fresh = all(r.processed == 0 for r in reqs)  # every row reads its prompt's first chunk
        if not fresh and any(pads):
            raise ValueError("only first prompt chunks may be padded")
        mask = positions >= 0 if any(pads) else None
        scored = reqs[0].prompt_logprobs is not None  # step() gives such requests forwards of their own
        logits, _ = self.mixed_forward(
            tokens,
            positions,
            [r.placement for r in reqs],
            [r.slots for r in reqs],
            max_position=last,
            last_only=not scored,
            fresh=fresh,
            token_mask=mask,
            hidden=scored,
        )
        if scored:
            self._record_prompt_logprobs(reqs, lengths, pads, logits)
            logits = self.model.logits(logits[:, -1:])
        drafting = [i for i, r in enumerate(reqs) if r.draft is not None]
        if drafting:  # the draft reads the same prompt into its own state
            rows = torch.tensor(drafting, device=self.device)
            self.mixed_forward(
                tokens[rows],
                positions[rows],
                [reqs[i].draft for i in drafting],
                [reqs[i].draft_slots for i in drafting],
                max_position=last,
                last_only=True,
                fresh=fresh,
                token_mask=None if mask is None else mask[rows],
            )
            for i in drafting:
                reqs[i].draft_processed += lengths[i]
        for req, n in zip(reqs, lengths, strict=True):
            req.processed += n
        done = [i for i, r in enumerate(reqs) if r.processed == len(r.tokens)]
        if done:
            picked = logits[torch.tensor(done, device=self.device), -1] if len(done) < len(reqs) else logits[:, -1]
            finished = [reqs[i] for i in done]
            tokens = self._sample_rows(finished, picked)
            self._record_logprobs(finished, picked, tokens)
            for req, token in zip(finished, tokens, strict=True):
                self._emit(req, [token], touched)

    def _record_prompt_logprobs(self, reqs: list[Request], lengths: list[int], pads: list[int], hidden: Tensor) -> None:
        """Log-probabilities of the prompt tokens that this prefill chunk predicts (``hidden`` [B, T, dim], rows
        left-padded by ``pads``): position p's logits score token p + 1, up to the prompt's last token (the
        first generated token is scored by ``_record_logprobs``). One row's logits at a time."""
        for row, (req, n, pad) in enumerate(zip(reqs, lengths, pads, strict=True)):
            start = req.processed  # the chunk's first position (called before processed counts the chunk)
            m = min(n, len(req.prompt) - 1 - start)
            if m > 0:
                logits = self.model.logits(hidden[row, pad : pad + m])
                targets = req.prompt[start + 1 : start + 1 + m]
                req.prompt_logprobs += token_logprobs(logits, targets, req.params.prompt_logprobs)

    def _sample_rows(self, reqs: list[Request], logits: Tensor) -> list[int]:
        """Next tokens of many requests, on the host: seeded requests draw from their own generators one by one,
        the others through ``_sample_on_device`` (one draw per group of sampling settings) and one read-back."""
        out = [0] * len(reqs)
        plain = []
        for i, req in enumerate(reqs):
            if req.generator is not None:
                out[i] = self._sample(req, logits[i])
            else:
                plain.append(i)
        if plain:
            if len(plain) < len(reqs):
                reqs, logits = [reqs[i] for i in plain], logits[torch.tensor(plain, device=logits.device)]
            tokens, redraws = self._sample_on_device(reqs, logits, tuple(r.code for r in reqs))
            self._redraw(tokens, logits, redraws)
            for i, token in zip(plain, tokens.tolist(), strict=True):
                out[i] = int(token)
        return out

    def _sample(self, req: Request, logits: Tensor) -> int:
        from ..generation import sample_next

        p = req.params
        try:
            return int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, req.generator)[0])
        except Exception:  # noqa: BLE001 - this request fails (see _emit), the others are drawn
            log.exception("sampling failed for request %d", req.id)
            return -1

    def _emit(self, req: Request, new: list[int], touched: list[Request]) -> None:
        """Append generated tokens, applying stop tokens, max_tokens and the context limit. A token of -1 is the
        sampler's mark of a row it could not draw for (NaN or infinite logits, or it raised): that request fails."""
        if new[-1] < 0:
            self._fail(req, "sampling failed: this request's next-token distribution is not finite", touched)
            return
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        reason = None
        if not req.new_tokens:  # its first tokens this step (step() empties new_tokens): O(1), not a list search
            touched.append(req)
        # per token: O(1) checks (this runs for every request of every step)
        length_at = min(len(req.prompt) + req.params.max_tokens, self.max_context)
        emitted = 0
        for tok in new:
            req.tokens.append(tok)
            req.new_tokens.append(tok)
            emitted += 1
            if tok in req.stops:
                reason = "stop"
            elif len(req.tokens) >= length_at:
                reason = "length" if len(req.tokens) - len(req.prompt) >= req.params.max_tokens else "context"
            if reason:
                break
        self.tokens_by_placement[req.label] = self.tokens_by_placement.get(req.label, 0) + emitted
        if reason:
            with self.lock:
                self._finish(req, reason)

    # ------------------------------------------------------------------ conveniences
    def run(self, max_steps: int = 100_000) -> None:
        """Step until no work is left (tests, offline batch jobs)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError("the engine did not finish within max_steps")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        placements: Sequence[PlacementSpec] | PlacementSpec = None,
        params: SamplingParams | None = None,
        **kw,
    ) -> list[list[int]]:
        """Run a list of prompts to completion; one placement for all or one per prompt. Returns outputs."""
        if placements is None or isinstance(placements, str):
            placements = [placements] * len(prompts)
        reqs = [self.submit(p, pl, params, **kw) for p, pl in zip(prompts, placements, strict=True)]
        self.run()
        return [r.output for r in reqs]

    def memory_bytes(self) -> int:
        total = 0
        for layer in self.pools:
            for pool in layer.values():
                total += pool.nbytes_per_slot() * pool.alloc.n
        return total


class _DecodeGraph:
    """One forward of a fixed batch composition, captured: static token/position inputs [B, T], static logits
    [B, T, vocab] and, with roll-back, the recurrent views whose snapshots the replay refreshes.

    Also holds what a padded replay needs (``Engine._padded``): its cache key, the rows' codes and slots."""

    def __init__(
        self, engine: Engine, key: tuple, placements: Sequence[Placement], slots, codes=None, tokens=1, rollback=0
    ) -> None:
        self.key, self.codes, self.slots = key, codes, list(slots)
        self.decode = tokens == 1 and rollback == 0  # a plain decode step: may replay padded (Engine._padded)
        b = len(placements)
        self.tokens = torch.zeros(b, tokens, dtype=torch.long, device=engine.device)
        self.positions = torch.zeros(b, tokens, dtype=torch.long, device=engine.device)
        self.plan = engine._plan(placements, slots, codes)  # index tensors must outlive any eviction from the cache
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's event-loop thread may make CUDA calls (a seeded request's generator) while
        # the engine's worker thread captures; under the default "global" mode such calls fail during a capture
        pool = engine._graph_pool
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"), torch.no_grad():
            # max_position=0 only marks the positions as checked: the real bound is checked before each replay
            self.logits, self.views = engine.mixed_forward(
                self.tokens, self.positions, placements, slots, rollback=rollback, max_position=0, codes=codes
            )
        if pool is None:
            engine._graph_pool = self.graph.pool()


class _GroupedMix:
    """The mixer dispatch of a mixed batch (``Supernet.forward``'s ``mix``): in each layer, the rows of each
    mixer group run that mixer on their own pool slots, the groups on their own CUDA streams where those are on,
    and their outputs are scattered into one tensor. Recurrent views (with per-token snapshots under roll-back) are
    collected in ``views``."""

    def __init__(
        self,
        engine: Engine,
        plan: list[list[_Group]],
        positions: Tensor,
        token_mask: Tensor | None,
        rollback: int,
        checked: bool,
        fresh: bool,
    ) -> None:
        self.engine, self.plan, self.positions, self.token_mask = engine, plan, positions, token_mask
        self.rollback, self.checked, self.fresh = rollback, checked, fresh
        self.views: list[RecurrentView] = []
        # one context per set of rows, shared by the layers where that set forms a group: positions are gathered
        # and rotary tables computed once per call, not once per layer (the plan shares equal row tensors)
        self.contexts: dict[int, StepContext] = {}

    def __call__(self, layer: int, block: Block, x: Tensor) -> Tensor:
        groups = self.plan[layer]
        engine = self.engine
        out = None if len(groups) == 1 and groups[0].rows is None else torch.empty_like(x)
        side = engine._fork(len(groups) - 1)
        for g, stream in zip(groups, [None, *side] if side else [None] * len(groups), strict=True):
            with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                pool = engine.pools[layer][g.name]
                if isinstance(pool, RecurrentPool):
                    view = pool.view(g.slots, self.rollback, g.rows, g.span)
                    self.views.append(view)
                else:
                    view = pool.view(g.slots, g.span, self.checked, self.fresh)
                ctx = self.contexts.get(id(g.rows))
                if ctx is None:
                    pos = self.positions if g.rows is None else self.positions[g.rows]
                    if self.token_mask is None:
                        ctx = StepContext(pos, pos)
                    else:
                        real = self.token_mask if g.rows is None else self.token_mask[g.rows]
                        ctx = StepContext(pos, pos.clamp(min=0), token_mask=real, padded=True)
                    self.contexts[id(g.rows)] = ctx
                if g.rows is None:  # every row uses this mixer here: no gather, no scatter
                    out = block.mixer.mixers[g.name](x, ctx, view)
                else:
                    out[g.rows] = block.mixer.mixers[g.name](x[g.rows], ctx, view)
        engine._join(side)
        return out


@dataclass
class _Pending:
    """A launched decode step whose sampled tokens have not been booked on the host yet."""

    reqs: list[Request]
    tokens: Tensor  # [B] sampled, on the device (the next step's input)
    positions: Tensor  # [B, 1] the positions this step fed
    host: Tensor  # [B] the same tokens, on the host once ``event`` has passed
    event: torch.cuda.Event | None
    logits: Tensor | None = None  # the step's logits, kept while some rows may need a redraw
    redraws: list = field(default_factory=list)  # see Engine._settle


@dataclass(frozen=True)
class _Group:
    """Rows of a batch that use mixer ``name`` in one layer (``rows`` None: all of them) and their pool slots."""

    name: str
    rows: Tensor | None
    slots: Tensor
    span: slice | None


def _composition(placement: Placement, slots: dict[tuple[int, str], int]) -> tuple:
    """A request's placement and pool slots as a hashable key (see Engine._code)."""
    return tuple(placement), tuple(sorted(slots.items()))


def _prefill_budget(model: Supernet, chunk: int) -> int:
    """Default ``prefill_tokens``: about PREFILL_FLOP per forward, in [8 * chunk, 16384] tokens. Per token a
    forward costs about twice the parameters it multiplies by: every MLP and, per layer, its largest mixer."""
    params = sum(
        sum(p.numel() for p in block.mlp.parameters())
        + max(sum(p.numel() for p in mixer.parameters()) for mixer in block.mixer.mixers.values())
        for block in model.blocks
    )
    return int(min(16384, max(8 * chunk, PREFILL_FLOP / (2 * max(params, 1)))))


def _pack(rows: list[tuple[Request, int]], budget: int) -> list[list[tuple[Request, int]]]:
    """Prefill chunks (request, length) into forwards of at most ``budget`` tokens, padding counted: longest
    first, and a chunk under half the forward's longest starts a new one (padding stays under half)."""
    parts: list[list[tuple[Request, int]]] = []
    for row in sorted(rows, key=lambda r: -r[1]):
        part = parts[-1] if parts else None
        if part is None or (len(part) + 1) * part[0][1] > budget or 2 * row[1] < part[0][1]:
            parts.append([row])
        else:
            part.append(row)
    return parts


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


def index_groups(keys: Sequence, device: torch.device) -> list[tuple]:
    """Rows grouped by their key, in first-seen order: (key, row index tensor, or None when it is every row)."""
    rows: dict = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return [(key, None if len(idx) == len(keys) else torch.tensor(idx, device=device)) for key, idx in rows.items()]


def _group_by(items, key):
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _sample_each(logits: Tensor, setting: tuple[float, int, float]) -> Tensor:
    """``sample_next`` one row at a time, -1 for each row it raises on (the grouped draw raised)."""
    from ..generation import sample_next

    out = []
    for row in logits:
        try:
            out.append(int(sample_next(row[None], *setting)[0]))
        except Exception:  # noqa: BLE001
            log.exception("sampling failed on one row")
            out.append(-1)
    return torch.tensor(out, device=logits.device)
