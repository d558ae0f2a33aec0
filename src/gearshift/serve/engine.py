"""The serving engine: continuous batching where every request brings its own placement.

Each step admits waiting requests (if every pool their placement needs has a free slot), runs one prefill chunk
per request still reading its prompt, then one decode forward for all requests ready to emit a token. Inside
that forward, every layer splits the batch by the mixer each request uses there and runs each group on its own
pool slots: no weights are reloaded and no cache is cleared when presets differ. Requests with a draft placement
decode speculatively.

``Engine`` wires the parts, each owning one thing and passing data to the next: the scheduler (``scheduler.py``:
queues, admission, emitting and finishing) decides what a step runs; the model runner (``runner.py``: pools,
plans, streams, CUDA graphs in ``graphs.py``) runs it through the model's block loop and returns logits; the
sampler (``sampler.py``) draws tokens; speculative rounds (``speculative.py``) run on the runner and return what
each request accepted. Options: ``EngineConfig`` (``config.py``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import SupernetConfig
from ..model import Supernet
from ..placement import Placement, PlacementSpec
from .config import EngineConfig
from .pools import AttentionPool, RecurrentPool
from .request import QueueFullError, Request, RequestError, SamplingParams
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler

__all__ = ["Engine", "EngineConfig", "QueueFullError", "Request", "RequestError", "SamplingParams"]


class Engine:
    def __init__(self, model: Supernet, config: EngineConfig | None = None, **options: Any) -> None:
        """An engine serving ``model`` under ``config`` (see ``EngineConfig``); keyword ``options`` are the same
        settings (``Engine(model, max_batch=8)``) and take precedence over ``config``'s. The engine lays out
        ``model``'s weights for inference, in place (``Supernet.fuse_projections_``: same names and values, fewer
        matmuls per step)."""
        self.engine_config = dataclasses.replace(config or EngineConfig(), **options)
        self.runner = ModelRunner(model, self.engine_config)
        self.sampler = Sampler(self.runner.device)
        self.scheduler = Scheduler(self.runner, self.sampler, self.engine_config)

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
        return self.scheduler.prepare(prompt, placement, params, draft=draft, spec_k=spec_k)

    def enqueue(self, requests: Sequence[Request]) -> None:
        """Queue prepared requests, all or none: QueueFullError when they do not all fit the queue's bound."""
        self.scheduler.enqueue(requests)

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client disconnected); its slots are freed at the next step."""
        self.scheduler.cancel(request)

    def has_room(self, placement: PlacementSpec) -> bool:
        """Whether a request of this placement submitted now could start at the next step (see ``room_check``)."""
        return self.room_check()(placement)

    def room_check(self) -> Callable[[PlacementSpec], bool]:
        """A snapshot of the free rows and pool slots, as a test of whether a request of a placement submitted now
        could start at the next step (see ``Scheduler.room_check``)."""
        return self.scheduler.room_check()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def abort_all(self, error: str) -> list[Request]:
        """Fail every waiting and running request (an unrecoverable step, a shutdown's drain timeout); returns
        them. Call it from the thread that steps the engine."""
        return self.scheduler.abort_all(error)

    # ------------------------------------------------------------------ stepping
    def start_synthetic(self, requests: Sequence[Request], context: int) -> None:
        """Benchmarks: start these submitted requests now, each as if it had read ``context`` tokens (random state;
        see ``Scheduler.start_synthetic``)."""
        with self.lock:
            self.scheduler.start_synthetic(requests, context)

    def step(self) -> list[Request]:
        """Advance every running request by one prefill chunk or one decode step; returns requests that emitted
        tokens or finished (their ``new_tokens`` hold what this step produced). See ``Scheduler.step``."""
        return self.scheduler.step()

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
        return self.runner.memory_bytes()

    # ------------------------------------------------------------------ what the server and tools read
    @property
    def model(self) -> Supernet:
        return self.runner.model

    @property
    def config(self) -> SupernetConfig:
        """The model's configuration (the engine's own options: ``engine_config``)."""
        return self.runner.config

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    @property
    def prefill_tokens(self) -> int:
        return self.scheduler.prefill_tokens

    @property
    def spec_k_max(self) -> int:
        return self.scheduler.spec_k_max

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (``EngineConfig.cuda_graphs``, on CUDA only)."""
        return self.runner.cuda_graphs

    @property
    def overlap(self) -> bool:
        """Whether steady decode batches run one step ahead (``EngineConfig.overlap``)."""
        return self.scheduler.overlap

    @property
    def served(self) -> tuple[Placement, ...] | None:
        return self.runner.served

    @property
    def placement_slots(self) -> dict[Placement, int] | None:
        return self.runner.placement_slots

    @property
    def full_attention_slots(self) -> int:
        return self.runner.full_attention_slots

    @property
    def state_budget(self) -> int | None:
        return self.runner.state_budget

    @property
    def pools(self) -> list[dict[str, AttentionPool | RecurrentPool]]:
        return self.runner.pools

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def lock(self) -> threading.RLock:
        return self.scheduler.lock

    @property
    def finished_count(self) -> int:
        return self.scheduler.finished_count

    @property
    def tokens_by_placement(self) -> dict[str, int]:
        return self.scheduler.tokens_by_placement

    # the server's worker counts the steps that fail outside the engine's own guards here too
    @property
    def failed_steps(self) -> int:
        return self.scheduler.failed_steps

    @failed_steps.setter
    def failed_steps(self, value: int) -> None:
        self.scheduler.failed_steps = value

    @property
    def last_failure_at(self) -> float:
        return self.scheduler.last_failure_at

    @last_failure_at.setter
    def last_failure_at(self, value: float) -> None:
        self.scheduler.last_failure_at = value
