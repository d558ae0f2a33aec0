"""An OpenAI-compatible HTTP server over the engine: one model id per preset, per-request presets, streaming.

The engine steps in one worker thread; each HTTP request gets an asyncio queue that the worker feeds with what
its choices produced. Every body is validated into a typed request model (``protocol.py``) and every one of its
engine requests is checked before any is queued, so a request answered 4xx leaves nothing running. A failure
inside the engine fails only the requests it touched; the engine serves the rest. A bounded waiting queue
answers 429 with Retry-After; a client that disconnects, streaming or not, cancels its requests; errors are
OpenAI's error JSON. ``auto`` picks a preset from the current load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint import token_ids
from ..placement import PlacementError, placement_for_model_id, placement_letters
from .engine import Engine, QueueFullError, Request, RequestError, SamplingParams
from .logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from .policy import AutoPolicy
from .protocol import ChatCompletionRequest, CompletionRequest
from .text import Detokenizer, token_offsets, token_strings

log = logging.getLogger("gearshift.server")
MAX_BODY_BYTES = 8 * 2**20  # default request body limit (413 beyond): far more than any prompt the context holds
UNHEALTHY_AFTER = 3  # consecutive engine steps that failed requests before /health answers 503 ...
UNHEALTHY_FOR = 30.0  # ... for this many seconds after the last failure (a quiet engine is not judged forever)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


# ---------------------------------------------------------------------------------------------- the engine thread
@dataclass
class Update:
    """What one engine request produced in one step, as the worker hands it to the HTTP side."""

    tokens: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    reason: str | None = None
    error: str | None = None
    prompt_logprobs: list | None = None  # with the request's first update


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int  # the choice's index in its HTTP request
    logprobs_sent: int = 0
    prompt_sent: bool = False


class EngineWorker:
    """Runs ``engine.step()`` in a thread whenever there is work, and hands results to asyncio waiters.

    A step that raises outside the engine's own guards (which fail only the requests of the part that raised)
    fails every request in the engine, and the worker goes on: the next requests are served afresh."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = threading.Event()
        self.stopped = False
        self.listeners: dict[int, _Listener] = {}
        self.last_error: str | None = None
        self._abort: str | None = None  # set from another thread: fail everything at the next iteration
        self.shutting_down = False
        self.thread = threading.Thread(target=self._loop, name="gearshift-engine", daemon=True)
        self.thread.start()

    @property
    def healthy(self) -> bool:
        failing = self.engine.failed_steps >= UNHEALTHY_AFTER
        recent = time.perf_counter() - self.engine.last_failure_at < UNHEALTHY_FOR
        return self.thread.is_alive() and not (failing and recent)

    def submit(self, requests: list[Request], queue: asyncio.Queue) -> None:
        """Queue prepared requests (all or none: QueueFullError); their updates go to ``queue`` as (index, Update)."""
        loop = asyncio.get_running_loop()
        for i, req in enumerate(requests):
            self.listeners[req.id] = _Listener(loop, queue, i)
        try:
            self.engine.enqueue(requests)
        except BaseException:
            for req in requests:
                self.listeners.pop(req.id, None)
            raise
        self.wake.set()

    def cancel(self, requests: list[Request]) -> None:
        for req in requests:
            if not req.finished:
                self.engine.cancel(req)
            self.listeners.pop(req.id, None)
        self.wake.set()

    def abort(self, reason: str, shutdown: bool = False) -> None:
        """Fail every request now in the engine (thread-safe: done by the worker between steps)."""
        self.shutting_down |= shutdown
        self._abort = reason
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopped:
            if self._abort is not None:
                reason, self._abort = self._abort, None
                self._notify(self.engine.abort_all(reason))
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                touched = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a step that failed as a whole: fail its requests, go on
                log.exception("an engine step failed; failing every request in the engine")
                self.last_error = f"{type(exc).__name__}: {exc}"
                touched = self.engine.abort_all(f"the engine failed: {self.last_error}")
                self.engine.failed_steps += 1
                self.engine.last_failure_at = time.perf_counter()
            self._notify(touched)

    def _notify(self, touched: list[Request]) -> None:
        for req in touched:
            target = self.listeners.get(req.id)
            if target is None:
                continue
            update = Update(list(req.new_tokens), req.logprobs[target.logprobs_sent :], req.finished)
            target.logprobs_sent = len(req.logprobs)
            if req.prompt_logprobs is not None and not target.prompt_sent and (req.finished or req.new_tokens):
                update.prompt_logprobs, target.prompt_sent = req.prompt_logprobs, True
            if req.finished:
                update.reason, update.error = req.finish_reason, req.error
                self.listeners.pop(req.id, None)
            target.loop.call_soon_threadsafe(target.queue.put_nowait, (target.index, update))

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- metrics
OUTCOMES = ("finished", "cancelled", "failed", "rejected")


