"""Serving engine on a GPU: decode steps replayed from CUDA graphs vs eager, checked token for token, then timed.

(1) check: random supernets (fp32 and bf16), prompts of mixed lengths under every single-mixer placement and a
few mixes, greedy, a small max_batch so requests come and go (captures, replays, evictions): the fraction of
requests whose output equals the eager engine's must be 1.0 before ``Engine(cuda_graphs=True)`` is trusted; then
the same with split-KV decode attention forced (chunks of 8 keys) in both the graphs and the eager reference.
Each setting runs twice: with the element-wise chains (ops/fused.py) compiled on both sides (``fusion(True)``)
and with the plain bodies on both sides; every row must be 1.0, in bf16 too. (By default graphs replay the fused
chains while eager steps run the plain bodies: the same math, rounded differently in bf16; part (2) compares
those two.)
(2) reference: the eager engine (plain bodies) against each request decoded alone by ``Supernet.generate``, with
prompts read in one fresh chunk and in chunks of 8; fp32 must give 1.0.
(3) spec: speculative greedy requests whose draft steps replay CUDA graphs against the eager engine's rounds:
identical outputs and acceptances, and outputs equal to plain decoding (fp32 must give 1.0 everywhere).
(4) fusion: the same requests through the eager engine with the element-wise chains compiled and without, fp32
and bf16: the fraction of identical outputs, and the largest logit difference of a forward under each
single-mixer placement.
(5) speed (with --model, e.g. the SmolLM2 supernet): decode tokens/s eager vs graphs at a few batch sizes, one
placement and a mix, each row holding --context tokens of state.

    python benchmarks/engine_graphs.py --model runs/pipeline/supernet --out results/engine_graphs.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import traceback

import torch

from gearshift import envs
from gearshift.config import SupernetConfig
from gearshift.model import Supernet
from gearshift.ops.fused import fusion
from gearshift.serve.engine import Engine, SamplingParams

from common import device_name, write_json
from engine_mixed import decode_rate


def _case(dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Supernet, list[str], list, random.Random]:
    """A random 6-layer supernet, the placements checked (each single mixer and four mixes), a prompt for each,
    and the generator that drew them (for further draws)."""
    cfg = SupernetConfig.tiny(num_layers=6, vocab_size=257, window=12, eos_token_id=None)
    # weights laid out as the engine lays them (it fuses its model's projections), so Supernet.generate runs the
    # same matmuls whether it runs before or after an engine
    model = Supernet.random(cfg, seed=seed, std=0.2).to(device=device, dtype=dtype).eval().fuse_projections_()
    rng = random.Random(seed)
    n = cfg.num_layers
    placements = ["F" * n, "S" * n, "G" * n, "K" * n, "FSGKFS", "GGKKSF", "KFKFKF", "SSGGFF"]
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(2, 40))] for _ in placements]
    return model, placements, prompts, rng


def check(dtype: torch.dtype, device: torch.device, seed: int = 0, split_kv: int = 0) -> dict:
    """Fraction of requests whose graph-replayed output equals eager decoding's (``split_kv``: both run split-KV
    decode attention over chunks of that many keys; 0: both the fused kernel)."""
    model, placements, prompts, rng = _case(dtype, device, seed)
    lengths = [rng.randint(8, 48) for _ in placements]
    outputs = []
    graph_count = 0
    for graphs in (False, True):
        with envs.override(SPLIT_KV=split_kv):
            engine = Engine(model, max_batch=3, prefill_chunk=16, cuda_graphs=graphs)
            reqs = [
                engine.submit(p, pl, SamplingParams(max_tokens=m, stop_token_ids=()))
                for p, pl, m in zip(prompts, placements, lengths, strict=True)
            ]
            engine.run()
        outputs.append([r.output for r in reqs])
        graph_count = max(graph_count, len(engine.runner.graphs.captured))
    same = [a == b for a, b in zip(*outputs, strict=True)]
    row = {"dtype": str(dtype), "requests": len(same), "identical": sum(same) / len(same), "graphs": graph_count}
    return row | ({"split_kv": split_kv} if split_kv else {})


def reference_check(dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Fraction of requests whose eager-engine output equals ``Supernet.generate`` of that request alone (the
    model's own cache, no CUDA graph): once with chunks long enough that every prompt is read in one fresh chunk
    (attention to its own keys, SDPA's causal kernel) and once in chunks of 8 (masked reads of the pools)."""
    model, placements, prompts, _ = _case(dtype, device, seed)
    alone = [
        model.generate([p], pl, max_new_tokens=24, eos_token_id=[], cuda_graph=False)[0, len(p) :].tolist()
        for p, pl in zip(prompts, placements, strict=True)
    ]
    row = {"dtype": str(dtype), "requests": len(alone)}
    for chunk in (64, 8):
        engine = Engine(model, max_batch=4, prefill_chunk=chunk, cuda_graphs=False)
        outs = engine.generate(prompts, placements, SamplingParams(max_tokens=24, stop_token_ids=()))
        row[f"identical_chunk_{chunk}"] = sum(a == b for a, b in zip(outs, alone, strict=True)) / len(alone)
    return row


