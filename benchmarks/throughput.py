"""Decode and prefill throughput of placements of a supernet, beside the HBM roofline and the paper.

Decode: a cache as if ``context`` tokens were processed (random state), then CUDA-graph replays of one-token
steps; tokens/s = batch / step time. Batch 1 and the largest batch whose state fits in memory. Prefill: one
sequence of ``context`` tokens through a fresh cache. Roofline: modelled bytes moved per step / bandwidth.

    python benchmarks/throughput.py --shape apriel-15b --contexts 4096 16384 32768 --out results/throughput.json
    python benchmarks/throughput.py --shape tiny --device cpu --contexts 64   # CI smoke run
"""

from __future__ import annotations

import argparse
import gc

import torch

from gearshift.report import H200_BANDWIDTH, PAPER_PRESETS, paper_placement, placement_report

from common import device_name, random_supernet, synthetic_cache, time_it, write_json

ISSUE_PRESETS = ["Reg|Lklhd-26", "Reg|Lklhd-18", "Idealized|Lklhd-6", "Reg|Lklhd-13", "Reg|Lklhd-10"]


def placements(n_layers: int) -> dict[str, str]:
    out = {f"all-{k}": letter * n_layers for k, letter in (("FA", "F"), ("SWA", "S"), ("GDN", "G"), ("KDA", "K"))}
    for name in ISSUE_PRESETS:
        out[name] = paper_placement(name, n_layers)
    return out


def max_batch(model, placement, context, steps, budget_bytes, cap):
    per_seq = placement_report(model, placement, context=context + steps).state_bytes_per_seq
    return max(1, min(cap, int(budget_bytes // max(per_seq, 1))))


def decode_step_time(model, placement, batch, context, steps, dtype, use_graph):
    from gearshift.cuda_graphs import GraphDecoder

    device = model.device
    cache = synthetic_cache(model, placement, batch, context, extra=steps + 8, dtype=dtype)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    if use_graph:
        runner = GraphDecoder(model, cache, capacity=context + steps + 8, keep_state=False)
        step = lambda: runner.step(tokens)  # noqa: E731
    else:

        def step():
            with torch.no_grad():
                return model(tokens[:, None], cache=cache)

    return time_it(step, device, iters=steps, warmup=1)


def prefill_time(model, placement, context):
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)

    def run():
        with torch.no_grad():
            cache = model.new_cache(1, placement)
            model(ids, cache=cache, last_only=True)

    return time_it(run, device, iters=2, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "apriel-15b"], default="apriel-15b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per figure")
    ap.add_argument("--max-batch-cap", type=int, default=512)
    ap.add_argument("--reserve-gb", type=float, default=12.0, help="memory kept free for activations")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--only", nargs="*", help="subset of placement names")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    model = random_supernet(args.shape, device).fuse_projections_()  # inference layout, as the engine's
    cfg, dtype = model.config, model.model.embed_tokens.weight.dtype
    n_layers = cfg.num_layers
    use_graph = device.type == "cuda"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] - args.reserve_gb * 2**30
    else:
        budget = 2 * 2**30
    print(
        f"{device_name(device)}: {cfg.num_layers} layers, {weights / 2**30:.1f} GiB of weights ({dtype}), "
        f"state budget {budget / 2**30:.1f} GiB, CUDA graphs: {use_graph}"
    )
    rows = []
    names = placements(n_layers)
    if args.only:
        names = {k: v for k, v in names.items() if k in args.only}
    for context in args.contexts:
        for name, placement in names.items():
            for which in ("batch1", "max"):
                batch = (
                    1
                    if which == "batch1"
                    else max_batch(model, placement, context, args.steps, budget, args.max_batch_cap)
                )
                try:
                    seconds = decode_step_time(model, placement, batch, context, args.steps, dtype, use_graph)
                except torch.OutOfMemoryError:
                    print(f"  {name} ctx {context} batch {batch}: out of memory, skipped")
                    continue
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                report = placement_report(
                    model, placement, context=context, batch=batch, dtype_bytes=2 if dtype == torch.bfloat16 else 4
                )
                row = {
                    "placement": name,
                    "letters": placement,
                    "context": context,
                    "batch": batch,
                    "kind": which,
                    "step_ms": seconds * 1e3,
                    "tokens_per_s": batch / seconds,
                    "roofline_ms": report.bytes_per_step / H200_BANDWIDTH * 1e3,
                    "bytes_per_step": report.bytes_per_step,
                }
                row["of_roofline"] = row["roofline_ms"] / row["step_ms"]
                rows.append(row)
                print(
                    f"  ctx {context:>6} {name:<18} batch {batch:>4}: {row['step_ms']:8.2f} ms/step "
                    f"{row['tokens_per_s']:10.0f} tok/s  roofline {row['roofline_ms']:7.2f} ms "
                    f"({100 * row['of_roofline']:.0f}%)",
                    flush=True,
                )
            if not args.no_prefill:
                try:
                    seconds = prefill_time(model, placement, context)
                    rows.append(
                        {
                            "placement": name,
                            "context": context,
                            "batch": 1,
                            "kind": "prefill",
                            "seconds": seconds,
                            "tokens_per_s": context / seconds,
                        }
                    )
                    print(f"  ctx {context:>6} {name:<18} prefill: {context / seconds:10.0f} tok/s", flush=True)
                except torch.OutOfMemoryError:
                    print(f"  {name} ctx {context}: prefill out of memory, skipped")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    # speed-up vs all-FA at the largest batch (the paper's setting) beside the paper's figures
    for row in rows:
        if row["kind"] not in ("max", "batch1"):
            continue
        base = next(
            (
                r
                for r in rows
                if r["placement"] == "all-FA" and r["context"] == row["context"] and r["kind"] == row["kind"]
            ),
            None,
        )
        if base:
            row["speedup_vs_FA"] = row["tokens_per_s"] / base["tokens_per_s"]
        paper = PAPER_PRESETS.get(row["placement"])
        if paper:
            row["paper_speedup_32k"], row["paper_speedup_16k"] = paper[1], paper[2]
    write_json(args.out, {"device": device_name(device), "shape": args.shape, "dtype": str(dtype), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
