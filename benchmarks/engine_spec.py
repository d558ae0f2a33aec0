"""Self-speculative decoding on the 15B shape: what a round costs against a plain target step, and the speed-up
that gives at each acceptance rate.

Random weights accept almost nothing, so this does not measure acceptance: ``serve_smollm2.py`` does, on a
supernet distilled from SmolLM2 (41-56% per draft token there, BENCHMARKS.md, "Self-speculative decoding"). It
measures the cost side, on the
shape where self-speculation can pay: a target step bound by reading long KV caches, and a draft that reads
none. Every row holds ``context`` tokens of random state (target and draft pools); then, in one engine (and a
second one for the rounds of the other ``--draft-graphs`` setting, when both are asked for):
- the plain decode rate of the target and of each draft (CUDA graphs): a target step ``t_target`` and a draft
  step ``t_draft`` per batch;
- speculative rounds at a fixed k, ``t_round`` each: k draft steps and one target forward over k + 1 tokens
  (replayed from graphs, or eager with ``--draft-graphs off``), the roll-back of both.

With acceptance a per draft token (independent), a round emits E = (1 - a^(k+1)) / (1 - a) tokens per row, and
a fully accepted round (probability a^k) leaves the draft one token to read in the next: the speed-up over plain
decoding is E t_target / (t_round + a^k t_draft). Rounds here reject everything, so the catch-up is added from
``t_draft``.

    python benchmarks/engine_spec.py --context 32768 --batch 8 --drafts all-gdn 'Reg|Lklhd-10' --ks 2 4
    python benchmarks/engine_spec.py --context 131072 --batch 4 --ks 4 8 --acceptance 0.41 0.56 0.8
    python benchmarks/engine_spec.py --shape tiny --device cpu --context 64 --batch 2 --ks 2   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from gearshift.placement import placement_letters
from gearshift.roofline import PAPER_PRESETS, paper_placement
from gearshift.serve.engine import Engine, EngineConfig, SamplingParams

from common import device_name, random_supernet, sync, write_json
from engine_mixed import decode_rate, start_filled

ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def speedup(a: float, k: int, t_target: float, t_round: float, t_draft: float) -> float:
    """Plain decode time of the tokens a round emits, over the round's time (see the module docstring)."""
    emitted = (1 - a ** (k + 1)) / (1 - a)
    return emitted * t_target / (t_round + a**k * t_draft)


def break_even(k: int, t_target: float, t_round: float, t_draft: float, goal: float = 1.0) -> float | None:
    """The acceptance at which rounds reach a speed-up of ``goal`` (1: they pay for themselves), by bisection;
    None if they fall short even at 99.9% acceptance."""
    lo, hi = 0.0, 0.999
    if speedup(hi, k, t_target, t_round, t_draft) < goal:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid, k, t_target, t_round, t_draft) < goal else (lo, mid)
    return hi