@dataclass
class Metrics:
    """Counters and gauges for /metrics (Prometheus text exposition). Every HTTP request to the two generation
    endpoints ends in exactly one outcome: finished, cancelled (its client went away, or the server stopped
    it), failed (the engine failed it) or rejected (4xx or 429 before anything ran)."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (preset, outcome)
    prompt_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    generated_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))  # (preset, seconds, tokens, time)
    proposed: int = 0
    accepted: int = 0
    rejected_429: int = 0

    def record(self, preset: str, outcome: str, requests: list[Request], prompt_tokens: int, started: float) -> None:
        key = (preset, outcome)
        generated = sum(len(r.output) for r in requests)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prompt_tokens[key] = self.prompt_tokens.get(key, 0) + prompt_tokens
        self.generated_tokens[key] = self.generated_tokens.get(key, 0) + generated
        self.proposed += sum(r.proposed for r in requests)
        self.accepted += sum(r.accepted for r in requests)
        if outcome == "finished":
            self.latencies.append((preset, time.perf_counter() - started, generated, time.time()))

    def render(self, engine: Engine) -> str:
        lines = [
            "# TYPE gearshift_queue_depth gauge",
            f"gearshift_queue_depth {engine.queue_depth}",
            "# TYPE gearshift_running_requests gauge",
            f"gearshift_running_requests {len(engine.running)}",
            "# TYPE gearshift_rejected_total counter",
            f"gearshift_rejected_total {self.rejected_429}",
        ]
        for name, table in (
            ("requests_total", self.requests),
            ("prompt_tokens_total", self.prompt_tokens),
            ("generated_tokens_total", self.generated_tokens),
        ):
            lines.append(f"# TYPE gearshift_{name} counter")
            lines += [f'gearshift_{name}{{preset="{p}",outcome="{o}"}} {n}' for (p, o), n in sorted(table.items())]
        now = time.time()
        lines.append("# TYPE gearshift_tokens_per_second gauge")
        recent: dict[str, int] = {}
        for preset, _, n, t in self.latencies:
            if now - t < 60:
                recent[preset] = recent.get(preset, 0) + n
        lines += [f'gearshift_tokens_per_second{{preset="{p}"}} {n / 60:.3f}' for p, n in sorted(recent.items())]
        lines.append("# TYPE gearshift_request_latency_seconds summary")
        by_preset: dict[str, list[float]] = {}
        for preset, sec, _, _ in self.latencies:
            by_preset.setdefault(preset, []).append(sec)
        for preset, values in sorted(by_preset.items()):
            values.sort()
            for q in (0.5, 0.9, 0.99):
                v = values[min(len(values) - 1, int(q * len(values)))]
                lines.append(f'gearshift_request_latency_seconds{{preset="{preset}",quantile="{q}"}} {v:.6f}')
        lines.append("# TYPE gearshift_speculative_acceptance_rate gauge")
        rate = self.accepted / self.proposed if self.proposed else 0.0
        lines.append(f"gearshift_speculative_acceptance_rate {rate:.6f}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}
        self.settled = False  # the request it answers already has its outcome in the metrics

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """A pydantic validation error as a 400: the most specific message (a field's own check before a union's
    'not this type either'), and the field as ``param``."""
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request body")
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    best = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    path = [str(x) for x in best.get("loc", ()) if not _union_tag(x)]
    if path and path[0] == "body":
        path = path[1:]
    message = str(best.get("msg", "invalid value")).removeprefix("Value error, ")
    field, sep, rest = message.partition(": ")
    if sep and field.isidentifier():  # a check across fields names its field first (see protocol.py)
        path, message = [*path, field], rest
    param = ".".join(path) or None
    if param is None and best.get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (content-type: application/json)"
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def _union_tag(part: Any) -> bool:
    """Pydantic's names for union members in an error's location (``str``, ``list[int]``, ``function-after[...]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# ---------------------------------------------------------------------------------------------- body size limit
class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes get 413 (declared or streamed) before the app reads
    them, as OpenAI's error JSON (recent FastAPI's own ``max_body_size`` answers a declared length in plain
    text). The body is read here and replayed to the app, whose later ``receive`` calls (disconnect watching)
    reach the client as usual."""

    def __init__(self, app, limit: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        error = ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        await error.response()(scope, receive, send)


# ---------------------------------------------------------------------------------------------- the app
@dataclass
class _Choice:
    """One engine request of an HTTP request (a prompt x one of its n choices) and what it has produced."""

    req: Request
    index: int  # its index among the HTTP request's choices
    prompt: int  # index of its prompt
    decoder: Detokenizer
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # text offset of each logprob's token in the output text
    prompt_logprobs: list | None = None
    reason: str | None = None
    error: str | None = None
    done: bool = False
    logprobs_sent: int = 0  # logprob entries already streamed

    def take(self, update: Update, per_token: bool) -> str:
        """Book an update; returns the text it adds. ``per_token``: feed tokens one at a time, noting offsets."""
        self.tokens += update.tokens
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
        self.logprobs += update.logprobs
        if per_token:
            text = ""
            for token in update.tokens:
                self.offsets.append(len(self.decoder.text))
                text += self.decoder.add([token])
        else:
            text = self.decoder.add(update.tokens)
        if update.finished:
            self.done, self.reason, self.error = True, update.reason, update.error
            text += self.decoder.flush()
        return text

    @property
    def finish_reason(self) -> str:
        if self.decoder.stopped or self.reason == "stop":
            return "stop"
        return "length"

    def kept_logprobs(self) -> tuple[list[TokenLogprob], list[int]]:
        """The logprobs of the tokens whose text is in the output (a stop string cuts the rest)."""
        n = sum(1 for o in self.offsets if o < len(self.decoder.text) or not self.decoder.stopped)
        return self.logprobs[:n], self.offsets[:n]


def create_app(
    engine: Engine,
    tokenizer,
    *,
    name: str = "gearshift",
    quality_floor: float | None = None,
    retry_after: int = 1,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    """The FastAPI application. ``tokenizer`` (a transformers tokenizer) turns text into ids and back."""

    model = engine.model
    worker = EngineWorker(engine)
    metrics = Metrics()
    text_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gearshift-text")  # off the event loop
    # an engine started for some placements only (Engine(placements=...)) offers the presets among them
    presets = {n: p for n, p in model.presets.items() if engine.served is None or model.resolve(p) in engine.served}
    # the bare model id: the model's default placement, or, when the engine does not serve it, the first it serves
    default = None
    if engine.served is not None and model.resolve(None) not in engine.served:
        default = next(iter(presets), None) or engine.served[0]
    infos = _preset_infos(model, presets)
    policy = AutoPolicy(infos, quality_floor) if infos else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.stop()
        text_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gearshift", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes, on_reject=lambda: reject("unknown"))

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError):
        if request.url.path in GENERATION_PATHS:
            reject("unknown")
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _server_error(_, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    async def off_loop(fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(text_pool, fn, *args)

    def model_ids() -> list[str]:
        return [name, *([f"{name}:auto"] if policy is not None else []), *(f"{name}:{p}" for p in presets)]

    def choose_placement(body) -> tuple[str, Any]:
        """(preset label for metrics, placement spec) from the model id or the extra fields."""
        requested = body.preset
        model_id = body.model or name
        if requested is None:
            if model_id == name:
                requested = None
            elif model_id.startswith(name + ":"):
                requested = model_id[len(name) + 1 :]
            else:
                raise ApiError(
                    404,
                    f"model {model_id!r} not found; available: {', '.join(model_ids())}",
                    param="model",
                    code="model_not_found",
                )
        if body.placement:
            return "custom", body.placement
        if requested == "auto":
            if policy is None:
                raise ApiError(
                    400, "this checkpoint stores no presets, so 'auto' has nothing to choose from", param="model"
                )
            load = (engine.queue_depth + len(engine.running)) / engine.max_batch
            room = engine.room_check()  # one snapshot for the presets auto tries
            chosen = policy.choose(load, lambda preset: room(presets[preset]))
            return chosen, chosen
        if requested is None:
            return "default", default
        try:  # a preset, or a placement written out: NAME:GGKG, NAME:all-swa
            label, placement = placement_for_model_id(requested, engine.config, presets)
        except PlacementError as exc:
            raise ApiError(404, f"model {model_id!r}: {exc}", param="model", code="model_not_found") from None
        return label, (requested if requested in presets else placement)

    def sampling(body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        top_k = body.top_k or 0
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,  # the OpenAI default
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if top_k < 0 else top_k,
            max_tokens=max_tokens,
            seed=body.seed,
            stop_token_ids=() if body.ignore_eos else None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def prepare(body, prompts: list[list[int]], params: SamplingParams, label: str, placement) -> list[Request]:
        """Every engine request of this HTTP request (prompt-major, n per prompt), checked; none queued yet."""
        n = body.n or 1
        if len(prompts) * n > engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} exceeds the queue bound of {engine.max_queue}")
        extra = set(body.stop_token_ids or ())
        if extra:
            base = params.stop_token_ids if params.stop_token_ids is not None else model.config.eos_ids()
            params.stop_token_ids = tuple(extra | set(base))
        out = []
        try:
            for ids in prompts:
                for j in range(n):
                    seeded = params if params.seed is None or j == 0 else _with_seed(params, params.seed + j)
                    out.append(engine.prepare(ids, placement, seeded, draft=body.draft, spec_k=body.spec_k or 4))
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None
        return out

    def start(requests: list[Request], queue: asyncio.Queue) -> None:
        try:
            worker.submit(requests, queue)
        except QueueFullError as exc:
            metrics.rejected_429 += 1
            raise ApiError(
                429,
                f"server overloaded: {exc}",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            ) from None

    async def generate(
        body,
        request: HttpRequest,
        kind: str,
        prompts: list[list[int]],
        echo_texts: list[str] | None,
        logprobs_k: int | None,
        max_tokens: int,
    ):
        started = time.perf_counter()
        label, placement = choose_placement(body)
        scoring = max_tokens == 0
        want_prompt = logprobs_k if echo_texts is not None and logprobs_k is not None else None
        params = sampling(body, max_tokens, None if scoring else logprobs_k, want_prompt)
        if scoring and want_prompt is None:  # checked as a scoring request, though none will run (echo alone)
            params.prompt_logprobs = 0
        requests = prepare(body, prompts, params, label, placement)
        stop_strings = body.stop_strings()
        n = body.n or 1
        choices = [
            _Choice(r, i, i // n, Detokenizer(tokenizer, stop_strings, context=prompts[i // n]))
            for i, r in enumerate(requests)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        if scoring and want_prompt is None:  # echo alone: the prompt is the answer, the engine has nothing to do
            for c in choices:
                c.done, c.reason = True, "length"
        else:
            start(requests, queue)
        prompt_tokens = sum(len(p) for p in prompts)
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        model_id = body.model or name
        per_token = logprobs_k is not None
        finished = {"outcome": None}

        def settle(outcome: str) -> None:
            """Record the HTTP request's outcome once, and cancel whatever still runs."""
            if finished["outcome"] is None:
                finished["outcome"] = outcome
                worker.cancel([c.req for c in choices if not c.done])
                metrics.record(label, outcome, requests, prompt_tokens, started)

        def usage() -> dict:
            done = sum(len(c.tokens) for c in choices)
            extra = {"preset": label, "placement": placement_letters(requests[0].placement, model.config)}
            proposed = sum(r.proposed for r in requests)
            if proposed:
                accepted = sum(r.accepted for r in requests)
                extra["speculative"] = {"proposed": proposed, "accepted": accepted, "acceptance": accepted / proposed}
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": done,
                "total_tokens": prompt_tokens + done,
                "gearshift": extra,
            }

        async def next_update() -> tuple[_Choice, str]:
            index, update = await queue.get()
            c = choices[index]
            text = c.take(update, per_token)
            if c.decoder.stopped and not c.done:  # a stop string ended it: the engine need not go on
                c.done, c.reason = True, "stop"
                worker.cancel([c.req])
            return c, text

        async def echo_part(c: _Choice) -> tuple[str, dict | None]:
            """The echoed prompt text and its logprobs (completions format) for a choice."""
            text = echo_texts[c.prompt]
            if logprobs_k is None:
                return text, None
            entries = c.prompt_logprobs or [None] * len(prompts[c.prompt])
            _, offsets = await off_loop(token_offsets, tokenizer, prompts[c.prompt])
            return text, await off_loop(
                completion_logprobs,
                prompts[c.prompt],
                entries,
                lambda ids: token_strings(tokenizer, ids),
                offsets,
                logprobs_k,
            )

        def output_logprobs(c: _Choice, base: int, entries, offsets) -> dict:
            strings = lambda ids: token_strings(tokenizer, ids)  # noqa: E731
            if kind == "chat":
                return chat_logprobs(entries, strings, logprobs_k or 0)
            tokens = [e.token for e in entries]
            return completion_logprobs(tokens, entries, strings, [base + o for o in offsets], logprobs_k)

        def failed_error(c: _Choice) -> ApiError:
            if worker.shutting_down:
                error = ApiError(503, c.error or "the server is shutting down", "server_error", code="shutting_down")
            else:
                error = ApiError(500, c.error or "the engine failed this request", "server_error")
            error.settled = True  # counted as failed, not as rejected
            return error

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(c: _Choice, text: str, reason: str | None, logprobs: dict | None = None, **delta) -> str:
                if kind == "chat":
                    choice = {"index": c.index, "delta": {**delta, **({"content": text} if text else {})}}
                    choice |= {"logprobs": logprobs, "finish_reason": reason}
                    obj = "chat.completion.chunk"
                else:
                    choice = {"index": c.index, "text": text, "logprobs": logprobs}
                    choice["finish_reason"] = reason
                    obj = "text_completion"
                payload = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice]}
                return f"data: {json.dumps(payload)}\n\n"

            async def events() -> AsyncIterator[str]:
                outcome = "cancelled"  # unless it gets to the end: a client that goes away cancels the stream
                try:
                    for c in choices:
                        if kind == "chat":
                            yield chunk(c, "", None, role="assistant", content="")
                        elif echo_texts is not None and logprobs_k is None:
                            yield chunk(c, echo_texts[c.prompt], None)
                    echoed: set[int] = set()
                    while not all(c.done for c in choices):
                        c, text = await next_update()
                        if c.error is not None:
                            yield f"data: {json.dumps(failed_error(c).body())}\n\n"
                            outcome = "failed"
                            break
                        if echo_texts is not None and logprobs_k is not None and id(c) not in echoed:
                            echoed.add(id(c))
                            echo, lps = await echo_part(c)
                            yield chunk(c, echo, None, lps)
                        lps = None
                        if per_token and len(c.logprobs) > c.logprobs_sent:
                            entries = c.logprobs[c.logprobs_sent :]
                            offsets = c.offsets[c.logprobs_sent : len(c.logprobs)]
                            c.logprobs_sent = len(c.logprobs)
                            base = len(echo_texts[c.prompt]) if echo_texts is not None else 0
                            lps = output_logprobs(c, base, entries, offsets)
                        if text or lps:
                            yield chunk(c, text, None, lps)
                        if c.done:
                            yield chunk(c, "", c.finish_reason)
                    else:
                        outcome = "finished"
                        if include_usage:
                            payload = {
                                "id": rid,
                                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                "created": created,
                                "model": model_id,
                                "choices": [],
                                "usage": usage(),
                            }
                            yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    settle(outcome)

            return _Stream(events(), on_close=lambda: settle("cancelled"))

        # non-streaming: collect every choice, cancelling them all if the client goes away meanwhile
        async def collect() -> None:
            while not all(c.done for c in choices):
                c, _ = await next_update()
                if c.error is not None:
                    raise failed_error(c)

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():  # the client went away
                settle("cancelled")
                return Response(status_code=499)
            failure = collecting.exception()
            if failure is not None:
                settle("failed")
                raise failure
        except asyncio.CancelledError:
            settle("cancelled")
            raise
        finally:
            watching.cancel()
            collecting.cancel()
        out = []
        for c in choices:
            entries, offsets = c.kept_logprobs()
            echo, echo_lps = await echo_part(c) if echo_texts is not None else ("", None)
            lps = None
            if logprobs_k is not None:
                lps = output_logprobs(c, len(echo), entries, offsets)
                if echo_lps is not None:  # the prompt's tokens first, then the output's
                    lps = {key: echo_lps[key] + lps[key] for key in echo_lps}
            if kind == "chat":
                message = {"role": "assistant", "content": c.decoder.text}
                out.append({"index": len(out), "message": message, "logprobs": lps, "finish_reason": c.finish_reason})
            else:
                text = echo + c.decoder.text
                out.append({"index": len(out), "text": text, "logprobs": lps, "finish_reason": c.finish_reason})
        settle("finished")
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": out, "usage": usage()}

    def reject(preset: str) -> None:
        metrics.record(preset, "rejected", [], 0, time.perf_counter())

    async def rejected(fn, body):
        """Run a handler; an error before generation (4xx, 429) counts as a rejected request."""
        try:
            return await fn()
        except ApiError as exc:
            if not exc.settled:  # refused before anything ran (4xx, 429)
                model_id = body.model or name
                reject(body.preset or (model_id[len(name) + 1 :] if model_id.startswith(name + ":") else "default"))
            raise

    @app.get("/health")
    async def health():
        if not worker.healthy:
            raise ApiError(503, f"the engine is failing: {worker.last_error}", "server_error")
        return {"status": "ok", "running": len(engine.running), "waiting": engine.queue_depth}

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "gearshift"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id not in model_ids():
            raise ApiError(
                404, f"model {model_id!r} not found; available: {', '.join(model_ids())}", code="model_not_found"
            )
        return model_card(model_id)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        async def run():
            prompts, texts = [], []
            for p in body.prompts():
                if isinstance(p, str):
                    ids = await off_loop(lambda s: list(tokenizer(s)["input_ids"]), p)
                    if not ids:
                        raise ApiError(400, "the prompt has no tokens", param="prompt")
                    prompts.append(ids)
                    texts.append(p)
                else:
                    prompts.append(list(p))
                    texts.append(None)
            echo = None
            if body.echo:
                echo = [
                    t if t is not None else await off_loop(_decode, tokenizer, ids)
                    for t, ids in zip(texts, prompts, strict=True)
                ]
            max_tokens = 16 if body.max_tokens is None else body.max_tokens
            return await generate(body, request, "text", prompts, echo, body.logprobs, max_tokens)

        return await rejected(run, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: HttpRequest):
        async def run():
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]

            def encode():
                return token_ids(
                    tokenizer.apply_chat_template(
                        messages, add_generation_prompt=body.add_generation_prompt is not False, tokenize=True
                    )
                )

            try:
                ids = await off_loop(encode)
            except Exception as exc:  # noqa: BLE001 - template errors come from jinja
                raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from None
            if not ids:
                raise ApiError(400, "the chat template gave no tokens", param="messages")
            limit = body.max_completion_tokens or body.max_tokens
            room = engine.max_context - len(ids)
            max_tokens = max(1, min(limit, room) if limit is not None else room)
            k = (body.top_logprobs or 0) if body.logprobs else None
            return await generate(body, request, "chat", [ids], None, k, max_tokens)

        return await rejected(run, body)

    return app


