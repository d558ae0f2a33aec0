"""Like-for-like decode and prefill throughput of placements through the serving engine, beside the HBM roofline.

Every placement runs through the same engine path (``gearshift.serve.Engine``, CUDA graphs on CUDA) with *only
its own mixers' weights* in memory (``Supernet.thin_``), so each is at its best: batch 1, and its largest batch
-- the most rows whose decoding state the engine's pools hold (pools sized to that placement alone), found by
search up to ``--batch-limit``, never capped by the engine's queue bound. Rows start as if ``context`` tokens had
been read (random state, ``Engine.start_synthetic``), then the engine takes ``--steps`` timed decode steps.
Beside every decode figure: the modelled roofline (``batch_bytes_per_step`` / ``--bandwidth``: weights once,
each row's state) and the share of it reached. Prefill: one prompt of ``context`` tokens through the engine's
chunked prefill, timed after a warm-up; beside it, the speed-up over all-attention that the forward's FLOPs
predict (``gearshift.train.flops.pass_flops``). Speed-ups divide by all-attention at the same context and batch
kind (its own largest batch for "max").

    python benchmarks/throughput.py --shape apriel-15b --contexts 4096 16384 32768 65536 \\
        --out benchmarks/results/throughput_15b_h200.json
    python benchmarks/throughput.py --shape tiny --device cpu --contexts 32 --steps 2 --batch-limit 4 \\
        --state-mb 1   # CI smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from gearshift.roofline import H200_BANDWIDTH, PAPER_PRESETS, batch_bytes_per_step, paper_placement
from gearshift.serve.engine import Engine, EngineConfig, SamplingParams
from gearshift.train.flops import pass_flops

from common import device_name, random_supernet, release, sync, write_json
from engine_mixed import decode_rate

ISSUE_PRESETS = ["Reg|Lklhd-26", "Reg|Lklhd-18", "Idealized|Lklhd-6", "Reg|Lklhd-13", "Reg|Lklhd-10"]
SINGLE = {"all-FA": "F", "all-SWA": "S", "all-GDN": "G", "all-KDA": "K"}


def placements(n_layers: int) -> dict[str, str]:
    out = {name: letter * n_layers for name, letter in SINGLE.items()}
    return out | {name: paper_placement(name, n_layers) for name in ISSUE_PRESETS}


class Bench:
    """One placement's model (its own weights only) and the engines that time it."""

    def __init__(self, model, letters: str, args: argparse.Namespace) -> None:
        self.model, self.letters, self.args = model, letters, args
        self.device = model.device
        self.state_memory = None if args.state_mb is None else int(args.state_mb * 2**20)

    def engine(self, rows: int, context: int) -> Engine:
        """An engine whose pools hold exactly ``rows`` requests of this placement at ``context`` tokens (raises
        ValueError when they do not fit the state budget)."""
        config = EngineConfig(
            max_batch=rows,
            max_queue=rows,  # every row queued at once: the bound never limits the batch
            max_context=context + self.args.steps + 8,
            cuda_graphs=self.device.type == "cuda",
            state_memory=self.state_memory,
            placement_slots={self.letters: rows},
        )
        return Engine(self.model, config)

    def fits(self, rows: int, context: int) -> bool:
        try:
            self.engine(rows, context)
        except ValueError:
            return False
        finally:
            release(self.device)
        return True

    def largest_batch(self, context: int) -> int:
        """The most rows the pools hold at ``context``: doubling, then bisection (0 if not even one fits)."""
        limit = self.args.batch_limit
        if not self.fits(1, context):
            return 0
        good = 1
        while good < limit:
            trial = min(2 * good, limit)
            if not self.fits(trial, context):
                bad = trial
                break
            good = trial
        else:
            return good
        while bad - good > max(1, good // 64):  # within ~1.5%: each probe allocates the pools
            mid = (good + bad) // 2
            good, bad = (mid, bad) if self.fits(mid, context) else (good, mid)
        return good

    def decode(self, rows: int, context: int) -> float:
        """Seconds per decode step of ``rows`` rows holding ``context`` tokens each (``engine_mixed.decode_rate``:
        the same warm-up, capture and timed steps as the mixed-batch benchmark)."""
        engine = self.engine(rows, context)
        rate, _ = decode_rate(engine, [self.letters] * rows, context, self.args.steps)
        del engine
        release(self.device)
        return rows / rate

    def prefill(self, context: int) -> float:
        """Seconds to read one prompt of ``context`` tokens and emit its first token, after a warm-up run."""
        gen = torch.Generator().manual_seed(context)
        vocab = self.model.config.vocab_size
        engine = self.engine(1, context)
        params = SamplingParams(max_tokens=1, stop_token_ids=())
        seconds = 0.0
        for length in (min(context, 2 * engine.prefill_chunk), context):  # warm-up, then the timed run
            prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
            sync(self.device)
            start = time.perf_counter()
            engine.submit(prompt, self.letters, params)
            engine.run()
            sync(self.device)
            seconds = time.perf_counter() - start
        del engine
        release(self.device)
        return seconds


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: threads cost more than they give
    probe = random_supernet(args.shape, device)
    n_layers, dtype = probe.config.num_layers, probe.model.embed_tokens.weight.dtype
    del probe
    release(device)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    names = placements(n_layers)
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            raise SystemExit(f"unknown placement(s) {sorted(unknown)}; choose from {sorted(names)}")
        names = {k: v for k, v in names.items() if k in args.only or k == "all-FA"}  # all-FA: the reference
    print(
        f"{device_name(device)}, {args.shape} ({n_layers} layers, {dtype}), bandwidth {args.bandwidth / 1e12:.2f} TB/s"
    )
    rows = []
    for name, letters in names.items():
        torch.manual_seed(0)
        model = random_supernet(args.shape, device, context=max(args.contexts) + args.steps + 8).thin_([letters])
        release(device)
        bench = Bench(model, letters, args)
        for context in args.contexts:
            for kind in ("batch1", "max"):
                batch = 1 if kind == "batch1" else bench.largest_batch(context)
                if batch == 0:
                    print(f"  {name:<18} ctx {context:>6}: not even one row fits")
                    break
                try:
                    step = bench.decode(batch, context)
                except torch.OutOfMemoryError:
                    print(f"  {name:<18} ctx {context:>6} batch {batch}: out of memory (activations), skipped")
                    release(device)
                    continue
                moved = batch_bytes_per_step(model, [letters] * batch, context=context, dtype_bytes=dtype_bytes)
                row = {"placement": name, "letters": letters, "context": context, "kind": kind, "batch": batch}
                row |= {"step_ms": 1e3 * step, "tokens_per_s": batch / step, "bytes_per_step": moved}
                row["roofline_ms"] = 1e3 * moved / args.bandwidth
                row["of_roofline"] = row["roofline_ms"] / row["step_ms"]
                rows.append(row)
                print(
                    f"  {name:<18} ctx {context:>6} batch {batch:>5}: {row['step_ms']:8.2f} ms/step "
                    f"{row['tokens_per_s']:10.1f} tok/s  roofline {row['roofline_ms']:7.2f} ms "
                    f"({100 * row['of_roofline']:.0f}%)",
                    flush=True,
                )
            if not args.no_prefill:
                try:
                    seconds = bench.prefill(context)
                except torch.OutOfMemoryError:
                    print(f"  {name:<18} ctx {context:>6}: prefill out of memory, skipped")
                    release(device)
                    continue
                flops = pass_flops(model, letters, [context], backward=False).forward
                rows.append(
                    {"placement": name, "letters": letters, "context": context, "kind": "prefill", "batch": 1,
                     "seconds": seconds, "tokens_per_s": context / seconds, "forward_flops": flops}
                )  # fmt: skip
                print(f"  {name:<18} ctx {context:>6} prefill: {context / seconds:10.0f} tok/s", flush=True)
        del model, bench
        release(device)
    add_speedups(rows)
    return {"device": device_name(device), "shape": args.shape, "dtype": str(dtype), "bandwidth": args.bandwidth,
            "steps": args.steps, "rows": rows}  # fmt: skip


def add_speedups(rows: list[dict]) -> None:
    """Each row's tokens/s over all-FA's of the same context and kind; prefill rows also get the speed-up their
    FLOPs predict; paper presets carry the paper's vLLM speed-ups (32k, 16k)."""
    base = {(r["context"], r["kind"]): r for r in rows if r["placement"] == "all-FA"}
    for r in rows:
        ref = base.get((r["context"], r["kind"]))
        if ref is not None:
            r["speedup_vs_FA"] = r["tokens_per_s"] / ref["tokens_per_s"]
            if r["kind"] == "prefill":
                r["flops_speedup_vs_FA"] = ref["forward_flops"] / r["forward_flops"]
        if r["placement"] in PAPER_PRESETS:
            r["paper_speedup_32k"], r["paper_speedup_16k"] = PAPER_PRESETS[r["placement"]][1:]


def table(result: dict) -> str:
    """Markdown: per context and placement, batch 1 and largest-batch decode (% of roofline) and prefill."""
    rows = result["rows"]
    out = ["| context | placement | batch 1: tok/s (% roofline) | largest batch: rows, tok/s (% roofline), speed-up "
           "| prefill tok/s, speed-up (FLOPs say) |", "|---|---|---|---|---|"]  # fmt: skip
    for context in sorted({r["context"] for r in rows}):
        for name in dict.fromkeys(r["placement"] for r in rows):
            got = {r["kind"]: r for r in rows if r["context"] == context and r["placement"] == name}
            if not got:
                continue
            b1, mx, pf = got.get("batch1"), got.get("max"), got.get("prefill")
            cell1 = f"{b1['tokens_per_s']:.1f} ({100 * b1['of_roofline']:.0f}%)" if b1 else "-"
            cellm = (
                f"{mx['batch']}, {mx['tokens_per_s']:.0f} ({100 * mx['of_roofline']:.0f}%), "
                f"{mx.get('speedup_vs_FA', float('nan')):.2f}x"
                if mx
                else "-"
            )
            cellp = (
                f"{pf['tokens_per_s']:.0f}, {pf.get('speedup_vs_FA', float('nan')):.2f}x "
                f"({pf.get('flops_speedup_vs_FA', float('nan')):.2f}x)"
                if pf
                else "-"
            )
            label = name.replace("|", "\\|")  # paper names hold a pipe
            out.append(f"| {context} | {label} | {cell1} | {cellm} | {cellp} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "apriel-15b"], default="apriel-15b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per figure")
    ap.add_argument("--batch-limit", type=int, default=2048, help="the largest-batch search stops here")
    ap.add_argument(
        "--state-mb",
        type=float,
        help="MiB for decoding state (default: the engine's own budget, 85%% of free memory on CUDA)",
    )
    ap.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="HBM bytes/s for the roofline")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--only", nargs="+", help="a subset of the placements (all-FA, the reference, always runs)")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    if args.device == "cpu" and args.state_mb is None:
        ap.error("on the CPU the engine has no state budget: give --state-mb (the largest batch is searched in it)")
    result = run(args)
    print(table(result))
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
