"""The OpenAI-compatible server, live on localhost: the official openai client, streaming, overload, disconnects."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import train_fixtures as fx
from gearshift.model import Supernet
from gearshift.serve import server as server_module
from gearshift.serve.engine import Engine
from gearshift.serve.server import create_app


class LiveServer:
    def __init__(self, model, tokenizer, app_kw=None, **engine_kw):
        self.engine = Engine(model, **engine_kw)
        app = create_app(self.engine, tokenizer, name="gs", quality_floor=0.5, **(app_kw or {}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True  # uvicorn's shutdown also stops the engine worker (app lifespan)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    path = fx.supernet_dir(tmp_path_factory.mktemp("srv") / "sn")
    model = Supernet.from_pretrained(path)
    model.add_preset("quality", "FF", predicted_quality=0.9, speedup=1.0)
    model.add_preset("fast", "GG", predicted_quality=0.7, speedup=3.0)
    model.add_preset("too-weak", "KK", predicted_quality=0.2, speedup=5.0)
    return model, fx.tokenizer()


@pytest.fixture(scope="module")
def server(model_and_tok):
    srv = LiveServer(*model_and_tok, max_batch=4, max_queue=8)
    yield srv
    srv.close()


def greedy_text(model, tok, ids, placement, n):
    """The greedy continuation's text as it reads after the prompt (with its leading space), and its ids."""
    out = model.generate([ids], placement, max_new_tokens=n, eos_token_id=model.config.eos_ids())[0, len(ids) :]
    ids, out = list(ids), out.tolist()
    full, prompt = tok.decode(ids + out, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
    return full[len(prompt) :], out


def test_models_and_health(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    ids = {m.id for m in client.models.list()}
    assert ids == {"gs", "gs:auto", "gs:quality", "gs:fast", "gs:too-weak"}
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completions_plain_and_streaming(server, model_and_tok):
    model, tok = model_and_tok
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = "w1 w2 w3 w4"
    expect, _ = greedy_text(model, tok, tok(prompt)["input_ids"], "GG", 8)
    r = client.completions.create(model="gs:fast", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expect and r.usage.completion_tokens <= 8
    stream = client.completions.create(model="gs:fast", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    chunks = [c.choices[0].text for c in stream]
    assert "".join(chunks) == expect and len(chunks) > 2
    # the preset as an extra field instead of the model id
    r = client.completions.create(
        model="gs", prompt=prompt, max_tokens=8, temperature=0, extra_body={"preset": "quality"}
    )
    assert r.choices[0].text == greedy_text(model, tok, tok(prompt)["input_ids"], "FF", 8)[0]


def test_chat_plain_and_streaming(server, model_and_tok):
    model, tok = model_and_tok
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    expect, _ = greedy_text(model, tok, ids, "FF", 6)
    r = client.chat.completions.create(model="gs:quality", messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == expect and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="gs:quality", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expect


def test_auto_speculative_stop_and_metrics(server, model_and_tok):
    model, tok = model_and_tok
    body = {"model": "gs:auto", "prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body).json()
    assert r["usage"]["gearshift"]["preset"] == "quality"  # idle server: the best preset above the floor
    spec = httpx.post(
        server.url + "/v1/completions", json={**body, "model": "gs:quality", "draft": "GG", "max_tokens": 10}
    ).json()
    plain = httpx.post(server.url + "/v1/completions", json={**body, "model": "gs:quality", "max_tokens": 10}).json()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert spec["usage"]["gearshift"]["speculative"]["proposed"] > 0
    full = plain["choices"][0]["text"].split()
    cut = httpx.post(
        server.url + "/v1/completions", json={**body, "model": "gs:quality", "max_tokens": 10, "stop": full[2]}
    ).json()
    assert cut["choices"][0]["text"] == " " + " ".join(full[:2]) + " " and cut["choices"][0]["finish_reason"] == "stop"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "gearshift_queue_depth",
        'gearshift_generated_tokens_total{preset="quality",outcome="finished"}',
        "gearshift_request_latency_seconds",
        "gearshift_speculative_acceptance_rate",
    ):
        assert name in text


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", "{not json", 400, "not valid JSON"),
        ("/v1/completions", {"model": "gs:turbo", "prompt": "w1"}, 404, "unknown preset"),
        ("/v1/completions", {"model": "other", "prompt": "w1"}, 404, "not found"),
        ("/v1/completions", {"model": "gs", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "gs", "prompt": "w1", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "gs", "prompt": "w1", "n": 0}, 400, "n: "),
        ("/v1/completions", {"model": "gs", "prompt": "w1 " * 600}, 400, "context"),
        ("/v1/completions", {"model": "gs", "prompt": "w1", "placement": "FX"}, 400, "unknown preset or placement"),
        ("/v1/chat/completions", {"model": "gs", "messages": []}, 400, "messages"),
    ],
)
def test_malformed_requests(server, path, body, status, message):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_overload_answers_429_and_recovers(model_and_tok):
    srv = LiveServer(*model_and_tok, max_batch=1, max_queue=1)
    try:

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "gs", "prompt": "w1 w2", "max_tokens": 60, "temperature": 0}
                return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=body) for _ in range(6)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert httpx.get(srv.url + "/health").status_code == 200
        ok = httpx.post(srv.url + "/v1/completions", json={"model": "gs", "prompt": "w1", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.close()


def test_client_disconnect_cancels_and_frees_state(model_and_tok):
    srv = LiveServer(*model_and_tok, max_batch=2, max_queue=4, max_context=256)
    try:
        body = {"model": "gs", "prompt": "w1 w2", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token arrived: hang up
        for _ in range(100):
            if not srv.engine.running and not srv.engine.waiting:
                break
            time.sleep(0.05)
        assert not srv.engine.running
        assert all(p.alloc.available == p.alloc.n for layer in srv.engine.pools for p in layer.values())
        assert srv.engine.finished_count >= 1
    finally:
        srv.close()


def test_auto_policy_walks_up_the_speed_ladder_with_load():
    from gearshift.serve.policy import AutoPolicy, PresetInfo

    infos = [PresetInfo("q", 0.9, 1.0), PresetInfo("m", 0.8, 2.0), PresetInfo("f", 0.6, 4.0), PresetInfo("x", 0.3, 9.0)]
    policy = AutoPolicy(infos, quality_floor=0.5)
    assert [policy.choose(load) for load in (0.0, 0.5, 0.75, 1.0, 3.0)] == ["q", "q", "m", "f", "f"]
    assert AutoPolicy(infos).choose(5.0) == "x"
    # a preset that could not start now (its pools full) gives way to the nearest one that could, faster first
    room = {"q": False, "m": True, "f": False}
    assert policy.choose(0.0, room.get) == "m"
    assert policy.choose(1.0, room.get) == "m"  # f is full: the slower neighbour
    assert policy.choose(0.75, {"q": True, "m": False, "f": True}.get) == "f"
    assert policy.choose(0.75, lambda name: False) == "m"  # none could: the load's own
    with pytest.raises(ValueError, match="floor"):
        AutoPolicy(infos, quality_floor=0.95)


def test_serve_command_sizes_the_state_to_its_budget(tmp_path, monkeypatch, capsys):
    """`gearshift serve` builds the engine with the state budget and says how many requests may use full
    attention at once; an impossible budget is a clear error before the server starts."""
    from gearshift.cli import main

    path = fx.supernet_dir(tmp_path / "sn")
    apps = []
    served = []
    monkeypatch.setattr(server_module, "serve", lambda app, *a, **kw: apps.append(app) or served.append(kw))
    args = ["serve", str(path), "--device", "cpu", "--max-batch", "4", "--max-context", "64"]
    assert main(args) == 0 and apps
    full = apps[0].state.engine
    assert full.full_attention_slots == 4 and "4 of them with full-attention layers" in capsys.readouterr().out
    per_fa = sum(p.nbytes_per_slot() for layer in full.pools for n, p in layer.items() if n == "attention")
    budget_gb = (full.memory_bytes() - 3 * per_fa) / 2**30
    assert main([*args, "--state-memory-gb", f"{budget_gb:.12f}"]) == 0
    assert apps[1].state.engine.full_attention_slots == 1
    assert "1 of them with full-attention layers at once" in capsys.readouterr().out
    assert main([*args, "--state-memory-gb", "1e-9"]) != 0
    assert "decoding state does not fit" in capsys.readouterr().err
    assert main([*args, "--only-presets", "FG", "GG"]) == 0  # state and weights only for the mixers these two use
    used = {(0, "attention"), (0, "gdn"), (1, "gdn")}
    assert {(i, n) for i, layer in enumerate(apps[2].state.engine.pools) for n in layer} == used
    model = apps[2].state.engine.model
    assert {(i, n) for i, block in enumerate(model.blocks) for n in block.mixer.mixers} == used
    assert main([*args, "--only-presets", "turbo"]) != 0
    assert "turbo" in capsys.readouterr().err
    assert main([*args, "--prefill-tokens", "96"]) == 0 and apps[3].state.engine.prefill_tokens == 96
    assert apps[2].state.engine.prefill_tokens == 16384  # the default for a tiny model: the upper bound
    assert main([*args, "--prefill-tokens", "-1"]) != 0
    assert "prefill" in capsys.readouterr().err
    assert main([*args, "--only-presets", "FG=3", "GG=1"]) == 0  # pools sized per preset: 3 + 1 in shared ones
    sized = apps[4].state.engine
    assert [{n: p.alloc.n for n, p in layer.items()} for layer in sized.pools] == [
        {"attention": 3, "gdn": 1},
        {"gdn": 4},
    ]
    assert "room reserved for 3 of FG, 1 of GG" in capsys.readouterr().out
    assert served[0]["drain_timeout"] == 30.0  # the default
    assert main([*args, "--drain-timeout", "2.5", "--max-body-mb", "1"]) == 0 and served[-1]["drain_timeout"] == 2.5
    assert apps[-1].user_middleware[0].kwargs["limit"] == 2**20
    assert main([*args, "--only-presets", "FG=3", "GG"]) != 0
    assert "PRESET=N" in capsys.readouterr().err
    for app in apps:
        app.state.worker.stop()


def test_only_presets_are_offered_and_others_refused(model_and_tok):
    """An engine started for some presets offers only those (and 'auto' among them); other placements get 400."""
    from fastapi.testclient import TestClient

    model, tok = model_and_tok
    engine = Engine(model, max_batch=2, placements=["quality", "fast"])
    app = create_app(engine, tok, name="gs")
    with TestClient(app) as client:
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"gs", "gs:auto", "gs:quality", "gs:fast"}
        body = {"model": "gs:fast", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        refused = client.post("/v1/completions", json={**body, "model": "gs", "placement": "KK"})
        assert refused.status_code == 400 and "serves only the placements FF, GG" in refused.text
    fast_only = Engine(model, max_batch=2, placements=["fast"])
    with TestClient(create_app(fast_only, tok, name="gs")) as client:  # the default placement (FF) is not served:
        bare = client.post("/v1/completions", json={**body, "model": "gs"})  # the bare id runs the first served one
        assert bare.status_code == 200 and set(fast_only.tokens_by_placement) == {"GG"}