class _Stream(StreamingResponse):
    """A server-sent event stream that settles its request however it ends, also when the client is gone before
    the stream's generator ever started (its ``finally`` would then never run)."""

    def __init__(self, content, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client disconnects (the body is read already: what ``receive`` gives next is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _preset_infos(model, presets: dict) -> list:
    from ..roofline import placement_report
    from .policy import PresetInfo

    infos = []
    if not presets:
        return infos
    base = placement_report(model, "all-attention" if _has_all(model, "attention") else None, context=4096, batch=8)
    for name, placement in presets.items():
        meta = model.preset_meta.get(name, {})
        speed = meta.get("speedup")
        if speed is None:  # modelled from bytes moved per decode step
            speed = base.bytes_per_step / placement_report(model, placement, context=4096, batch=8).bytes_per_step
        quality = meta.get("predicted_quality", meta.get("quality"))
        infos.append(PresetInfo(name, None if quality is None else float(quality), float(speed)))
    return infos


def _has_all(model, name: str) -> bool:
    return all(name in layer.mixers for layer in model.config.layers)


# ---------------------------------------------------------------------------------------------- running it
class DrainingServer(uvicorn.Server):
    """uvicorn with a bounded drain: on SIGTERM/SIGINT it stops accepting connections and lets in-flight requests
    finish for ``drain_timeout`` seconds; then every request still in the engine ends with an error (streams get
    an error event) and the process exits. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, drain_timeout: float = 30.0) -> None:
        super().__init__(config)
        self.worker, self.drain_timeout = worker, drain_timeout
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:  # a second signal: stop waiting for anyone
            self.force_exit = True
            self.worker.abort("the server is shutting down", shutdown=True)
        elif self._timer is None:
            log.warning("draining: in-flight requests get %.0f s to finish", self.drain_timeout)
            self._timer = threading.Timer(self.drain_timeout, self._drain_over)
            self._timer.daemon = True
            self._timer.start()
        super().handle_exit(sig, frame)

    def _drain_over(self) -> None:
        log.warning("drain timeout: failing the requests still in flight")
        self.worker.abort(f"the server is shutting down (drain timeout of {self.drain_timeout:g} s)", shutdown=True)
        threading.Timer(5.0, self._force).start()  # their error answers need a moment to go out

    def _force(self) -> None:
        self.force_exit = True


def serve(app: FastAPI, host: str, port: int, *, drain_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run the app with uvicorn and a bounded drain on shutdown (see ``DrainingServer``)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    DrainingServer(config, app.state.worker, drain_timeout).run()
