"""An OpenAI-compatible HTTP server over the engine: one model id per preset, per-request presets, streaming.

The engine steps in one worker thread; each HTTP request gets an asyncio queue that the worker feeds with new
tokens. A bounded waiting queue answers 429 with Retry-After; a client that disconnects cancels its request and
frees its state; malformed input gets a 4xx with a message. ``auto`` picks a preset from the current load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..checkpoint import token_ids
from ..placement import PlacementError, placement_for_model_id, placement_letters
from .engine import Engine, QueueFullError, Request, RequestError, SamplingParams
from .policy import AutoPolicy


class EngineWorker:
    """Runs ``engine.step()`` in a thread whenever there is work, and hands results to asyncio waiters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wake = threading.Event()
        self.stopped = False
        self.listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="gearshift-engine", daemon=True)
        self.thread.start()

    def submit(self, *args: Any, **kwargs: Any) -> tuple[Request, asyncio.Queue]:
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error!r}")
        queue: asyncio.Queue = asyncio.Queue()
        req = self.engine.submit(*args, **kwargs)
        self.listeners[req.id] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return req, queue

    def cancel(self, req: Request) -> None:
        self.engine.cancel(req)
        self.listeners.pop(req.id, None)
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopped:
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                touched = self.engine.step()
            except BaseException as exc:  # noqa: BLE001 - report to every waiter instead of dying silently
                self.error = exc
                for loop, queue in list(self.listeners.values()):
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", repr(exc)))
                return
            for req in touched:
                target = self.listeners.get(req.id)
                if target is None:
                    continue
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, ("tokens", list(req.new_tokens), req.finished))
                if req.finished:
                    self.listeners.pop(req.id, None)

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=5)


