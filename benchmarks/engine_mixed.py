"""Serving engine: decode throughput of mixed-preset batches vs single-preset batches of the same size.

Requests start as if ``context`` tokens had been read (random state in their pool slots: prefilling batches at
32k would dominate the run), then the engine takes decode steps. For each preset alone and for an even mix of
all presets, it prints tokens/s and writes JSON. Self-speculative decoding needs trained weights (acceptance):
``benchmarks/serve_smollm2.py`` times it on a supernet distilled from SmolLM2.

    python benchmarks/engine_mixed.py --shape apriel-15b --context 16384 --batch 16 --out results/engine.json
    python benchmarks/engine_mixed.py --shape tiny --device cpu --context 64 --batch 4   # smoke run
    python benchmarks/engine_mixed.py --graphs --split-kv 0 -1 ...   # fused vs auto split-KV attention, one run
    python benchmarks/engine_mixed.py --graphs --fusion off on ...   # eager vs compiled element-wise chains
    python benchmarks/engine_mixed.py --presets 'Reg|Lklhd-26' 'Reg|Lklhd-18' 'Reg|Lklhd-10' --batch 64   # no all-FA:
        # larger batches fit, where each row's state outweighs the extra mixers' weights
    python benchmarks/engine_mixed.py --pools sized --thin --batch 0 --batch-limit 256 ...   # an engine per run,
        # pools sized to its rows, weights of unused mixers dropped: the largest batches one GPU holds
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from gearshift import envs
from gearshift.ops.fused import fusion
from gearshift.roofline import PAPER_PRESETS, batch_bytes_per_step, paper_placement
from gearshift.serve.engine import Engine, EngineConfig, SamplingParams

from common import device_name, profile_cuda, random_supernet, sync, write_json


def start_filled(engine: Engine, reqs: list, context: int) -> list:
    """Admit these submitted requests together (all must fit) and give each ``context`` tokens of state."""
    try:
        engine.start_synthetic(reqs, context)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}: lower --batch or --context") from None
    return reqs


def decode_rate(
    engine: Engine, placements: list[str], context: int, steps: int, profile: bool = False, top: int = 15
) -> tuple:
    """Decode tokens/s of a batch of these placements, each row holding ``context`` tokens of state; with
    ``profile``, also where one eager step's device time goes (the kernels a graph replays are the same)."""
    params = SamplingParams(max_tokens=steps + 4, stop_token_ids=())  # warm-up, capture, profile
    reqs = start_filled(engine, [engine.submit([1, 2], p, params) for p in placements], context)
    engine.step()  # warm-up (with CUDA graphs: eager, compiling the kernels)
    if engine.cuda_graphs:
        engine.step()  # the capture, then the first replay
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    seconds = time.perf_counter() - t0
    prof = None
    if profile:
        with engine.runner.eager():
            prof = profile_cuda(engine.step, top)
    for r in reqs:
        engine.cancel(r)
    engine.step()
    return len(reqs) * steps / seconds, prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "apriel-15b"], default="apriel-15b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=16, help="rows per batch; 0: the largest that fits (up to 128)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/engine_mixed.json")
    ap.add_argument("--graphs", action="store_true", help="decode steps replayed from CUDA graphs (GPU)")
    ap.add_argument(
        "--split-kv",
        type=int,
        nargs="+",
        default=[-1],
        help="decode attention: -1 auto (the engine's default: split-KV where the fused kernel leaves the GPU "
        "idle), 0 fused (masked SDPA), N split-KV over chunks of N keys; several values run one after the other",
    )
    ap.add_argument(
        "--fusion",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="the element-wise chains compiled into fused kernels (ops/fused.py; on = the default on CUDA) or "
        "eager; several values run one after the other",
    )
    ap.add_argument("--profile", action="store_true", help="profile one step of all-attention and of the mix")
    ap.add_argument("--profile-top", type=int, default=15, help="kernels and host ops listed per profile")
    ap.add_argument("--max-context", type=int, help="the engine's context (pool capacity); default: just enough")
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["all-attention", "Reg|Lklhd-26", "Reg|Lklhd-18", "Reg|Lklhd-10"],
        help="the paper presets (report.PAPER_PRESETS) or all-<mixer> placements to time alone and evenly mixed",
    )
    ap.add_argument(
        "--pools",
        choices=["union", "sized"],
        default="union",
        help="union: one engine whose every pool holds --batch slots (any row may use any served preset); sized: "
        "an engine per run whose pools hold exactly that run's rows (Engine(placement_slots=...)), so a mixed "
        "row holds only its own preset's state and larger batches fit",
    )
    ap.add_argument(
        "--thin",
        action="store_true",
        help="drop the weights of mixers no timed preset uses (Supernet.thin_, as `gearshift serve --only-presets` "
        "does): memory for more rows, same kernels",
    )
    ap.add_argument("--batch-limit", type=int, default=128, help="--batch 0 searches batches up to this")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: threads cost more than they give
    model = random_supernet(args.shape, device)
    cfg = model.config
    n = cfg.num_layers
    presets = {
        name: paper_placement(name, n) if name in PAPER_PRESETS else model.resolve(name) for name in args.presets
    }
    if args.batch % len(presets):
        raise SystemExit(f"--batch {args.batch} does not split evenly over {len(presets)} presets")
    served = list(presets.values())
    if args.thin:
        model.thin_(served)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def make_engine(batch: int, rows: dict[str, int] | None = None) -> Engine:
        """union (``rows`` None): pools for the mixers the presets use, ``batch`` slots each, as a server started
        with --only-presets; sized: pools that hold ``rows[name]`` requests of each preset."""
        ctx = args.max_context or args.context + args.steps + 8
        config = EngineConfig(max_batch=batch, max_context=ctx, cuda_graphs=args.graphs)
        if args.pools == "union":
            return Engine(model, dataclasses.replace(config, placements=served))
        sized = {presets[name]: count for name, count in rows.items()}
        return Engine(model, dataclasses.replace(config, placement_slots=sized))

    def release() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def runs_of(batch: int) -> list[dict[str, int] | None]:
        """The engines' sizes one setting needs: each preset alone, then the mix (sized pools)."""
        if args.pools == "union":
            return [None]
        return [{name: batch} for name in presets] + [dict.fromkeys(presets, batch // len(presets))]

    if args.batch == 0:  # the largest batch whose every run fits the state budget
        for batch in range(args.batch_limit // len(presets) * len(presets), 0, -len(presets)):
            fits = True
            for rows in runs_of(batch):
                try:
                    engine = make_engine(batch, rows)
                    fits = engine.full_attention_slots >= batch if rows is None else True
                except ValueError:
                    fits = False
                engine = None
                release()
                if not fits:
                    break
            if fits:
                break
        else:
            raise SystemExit("not even one row per preset fits the state budget")
        args.batch = batch
        print(f"largest batch that fits: {batch}", flush=True)
    # the bandwidth floor: a mixed step reads every mixer in use (and each row's state); single-preset steps
    # read one mixer per layer. The modelled excess of bytes is the least slowdown a mix can have.
    mix = [list(presets.values())[i % len(presets)] for i in range(args.batch)]
    moved = {name: batch_bytes_per_step(model, [p] * args.batch, context=args.context) for name, p in presets.items()}
    floor = batch_bytes_per_step(model, mix, context=args.context) / (sum(moved.values()) / len(moved)) - 1
    part = args.batch // len(presets)
    runs = []
    for chunk, fuse in itertools.product(args.split_kv, args.fusion):
        label = f"split-KV {chunk:<5} fusion {fuse:<3}"
        with envs.override(SPLIT_KV="auto" if chunk < 0 else chunk), fusion(fuse == "on"):
            engine = make_engine(args.batch) if args.pools == "union" else None  # union: one engine for all runs
            rows = []
            for name, placement in presets.items():
                if args.pools == "sized":
                    engine = None
                    release()
                    engine = make_engine(args.batch, {name: args.batch})
                rate, prof = decode_rate(
                    engine, [placement] * args.batch, args.context, args.steps, args.profile, args.profile_top
                )
                rows.append({"batch": name, "tokens_per_s": rate} | ({"profile": prof} if prof else {}))
                print(f"{label} {name:<16} x{args.batch}: {rate:10.1f} tok/s", flush=True)
            if args.pools == "sized":
                engine = None
                release()
                engine = make_engine(args.batch, dict.fromkeys(presets, part))
            # what an engine that switches placements globally must do with the same requests: one batch per
            # preset (batch / presets rows each), one after the other; its rate is the harmonic mean of theirs
            split = {n: decode_rate(engine, [pl] * part, args.context, args.steps)[0] for n, pl in presets.items()}
            per_preset = len(presets) / sum(1 / r for r in split.values())
            rate, prof = decode_rate(engine, mix, args.context, args.steps, args.profile, args.profile_top)
        # the fair single-preset reference for a mix: the harmonic mean of the members' rates (same work per token)
        singles = {r["batch"]: r["tokens_per_s"] for r in rows}
        reference = len(mix) / sum(1 / singles[name] for name in presets for _ in range(part))
        rows.append(
            {"batch": "mixed", "tokens_per_s": rate, "single_preset_reference": reference,
             "slowdown": reference / rate - 1, "modelled_floor_slowdown": floor,
             "per_preset_batches": {"batch": part, "tokens_per_s": split, "one_after_another": per_preset},
             "speedup_vs_per_preset_batches": rate / per_preset} | ({"profile": prof} if prof else {})
        )  # fmt: skip
        print(
            f"{label} {'mixed':<16} x{args.batch}: {rate:10.1f} tok/s "
            f"(single-preset reference {reference:.1f}, {100 * (reference / rate - 1):+.1f}%; "
            f"bytes moved: {100 * floor:+.1f}%; "
            f"{rate / per_preset:.2f}x the per-preset batches of {part} one after another, {per_preset:.1f})",
            flush=True,
        )
        runs.append({"split_kv": chunk, "fusion": fuse, "graphs": engine.cuda_graphs, "rows": rows})
        engine = None
        release()
    meta = {"device": device_name(device), "shape": args.shape, "context": args.context, "batch": args.batch}
    meta |= {"presets": args.presets, "pools": args.pools, "thin": args.thin}
    meta["modelled_bytes_per_step"] = moved | {"mixed": batch_bytes_per_step(model, mix, context=args.context)}
    # one setting: the flat layout of earlier results (rows at the top level)
    write_json(args.out, meta | (runs[0] if len(runs) == 1 else {"runs": runs}))


if __name__ == "__main__":
    main()