def round_seconds(engine: Engine, target: str, draft: str, k: int, context: int, rounds: int) -> tuple[float, float]:
    """Seconds per speculative round of a batch of ``engine.max_batch`` rows at k, and the acceptance seen."""
    params = SamplingParams(max_tokens=(rounds + 4) * (k + 1), stop_token_ids=())
    reqs = [engine.submit([1, 2], target, params, draft=draft, spec_k=k) for _ in range(engine.max_batch)]
    start_filled(engine, reqs, context)

    def one_round() -> None:
        for r in reqs:
            r.spec_k = k  # fixed k: at random weights the adaptive k would fall to 1
        engine.step()

    for _ in range(3):  # eager (compiling), capture, first replay of the draft's graph
        one_round()
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        one_round()
    sync(engine.device)
    seconds = (time.perf_counter() - t0) / rounds
    acceptance = sum(r.accepted for r in reqs) / max(1, sum(r.proposed for r in reqs))
    for r in reqs:
        engine.cancel(r)
    engine.step()
    return seconds, acceptance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "apriel-15b"], default="apriel-15b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", default="all-attention")
    ap.add_argument("--drafts", nargs="+", default=["all-gdn", "Reg|Lklhd-10"])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=8, help="plain decode steps timed")
    ap.add_argument("--rounds", type=int, default=6, help="speculative rounds timed")
    ap.add_argument("--draft-graphs", nargs="+", choices=["on", "off"], default=["on"],
                    help="a round's forwards (draft steps, verify pass) replayed from CUDA graphs (on) or run "
                    "eagerly (off); both: one row each")  # fmt: skip
    ap.add_argument(
        "--acceptance",
        type=float,
        nargs="+",
        default=list(ACCEPTANCE),
        help="acceptance rates per draft token to predict the speed-up at (e.g. a distilled supernet's measured "
        "ones, from serve_smollm2.py)",
    )
    ap.add_argument("--out", default="benchmarks/results/engine_spec.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    margin = args.steps + 8 + (args.rounds + 8) * (max(args.ks) + 1)
    model = random_supernet(args.shape, device, context=args.context + margin)
    cfg = model.config
    n = cfg.num_layers

    def resolve(name: str) -> str:
        return paper_placement(name, n) if name in PAPER_PRESETS else placement_letters(model.resolve(name), cfg)

    target, drafts = resolve(args.target), {name: resolve(name) for name in args.drafts}
    config = EngineConfig(
        max_batch=args.batch, max_context=args.context + margin, spec_k_max=max(args.ks),
        placements=(target, *drafts.values()), cuda_graphs=device.type == "cuda",
    )  # fmt: skip
    engine = Engine(model, config)
    graphs = engine.cuda_graphs
    b = args.batch
    # plain steps on the engine's own setting (graphs where CUDA is); rounds under each --draft-graphs setting, an
    # engine each (the first one serves the rounds of its own setting)
    t_target = b / decode_rate(engine, [target] * b, args.context, args.steps)[0]
    print(f"{args.target} x{b} at {args.context}: plain step {1e3 * t_target:.2f} ms", flush=True)
    t_draft = {}
    for name, draft in drafts.items():
        t = t_draft[name] = b / decode_rate(engine, [draft] * b, args.context, args.steps)[0]
        print(f"  draft {name}: plain step {1e3 * t:.2f} ms ({t / t_target:.2f} of the target's)")
    modes = args.draft_graphs if graphs else ["off"]
    timed = {}
    for mode in sorted(modes, key=lambda m: (m == "on") != graphs):  # the running engine's setting first
        if engine.cuda_graphs != (graphs and mode == "on"):
            engine = None  # its pools go before the next engine sizes its own to the free memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
            engine = Engine(model, dataclasses.replace(config, cuda_graphs=graphs and mode == "on"))
        for name, draft in drafts.items():
            for k in args.ks:
                timed[name, k, mode] = round_seconds(engine, target, draft, k, args.context, args.rounds)
    rows = []
    for name in drafts:
        for k in args.ks:
            for mode in modes:
                t_round, seen = timed[name, k, mode]
                gains = {a: speedup(a, k, t_target, t_round, t_draft[name]) for a in args.acceptance}
                even = break_even(k, t_target, t_round, t_draft[name])
                twice = break_even(k, t_target, t_round, t_draft[name], goal=2.0)
                # what a round could cost: k draft steps and one verify pass, itself about one target step (both
                # memory-bound: k + 1 tokens read the same weights and state as one)
                ideal = k * t_draft[name] + t_target
                rows.append(
                    {"draft": name, "k": k, "draft_graphs": mode if graphs else "off", "t_target_ms": 1e3 * t_target,
                     "t_draft_ms": 1e3 * t_draft[name], "t_round_ms": 1e3 * t_round, "acceptance_seen": seen,
                     "break_even_acceptance": even, "acceptance_for_2x": twice, "t_ideal_round_ms": 1e3 * ideal,
                     "round_vs_ideal": t_round / ideal,
                     "speedup_at_acceptance": {str(a): g for a, g in gains.items()}}
                )  # fmt: skip
                table = "  ".join(f"a={a}: {g:.2f}x" for a, g in gains.items())
                print(
                    f"  {name:<14} k={k} draft graphs {rows[-1]['draft_graphs']:<3}: round {1e3 * t_round:7.2f} ms "
                    f"(= {t_round / t_target:.2f} target steps, {t_round / ideal:.2f}x k drafts + one verify), "
                    f"break-even acceptance {'none' if even is None else f'{even:.2f}'}, for 2x "
                    f"{'none' if twice is None else f'{twice:.2f}'}; {table}",
                    flush=True,
                )
    write_json(
        args.out,
        {"device": device_name(device), "shape": args.shape, "context": args.context, "batch": b,
         "target": args.target, "rows": rows},
    )  # fmt: skip


if __name__ == "__main__":
    main()