def spec_check(dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Speculative greedy requests with draft steps replayed from CUDA graphs against the eager engine's rounds:
    identical outputs and acceptances (fractions), and outputs equal to each target decoded alone (eager engine,
    plain). Drafts near their targets (one layer changed: acceptances, catch-ups) and far (roll-backs)."""
    model, placements, prompts, _ = _case(dtype, device, seed)
    pairs = [(p, p[:-1] + ("G" if p[-1] != "G" else "K")) for p in placements[:4]]
    pairs += [(p, d) for p, d in zip(placements[4:], ["G" * 6, "K" * 6, "S" * 6, "GKGKGK"], strict=True)]
    params = SamplingParams(max_tokens=24, stop_token_ids=())
    runs = []
    for graphs in (False, True):
        engine = Engine(model, max_batch=3, prefill_chunk=16, cuda_graphs=graphs, spec_k_max=4)
        reqs = [engine.submit(p, t, params, draft=d, spec_k=3) for p, (t, d) in zip(prompts, pairs, strict=True)]
        engine.run()
        runs.append([(r.output, r.accepted, r.proposed) for r in reqs])
    plain = Engine(model, max_batch=3, prefill_chunk=16, cuda_graphs=False)
    alone = plain.generate(prompts, [t for t, _ in pairs], params)
    n = len(pairs)
    return {"dtype": str(dtype), "requests": n,
            "identical_graphs_vs_eager": sum(a[0] == b[0] for a, b in zip(*runs, strict=True)) / n,
            "same_acceptance": sum(a[1:] == b[1:] for a, b in zip(*runs, strict=True)) / n,
            "identical_to_plain": sum(a[0] == b for a, b in zip(runs[1], alone, strict=True)) / n,
            "acceptance": sum(a[1] for a in runs[1]) / max(1, sum(a[2] for a in runs[1]))}  # fmt: skip


def fusion_check(dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Compiled element-wise chains vs eager: identical outputs (fraction) and the largest logit difference."""
    model, placements, prompts, _ = _case(dtype, device, seed)
    n = model.config.num_layers
    ids = torch.tensor([prompts[0]], device=device)
    outputs, logits = [], []
    for on in (False, True):
        with fusion(on), torch.no_grad():
            engine = Engine(model, max_batch=4, prefill_chunk=16, cuda_graphs=False)
            params = SamplingParams(max_tokens=32, stop_token_ids=())
            outputs.append(engine.generate(prompts, placements, params))
            logits.append([model(ids, letter * n).float() for letter in "FSGK"])
    same = [a == b for a, b in zip(*outputs, strict=True)]
    diff = max(float((a - b).abs().max()) for a, b in zip(*logits, strict=True))
    scale = max(float(a.abs().max()) for a in logits[0])
    return {"dtype": str(dtype), "requests": len(same), "identical": sum(same) / len(same), "max_logit_diff": diff,
            "max_logit": scale}  # fmt: skip


def speed(model: Supernet, context: int, batches: list[int], steps: int) -> list[dict]:
    n = model.config.num_layers
    mix = ["F" * n, "S" * n, "G" * n, "K" * n]
    rows = []
    for batch in batches:
        cases = (("all-attention", ["F" * n] * batch), ("mix of 4", [mix[i % 4] for i in range(batch)]))
        for label, placements in cases:
            row = {"batch": batch, "placements": label}
            for graphs in (False, True):
                engine = Engine(model, max_batch=batch, max_context=context + steps + 8, cuda_graphs=graphs)
                row["graphs" if graphs else "eager"] = decode_rate(engine, placements, context, steps)[0]
                del engine
                torch.cuda.empty_cache()
            row["speedup"] = row["graphs"] / row["eager"]
            rows.append(row)
            print(
                f"batch {batch:>3} {label:<14} eager {row['eager']:9.1f} tok/s  graphs {row['graphs']:9.1f} tok/s  "
                f"x{row['speedup']:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint for the speed part (skipped without it)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--parts", nargs="+", choices=["check", "reference", "spec", "fusion"],
                    default=["check", "reference", "spec", "fusion"],
                    help="which checks to run (the speed part runs with --model)")  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/engine_graphs.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a GPU")
    device = torch.device("cuda")
    report: dict = {"device": device_name(device), "check": [], "speed": []}
    checks = itertools.product((torch.float32, torch.bfloat16), (0, 8), (True, False))
    for dtype, split_kv, fused in checks if "check" in args.parts else ():
        try:
            with fusion(fused):
                report["check"].append(check(dtype, device, split_kv=split_kv) | {"fused_graphs": fused})
            print(f"check {report['check'][-1]}", flush=True)
        except Exception:  # noqa: BLE001 - record and go on: this runs unattended
            report["check"].append({"dtype": str(dtype), "error": traceback.format_exc()})
            print(report["check"][-1]["error"], flush=True)
        write_json(args.out, report)
    parts = {"reference": reference_check, "spec": spec_check, "fusion": fusion_check}
    for dtype in (torch.float32, torch.bfloat16):
        for part, fn in parts.items():
            if part not in args.parts:
                continue
            try:
                with fusion(False) if part in ("reference", "spec") else contextlib.nullcontext():
                    report.setdefault(part, []).append(fn(dtype, device))
                print(f"{part} {report[part][-1]}", flush=True)
            except Exception:  # noqa: BLE001
                report.setdefault(part, []).append({"dtype": str(dtype), "error": traceback.format_exc()})
                print(report[part][-1]["error"], flush=True)
            write_json(args.out, report)
    if args.model:
        try:
            model = Supernet.from_pretrained(args.model, device=device, dtype=torch.bfloat16).eval()
            with envs.override(SPLIT_KV="auto"):  # the speed part times the default path
                report["speed"] = speed(model, args.context, args.batches, args.steps)
        except Exception:  # noqa: BLE001
            report["speed_error"] = traceback.format_exc()
            print(report["speed_error"], flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
