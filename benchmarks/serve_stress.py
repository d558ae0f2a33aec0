"""Many concurrent streams against a live `gearshift serve`, a share of whose clients hang up mid-stream (issue 21's
goal: 1,000 concurrent streams with 30% disconnects -> 0 errors, 0 leaked rows, flat RSS).

Each round opens ``--streams`` streaming completions at once (random presets, lengths and sampling settings,
``ignore_eos`` so lengths are what was asked). A ``--disconnect`` share of them read a few chunks and close the
connection; the others must read every chunk, a finish_reason and ``[DONE]`` with no error event. After each round
the server must go idle (no running or waiting request: no leaked row), and its RSS is recorded. The server's
/metrics must count every request under exactly one outcome.

    python benchmarks/serve_stress.py --streams 1000 --rounds 5 --out benchmarks/results/serve_robustness_stress.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx

from live_server import ServerProcess, tiny_checkpoint

from common import write_json


async def one_stream(client: httpx.AsyncClient, rng: random.Random, hang_up: bool) -> str:
    """'ok', 'cancelled' (this client hung up as planned) or an error description."""
    body = {
        "model": rng.choice(["gs", "gs:fast", "gs:quality", "gs:auto"]),
        "prompt": " ".join(f"w{rng.randrange(1, 50)}" for _ in range(rng.randrange(1, 12))),
        "max_tokens": rng.randrange(8, 48),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "top_p": rng.choice([1.0, 0.9]),
        "stream": True,
        "ignore_eos": True,
    }
    stop_after = rng.randrange(1, 4)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {(await r.aread())[:200]!r}"
            seen, finished, done = 0, False, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return f"error event: {event['error']['message'][:200]}"
                seen += 1
                finished |= event["choices"][0]["finish_reason"] is not None
                if hang_up and seen >= stop_after:
                    return "cancelled"  # leaving the block closes the connection mid-stream
            return "ok" if done and finished else f"incomplete stream (done={done}, finished={finished})"
    except httpx.HTTPError as exc:
        return f"transport: {exc!r}"


async def round_of(url: str, streams: int, disconnect: float, rng: random.Random) -> dict:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        plans = [rng.random() < disconnect for _ in range(streams)]
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one_stream(client, random.Random(rng.random()), h) for h in plans))
        seconds = time.perf_counter() - t0
    errors = [o for o in outcomes if o not in ("ok", "cancelled")]
    return {
        "streams": streams,
        "hung_up": sum(o == "cancelled" for o in outcomes),
        "completed": sum(o == "ok" for o in outcomes),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a supernet with tokenizer files and presets quality/fast (default: tiny)")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--disconnect", type=float, default=0.3)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_robustness_stress.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_stress_"))
    ckpt = args.checkpoint or tiny_checkpoint(work / "tiny")
    flags = ["--device", "cpu", "--name", "gs", "--max-batch", str(args.max_batch)]
    flags += ["--max-queue", str(2 * args.streams), "--max-context", "128"]
    rng = random.Random(args.seed)
    rounds = []
    with ServerProcess(ckpt, *flags, log=work / "server.log") as server:
        rss_start = server.rss_mib()
        for i in range(args.rounds):
            result = asyncio.run(round_of(server.url, args.streams, args.disconnect, rng))
            deadline = time.time() + 60
            health = server.health()
            while health["running"] + health["waiting"] and time.time() < deadline:
                time.sleep(0.2)
                health = server.health()
            result |= {
                "round": i,
                "leaked_rows": health["running"] + health["waiting"],
                "health": health["status_code"],
                "rss_mib": round(server.rss_mib(), 1),
            }
            rounds.append(result)
            print(json.dumps(result), flush=True)
        metrics = server.metrics()
    outcomes = {k.split('outcome="')[1].rstrip('"}'): 0 for k in metrics if k.startswith("gearshift_requests_total")}
    for k, v in metrics.items():
        if k.startswith("gearshift_requests_total"):
            outcomes[k.split('outcome="')[1].rstrip('"}')] += int(v)
    rss = [r["rss_mib"] for r in rounds]
    report = {
        "streams_per_round": args.streams,
        "rounds": args.rounds,
        "disconnect_share": args.disconnect,
        "max_batch": args.max_batch,
        "errors": sum(r["errors"] for r in rounds),
        "leaked_rows": sum(r["leaked_rows"] for r in rounds),
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_per_round": rss,
        "rss_growth_after_first_round_mib": round(rss[-1] - rss[0], 1) if rss else None,
        "requests_by_outcome": outcomes,
        "requests_sent": args.streams * args.rounds,
        "per_round": rounds,
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "per_round"}, indent=2))


if __name__ == "__main__":
    main()
