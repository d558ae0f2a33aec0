"""Fuzzing the live server on loopback: hypothesis bodies over both generation endpoints (well-formed, ill-typed,
out of range, non-finite, lone surrogates), then schemathesis from the served OpenAPI schema. No request may get
a 5xx, every answer is JSON, and the engine is alive and idle afterwards (no leaked rows or slots). Bounded:
benchmarks/serve_fuzz.py runs the same bodies at scale."""

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

import train_fixtures as fx
from gearshift.model import Supernet

from fuzz_bodies import chat_bodies, completion_bodies
from test_server import LiveServer


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model = Supernet.from_pretrained(fx.supernet_dir(tmp_path_factory.mktemp("fuzz") / "sn"))
    model.add_preset("quality", "FF", predicted_quality=0.9, speedup=1.0)
    model.add_preset("fast", "GG", predicted_quality=0.7, speedup=3.0)
    server = LiveServer(model, fx.tokenizer(), max_batch=4, max_queue=32, max_context=48)
    with httpx.Client(base_url=server.url, timeout=60) as client:  # one keep-alive connection for every example
        server.client = client
        yield server
    assert httpx.get(server.url + "/health").status_code == 200
    server.close()


def check_alive(server):
    assert server.client.get("/health").json()["status"] == "ok"
    ok = server.client.post("/v1/completions", json={"model": "gs", "prompt": "w1", "max_tokens": 2})
    assert ok.status_code == 200
    engine = server.engine
    assert not engine.running and not engine.waiting
    assert all(p.alloc.available == p.alloc.n for layer in engine.pools for p in layer.values())


def send(server, path, body):
    content = body if isinstance(body, str) else json.dumps(body)  # NaN/Infinity as JavaScript spells them
    r = server.client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text)
    if "text/event-stream" in r.headers.get("content-type", ""):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    else:
        payload = r.json()
        assert ("choices" in payload) if r.status_code == 200 else set(payload["error"]) >= {"message", "param"}


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=completion_bodies())
def test_fuzz_completions(fuzz_server, body):
    send(fuzz_server, "/v1/completions", body)


@FUZZ
@given(body=chat_bodies())
def test_fuzz_chat(fuzz_server, body):
    send(fuzz_server, "/v1/chat/completions", body)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_raw_bytes(fuzz_server, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = fuzz_server.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500 and "error" in r.json()


def test_engine_alive_after_fuzzing(fuzz_server):
    check_alive(fuzz_server)


def test_schemathesis(fuzz_server):
    """Every operation of the served OpenAPI schema, with cases schemathesis generates from it (positive and
    negative), answered without a server error. (Driven directly: its pytest plugin lags pytest 9.)"""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models/{model_id}"}
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def run(case):
            case.call_and_validate(checks=[not_a_server_error])

        run()
    check_alive(fuzz_server)
