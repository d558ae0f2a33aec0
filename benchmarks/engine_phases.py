"""Where a fresh engine's time goes, step by step: prefill, the first decode steps (eager, capture), steady replay.

A batch of sampled requests (temperature 0.7, top-p 0.95, no stop tokens) through a new engine with CUDA graphs,
each ``step()`` timed alone (synchronised), twice per setting (the first repetition includes compiling), with the
element-wise chains (ops/fused.py) fused everywhere (``all``: eager prefill steps too), fused where a CUDA graph
replays them (``graphs``: the default) and never (``off``). This is how the cost of fusing eager calls (dynamo's
guards and inductor's wrapper on the host) was found, which is why the default fuses only inside graphs.

    python benchmarks/engine_phases.py RUN/supernet --batch 64 --profile-steps 3 --out results/engine_phases.json
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from gearshift.model import Supernet
from gearshift.ops.fused import fusion
from gearshift.serve.engine import Engine, SamplingParams

from common import device_name, profile_cuda, sync, write_json


def phases(model: Supernet, batch: int, prompt: int, tokens: int, profiled: int = 0) -> tuple[list[float], list]:
    """Milliseconds of each engine step until the batch is done, and profiles of the first ``profiled`` steps."""
    engine = Engine(model, max_batch=batch, max_context=prompt + tokens + 16, max_queue=batch)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=tokens, stop_token_ids=())
    for i in range(batch):  # prompts of a few lengths, so prefill runs several shapes
        engine.submit([1 + i] + list(range(2, prompt + i % 7)), None, params)
    times, profiles = [], []
    while engine.has_work():
        if len(profiles) < profiled:
            print(f"step {len(times)}:", flush=True)
            profiles.append(profile_cuda(engine.step, top=8))
            times.append(profiles[-1]["wall_ms"])
            continue
        sync(model.device)
        t0 = time.perf_counter()
        engine.step()
        sync(model.device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times, profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="supernet checkpoint directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=40, help="prompt tokens (plus 0-6)")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=0, help="then profile this many first steps")
    ap.add_argument("--out", default="benchmarks/results/engine_phases.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Supernet.from_pretrained(args.model, device=device, dtype=dtype).eval()
    rows = []
    for rep in range(2):
        for fused in ("all", "graphs", "off"):
            with contextlib.ExitStack() as stack:
                if fused != "graphs":
                    stack.enter_context(fusion(fused == "all"))
                ms, _ = phases(model, args.batch, args.prompt, args.tokens)
            row = {"repetition": rep, "fused": fused, "steps": len(ms), "first_steps_ms": ms[:6]}
            row |= {"steady_ms_per_step": sum(ms[6:]) / max(1, len(ms[6:])), "total_ms": sum(ms)}
            rows.append(row)
            print(
                f"rep {rep} fused {fused:<6} first steps {[round(x, 1) for x in ms[:6]]} ms, "
                f"then {row['steady_ms_per_step']:.2f} ms/step, total {row['total_ms']:.0f} ms",
                flush=True,
            )
    report = {"device": device_name(device), "batch": args.batch, "rows": rows}
    if args.profile_steps:  # the default rule, once more, the first steps under the profiler
        report["profiles"] = phases(model, args.batch, args.prompt, args.tokens, args.profile_steps)[1]
    write_json(args.out, report)


if __name__ == "__main__":
    main()
