"""The scheduler: a request's life in the serving engine, from its checks to its last token.

It queues requests, admits them while the batch and the pools have room (taking their pool slots), decides what
each step runs -- one prefill chunk per request still reading its prompt, then one decode step for those ready to
emit a token, or a speculative round for those with a draft -- has the model runner run it, samples, and books the
results: tokens emitted, stop tokens and limits applied, requests finished and their slots given back. A part of a
step that raises fails the requests it served, and only those.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..model import Supernet
from ..placement import Placement, PlacementSpec, placement_letters
from ..sampling import is_greedy
from .config import EngineConfig
from .logprobs import token_logprobs
from .request import QueueFullError, Request, RequestError, SamplingParams
from .runner import ModelRunner, PrefillOutput, grows
from .sampler import Pending, Sampler, copy_to_host
from .speculative import Verified, next_spec_k, round_size, speculative_round

log = logging.getLogger("gearshift.engine")

PREFILL_FLOP = 4e12  # work of one batched prefill forward (default prefill_tokens): ~5 ms of an H200's bf16 matmuls
ADMIT_LOOKAHEAD = 256  # waiting requests passed over (blocked) at most per admission pass, beyond the free rows


class Scheduler:
    """Owns the requests (queues, running batch, counters) and the pool slots they hold; runs each step's parts
    on the runner and the sampler and books what comes back (see the module docstring)."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, config: EngineConfig) -> None:
        self.runner, self.sampler = runner, sampler
        self.model = runner.model
        self.config = runner.config
        self.device = runner.device
        self.max_batch = config.max_batch
        self.max_context = runner.max_context
        self.prefill_chunk = config.prefill_chunk
        self.prefill_tokens = config.prefill_tokens or prefill_budget(runner.model, config.prefill_chunk)
        self.max_queue = config.max_queue
        self.spec_k_max = config.spec_k_max
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
        self._codes: dict[tuple, int] = {}  # (placement, slots) of a request -> a small int (see _code)
        self._rank_counter = itertools.count()  # row ranks (see _admit)
        self._vacated: dict[tuple, int] = {}  # (placement, slots) of a finished request -> its row rank
        # decode one step ahead (see _decode_ahead): the next step is launched from the sampled tokens on the
        # device before the host books this step's tokens, so the GPU does not wait for the host
        self.overlap = self.device.type == "cuda" if config.overlap is None else config.overlap
        self._pending: Pending | None = None

    # ------------------------------------------------------------------ requests
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
        pools = self.runner.pools
        missing = [(i, name) for i, name in needs if name not in pools[i]]
        if missing:
            i, name = missing[0]
            served = ", ".join(placement_letters(p, self.config) for p in self.runner.served or ())
            raise RequestError(
                f"this engine holds no {name} state in layer {i}: it serves only the placements {served} (and drafts "
                "among them)"
            )
        for (i, name), count in needs.items():
            pool = pools[i][name]
            if count > pool.alloc.n:  # target and draft both use this pool: it must hold two slots
                budget = " (the state budget's limit)" if grows(type(pool), getattr(pool, "window", None)) else ""
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

    def room_check(self) -> Callable[[PlacementSpec], bool]:
        """A snapshot of the free rows and pool slots, as a test of whether a request of a placement submitted now
        could start at the next step: a free row, and a slot in each of its pools beyond those the waiting
        requests need (they go first). For ``auto``, which tries several presets per request: one that would
        wait may give way to one that would start."""
        with self.lock:
            if len(self.running) + len(self.waiting) >= self.max_batch:
                return lambda placement: False
            free = {
                (i, name): pool.alloc.available
                for i, layer in enumerate(self.runner.pools)
                for name, pool in layer.items()
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

    @staticmethod
    def _needs(target: Placement, draft: Placement | None) -> dict[tuple[int, str], int]:
        """Slots a request holds per (layer, mixer) pool: its placement's, plus its draft's."""
        needs: dict[tuple[int, str], int] = {}
        for placement in (target, draft) if draft is not None else (target,):
            for key in enumerate(placement):
                needs[key] = needs.get(key, 0) + 1
        return needs

    def start_synthetic(self, requests: Sequence[Request], context: int) -> None:
        """Admit these queued requests now (all must fit) and give each ``context`` tokens of random decoding state
        in its slots (its draft's too), as if it had read a prompt that long: what benchmarks time decode at long
        context with, without paying for the prefill. The synthetic context counts as prompt."""
        for req in requests:  # checked before any is admitted
            if not len(req.prompt) <= context <= self.runner.max_context:
                raise ValueError(f"context {context}: needs the prompt's {len(req.prompt)} to the engine's "
                                 f"{self.runner.max_context} tokens")  # fmt: skip
        self._admit()
        missing = [r for r in requests if r not in self.running]
        if missing:
            raise RuntimeError(
                f"only {len(requests) - len(missing)} of {len(requests)} requests fit the state budget "
                f"({self.runner.full_attention_slots} full-attention slots)"
            )
        pools = self.runner.pools
        for req in requests:
            gen = torch.Generator(device=self.runner.device).manual_seed(req.id)
            for (i, name), slot in list(req.slots.items()) + list(req.draft_slots.items()):
                pools[i][name].fill_random(slot, context, gen)
            req.tokens = req.prompt + [1] * (context - len(req.prompt))
            req.prompt = list(req.tokens)  # max_tokens counts what follows
            req.processed = req.draft_processed = context - 1

    # ------------------------------------------------------------------ admission and finishing
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
        pools = self.runner.pools
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
        self.runner.reset_slots(taken)
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
            self.runner.forget_compositions()  # its plans and graphs are keyed by the old codes
            for req in self.running:
                req.code = self._code(req.key)
                if req.draft is not None:
                    req.draft_code = self._code(_composition(req.draft, req.draft_slots))
        return self._codes.setdefault(key, len(self._codes))

    def _take(self, layer: int, name: str, taken: dict[tuple[int, str], list[int]]) -> int:
        """A free slot of this pool, noted in ``taken`` to be reset before use (one fill per pool per pass)."""
        slot = self.runner.pools[layer][name].alloc.take()
        taken.setdefault((layer, name), []).append(slot)
        return slot

    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason, req.finished_at = True, reason, time.perf_counter()
        self._logprob_requests -= req.params.logprobs is not None
        pools = self.runner.pools
        for (i, name), slot in list(req.slots.items()) + list(req.draft_slots.items()):
            pools[i][name].alloc.give(slot)
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
        for reqs, lengths in self._prefill_parts(running):
            self._guarded(reqs, touched, self._prefill, reqs, lengths, touched)
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
        for group in _group_by(spec, lambda r: r.spec_k):
            self._guarded(group, touched, self._speculate, group, touched)
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

    # ------------------------------------------------------------------ prefill
    def _prefill_parts(self, running: list[Request]) -> list[tuple[list[Request], list[int]]]:
        """This step's prefill forwards: (requests, chunk lengths) each. One chunk per request still reading its
        prompt (target and, for speculation, draft state). First chunks of any lengths share forwards (left-padded,
        see ModelRunner.prefill); later chunks, which read the pools, share one only with chunks of their own
        length. Requests that want their prompt's log-probabilities get forwards of their own (logits at every
        position), so the others never pay for them."""
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
        return [
            ([req for req, _ in part], [n for _, n in part])
            for group in [*first.values(), *later.values()]
            for part in _pack(group, self.prefill_tokens)
        ]

    def _prefill(self, reqs: list[Request], lengths: list[int], touched: list[Request]) -> None:
        """One prefill forward, booked: the requests' positions advance by their chunks, prompt log-probabilities
        are recorded, and requests whose prompt is now read get their first token."""
        out = self.runner.prefill(reqs, lengths)
        self._book_prefill(reqs, lengths, out, touched)

    def _book_prefill(
        self, reqs: list[Request], lengths: list[int], out: PrefillOutput, touched: list[Request]
    ) -> None:
        if out.prompt_logprobs is not None:
            for req, entries in zip(reqs, out.prompt_logprobs, strict=True):
                req.prompt_logprobs += entries
        for req, n in zip(reqs, lengths, strict=True):
            if req.draft is not None:
                req.draft_processed += n
            req.processed += n
        done = [i for i, r in enumerate(reqs) if r.processed == len(r.tokens)]
        if done:
            logits = out.logits
            picked = logits[torch.tensor(done, device=self.device)] if len(done) < len(reqs) else logits
            finished = [reqs[i] for i in done]
            tokens = self.sampler.sample_rows(finished, picked)
            self._record_logprobs(finished, picked, tokens)
            for req, token in zip(finished, tokens, strict=True):
                self._emit(req, [token], touched)

    # ------------------------------------------------------------------ decoding
    def _decode(self, reqs: list[Request], touched: list[Request]) -> None:
        """One plain decode step of these requests, its tokens booked at once."""
        logits = self.runner.decode_logits(reqs, *self.runner.decode_inputs(reqs))
        tokens = self.sampler.sample_rows(reqs, logits)
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

    # ------------------------------------------------------------------ speculative rounds
    def _speculate(self, reqs: list[Request], touched: list[Request]) -> None:
        """A speculative round of these requests (one spec_k), booked; a plain decode step where they are too close
        to the context's end to speculate."""
        k = round_size(reqs, self.max_context)
        if k < 1:
            self._decode(reqs, touched)
            return
        for req, verified in zip(reqs, speculative_round(self.runner, reqs, k), strict=True):
            self._book_round(req, verified, k, touched)

    def _book_round(self, req: Request, v: Verified, k: int, touched: list[Request]) -> None:
        """A request's outcome of a round of ``k`` proposals: its positions, acceptance counts and next k, then its
        tokens emitted (with the log-probabilities of those kept, where it asked)."""
        if v.failed:
            self._emit(req, [-1], touched)  # fails it (see _emit)
            return
        req.processed += len(v.tokens)
        req.draft_processed += v.draft_read
        req.proposed += k
        req.accepted += v.accepted
        req.rounds += 1
        req.spec_k = next_spec_k(req.spec_k, v.accepted, k, self.spec_k_max)
        before = len(req.tokens)
        self._emit(req, v.tokens, touched)
        if v.logprobs is not None:
            req.logprobs += v.logprobs[: len(req.tokens) - before]

    # ------------------------------------------------------------------ decoding one step ahead
    def _launch_pending(self, reqs: list[Request]) -> None:
        self._pending = self._launch(reqs, *self.runner.decode_inputs(reqs))

    def _launch(self, reqs: list[Request], tokens: Tensor, positions: Tensor) -> Pending:
        """Queue a decode step of ``reqs`` and the sampling of its tokens, all on the device; the tokens reach the
        host (``_flush``) later. The requests' state then holds the fed token: ``processed`` advances now."""
        logits = self.runner.decode_logits(reqs, tokens, positions)
        for req in reqs:
            req.processed += 1
        sampled, redraws = self.sampler.sample_on_device(reqs, logits, tuple(r.code for r in reqs))
        pending = Pending(reqs, sampled, positions, sampled, None, logits if redraws else None, redraws)
        copy_to_host(pending)
        return pending

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
        self.sampler.settle(p)
        # a row the sampler could not draw for holds -1 (booked as a failure by _flush): feed it a valid id
        self._pending = self._launch(p.reqs, p.tokens.clamp(min=0)[:, None], p.positions + 1)
        self._flush(p, touched)

    def _flush(self, p: Pending, touched: list[Request]) -> None:
        """Book a launched step's tokens: emit each to its request, skipping requests that ended meanwhile."""
        self.sampler.settle(p)
        if p.event is not None:
            p.event.synchronize()
        for req, token in zip(p.reqs, p.host.tolist(), strict=True):
            if not (req.finished or req.cancelled):
                self._emit(req, [token], touched)

    # ------------------------------------------------------------------ emitting
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


def _composition(placement: Placement, slots: dict[tuple[int, str], int]) -> tuple:
    """A request's placement and pool slots as a hashable key (see Scheduler._code)."""
    return tuple(placement), tuple(sorted(slots.items()))


def prefill_budget(model: Supernet, chunk: int) -> int:
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


def _group_by(items, key):
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())