@dataclass
class Metrics:
    """Counters and gauges for /metrics (Prometheus text exposition)."""

    tokens: dict[str, int] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))  # (preset, seconds, tokens, time)
    proposed: int = 0
    accepted: int = 0
    rejected_429: int = 0

    def finish(self, preset: str, req: Request, status: str) -> None:
        self.requests[(preset, status)] = self.requests.get((preset, status), 0) + 1
        self.tokens[preset] = self.tokens.get(preset, 0) + len(req.output)
        self.proposed += req.proposed
        self.accepted += req.accepted
        if req.finished_at:
            self.latencies.append((preset, req.finished_at - req.arrival, len(req.output), time.time()))

    def render(self, engine: Engine) -> str:
        lines = [
            "# TYPE gearshift_queue_depth gauge",
            f"gearshift_queue_depth {engine.queue_depth}",
            "# TYPE gearshift_running_requests gauge",
            f"gearshift_running_requests {len(engine.running)}",
            "# TYPE gearshift_rejected_total counter",
            f"gearshift_rejected_total {self.rejected_429}",
            "# TYPE gearshift_generated_tokens_total counter",
        ]
        lines += [f'gearshift_generated_tokens_total{{preset="{p}"}} {n}' for p, n in sorted(self.tokens.items())]
        lines.append("# TYPE gearshift_requests_total counter")
        lines += [
            f'gearshift_requests_total{{preset="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())
        ]
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def create_app(
    engine: Engine, tokenizer, *, name: str = "gearshift", quality_floor: float | None = None, retry_after: int = 1
):
    """The FastAPI application. ``tokenizer`` (a transformers tokenizer) turns text into ids and back."""

    model = engine.model
    worker = EngineWorker(engine)
    metrics = Metrics()
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

    app = FastAPI(title="gearshift", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    def model_ids() -> list[str]:
        return [name, f"{name}:auto", *(f"{name}:{p}" for p in presets)]

    def choose_placement(body: dict) -> tuple[str, str | tuple]:
        """(preset label for metrics, placement spec) from the model id or the extra fields."""
        requested = body.get("preset")
        model_id = body.get("model") or name
        if requested is None:
            if model_id == name:
                requested = None
            elif model_id.startswith(name + ":"):
                requested = model_id[len(name) + 1 :]
            else:
                raise ApiError(
                    404, f"model {model_id!r} not found; available: {', '.join(model_ids())}", "model_not_found"
                )
        if body.get("placement"):
            return "custom", body["placement"]
        if requested == "auto":
            if policy is None:
                raise ApiError(400, "this checkpoint stores no presets, so 'auto' has nothing to choose from")
            load = (engine.queue_depth + len(engine.running)) / engine.max_batch
            room = engine.room_check()  # one snapshot for the presets auto tries
            chosen = policy.choose(load, lambda preset: room(presets[preset]))
            return chosen, chosen
        if requested is None:
            return "default", default
        try:  # a preset, or a placement written out: NAME:GGKG, NAME:all-swa
            label, placement = placement_for_model_id(requested, engine.config, presets)
        except PlacementError as exc:
            raise ApiError(404, f"model {model_id!r}: {exc}", "model_not_found") from None
        return label, (requested if requested in presets else placement)

    def sampling(body: dict) -> SamplingParams:
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported")
        try:
            temperature, top_p = body.get("temperature"), body.get("top_p")
            return SamplingParams(
                temperature=1.0 if temperature is None else float(temperature),  # the OpenAI default
                top_p=1.0 if top_p is None else float(top_p),
                top_k=int(body.get("top_k") or 0),
                max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 16),
                seed=body.get("seed"),
            )
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"bad sampling parameter: {exc}") from None

    async def read_json(request: HttpRequest) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def stops(body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            return stop
        raise ApiError(400, "stop must be a string or a list of strings")

    async def start(body: dict, prompt_ids: list[int]):
        label, placement = choose_placement(body)
        params = sampling(body)
        draft = body.get("draft")
        try:
            req, queue = worker.submit(prompt_ids, placement, params, draft=draft, spec_k=int(body.get("spec_k", 4)))
        except QueueFullError as exc:
            metrics.rejected_429 += 1
            raise ApiError(
                429, f"server overloaded: {exc}", "rate_limit_exceeded", {"Retry-After": str(retry_after)}
            ) from None
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), "server_error") from None
        return label, req, queue

    async def tokens_of(req: Request, queue: asyncio.Queue, request: HttpRequest) -> AsyncIterator[list[int]]:
        """New tokens as the engine produces them; cancels the request if the client goes away."""
        finished = False
        try:
            while not finished:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(req)
                        return
                    continue
                if item[0] == "error":
                    raise ApiError(503, f"the engine failed: {item[1]}", "server_error")
                _, new, finished = item
                yield new
        finally:
            if not req.finished:
                worker.cancel(req)

    def finish_reason(req: Request, stopped_by_string: bool) -> str:
        if stopped_by_string or req.finish_reason == "stop":
            return "stop"
        return "length"

    async def run_text(body: dict, prompt_ids: list[int], request: HttpRequest, kind: str):
        label, req, queue = await start(body, prompt_ids)
        stop_strings = stops(body)
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        model_id = body.get("model") or name
        decoder = _Detokenizer(tokenizer, stop_strings)

        def chunk(text: str, reason: str | None) -> dict:
            if kind == "chat":
                delta = {"content": text} if text else {}
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
                }
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            }

        def usage() -> dict:
            n = len(req.output)
            extra = {"preset": label, "placement": placement_letters(req.placement, model.config)}
            if req.proposed:
                extra["speculative"] = {
                    "proposed": req.proposed,
                    "accepted": req.accepted,
                    "acceptance": req.acceptance,
                }
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n,
                "total_tokens": len(prompt_ids) + n,
                "gearshift": extra,
            }

        if body.get("stream"):

            async def events():
                if kind == "chat":
                    first = chunk("", None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(first)}\n\n"
                async for new in tokens_of(req, queue, request):
                    text = decoder.add(new)
                    if text:
                        yield f"data: {json.dumps(chunk(text, None))}\n\n"
                    if decoder.stopped:
                        worker.cancel(req)
                        break
                tail = decoder.flush()
                if tail:
                    yield f"data: {json.dumps(chunk(tail, None))}\n\n"
                last = chunk("", finish_reason(req, decoder.stopped))
                if body.get("stream_options", {}).get("include_usage"):
                    last["usage"] = usage()
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                metrics.finish(label, req, "ok")

            return StreamingResponse(events(), media_type="text/event-stream")

        async for new in tokens_of(req, queue, request):
            decoder.add(new)
            if decoder.stopped:
                worker.cancel(req)
                break
        text = decoder.text
        reason = finish_reason(req, decoder.stopped)
        metrics.finish(label, req, "ok")
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice], "usage": usage()}

    @app.get("/health")
    async def health():
        if worker.error is not None:
            raise ApiError(503, f"the engine stopped: {worker.error!r}", "server_error")
        return {"status": "ok", "running": len(engine.running), "waiting": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gearshift"} for m in model_ids()],
        }

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str) and prompt:
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids")
        return await run_text(body, ids, request, "text")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = await read_json(request)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
        ):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
        try:
            ids = token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        except Exception as exc:  # noqa: BLE001 - template errors come from jinja
            raise ApiError(400, f"cannot apply the chat template: {exc}") from None
        return await run_text(body, ids, request, "chat")

    return app


class _Detokenizer:
    """Incremental text from token ids, holding back incomplete UTF-8 and cutting at stop strings."""

    def __init__(self, tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.ids: list[int] = []
        self.sent = 0  # characters already returned
        self.stopped = False
        self.text = ""

    def add(self, new: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += new
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop_strings:
            at = full.find(s)
            if at != -1:
                full, self.stopped = full[:at], True
        self.text = full
        safe = len(full) if self.stopped else len(full.rstrip("\ufffd"))
        # keep back a possible prefix of a stop string so it is never streamed
        hold = max((len(s) - 1 for s in self.stop_strings), default=0) if not self.stopped else 0
        upto = max(self.sent, safe - hold)
        out, self.sent = full[self.sent : upto], upto
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def _preset_infos(model, presets: dict) -> list:
    from ..report import placement_report
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
