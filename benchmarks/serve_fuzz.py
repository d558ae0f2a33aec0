"""Fuzzing a live `gearshift serve` (issue 21's goal: >= 5,000 requests over both endpoints, 0 5xx, 0 dead engines).

Bodies come from the test suite's hypothesis strategies (tests/fuzz_bodies.py: every field well-formed, of a
wrong type, out of range, non-finite, or with lone surrogates), sent over keep-alive connections by a few
concurrent clients. Every answer's status is counted; /health is polled every 250 requests; at the end the engine
must be idle (no running or waiting request, i.e. no leaked row) and a plain request must still complete.

    python benchmarks/serve_fuzz.py --requests 6000 --out benchmarks/results/serve_robustness_fuzz.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings

from live_server import ServerProcess, tiny_checkpoint

from common import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz_bodies import chat_bodies, completion_bodies  # noqa: E402


def draw(strategy, n: int, seed_value: int) -> list:
    """``n`` examples of a hypothesis strategy (generation only: no shrinking, no example database)."""
    out = []

    @seed(seed_value)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(example=strategy)
    def collect(example):
        out.append(example)

    collect()
    return out


async def fire(url: str, bodies: list[tuple[str, dict]], clients: int, health_every: int) -> dict:
    statuses: Counter = Counter()
    by_path: dict[str, Counter] = {}
    server_errors, transport_errors, health_failures, samples = 0, 0, 0, []
    queue: asyncio.Queue = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    done = 0

    async def client_loop():
        nonlocal server_errors, transport_errors, health_failures, done
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not queue.empty():
                path, body = queue.get_nowait()
                try:
                    r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                    statuses[r.status_code] += 1
                    by_path.setdefault(path, Counter())[r.status_code] += 1
                    if r.status_code >= 500:
                        server_errors += 1
                        if len(samples) < 10:
                            samples.append({"body": body, "status": r.status_code, "text": r.text[:500]})
                except httpx.TransportError as exc:
                    transport_errors += 1
                    if len(samples) < 10:
                        samples.append({"body": body, "error": repr(exc)})
                done += 1
                if done % health_every == 0:
                    h = await client.get("/health")
                    health_failures += h.status_code != 200

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_endpoint": {p: {str(k): v for k, v in sorted(c.items())} for p, c in by_path.items()},
        "server_errors_5xx": server_errors,
        "transport_errors": transport_errors,
        "health_failures": health_failures,
        "failure_samples": samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a supernet with tokenizer files (default: the tests' tiny one)")
    p.add_argument("--requests", type=int, default=6000, help="bodies in all, half per endpoint")
    p.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/serve_robustness_fuzz.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_fuzz_"))
    ckpt = args.checkpoint or tiny_checkpoint(work / "tiny")
    half = args.requests // 2
    t0 = time.perf_counter()
    bodies = [("/v1/completions", b) for b in draw(completion_bodies(), half, args.seed)]
    bodies += [("/v1/chat/completions", b) for b in draw(chat_bodies(), args.requests - half, args.seed + 1)]
    random.Random(args.seed).shuffle(bodies)  # both endpoints all along: a run cut short still covers both
    drawn = time.perf_counter() - t0
    flags = ["--device", "cpu", "--max-batch", "16", "--max-queue", "256", "--max-context", str(args.max_context)]
    with ServerProcess(ckpt, *flags, log=work / "server.log") as server:
        t0 = time.perf_counter()
        result = asyncio.run(fire(server.url, bodies, args.clients, health_every=250))
        seconds = time.perf_counter() - t0
        time.sleep(1.0)
        health = server.health()
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "w1 w2", "max_tokens": 4}, timeout=60)
        metrics = server.metrics()
        rss = server.rss_mib()
    engine_alive = health["status_code"] == 200 and ok.status_code == 200
    report = {
        "requests": len(bodies),
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "requests_per_second": round(len(bodies) / seconds, 1),
        "body_generation_seconds": round(drawn, 1),
        **result,
        "dead_engines": 0 if engine_alive else 1,
        "leaked_rows_after": health.get("running", -1) + health.get("waiting", -1),
        "final_health": health,
        "server_rss_mib_after": round(rss, 1),
        "requests_by_outcome": {k: v for k, v in metrics.items() if k.startswith("gearshift_requests_total")},
        "log": str(work / "server.log"),
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "failure_samples"}, indent=2))


if __name__ == "__main__":
    main()
