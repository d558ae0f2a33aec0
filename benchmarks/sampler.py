"""Top-p sampling over a 49k vocabulary on a GPU: the radix-threshold nucleus vs a full sort, checked and timed.

For batches of random logits (rows from flat to peaked), per method: microseconds per ``sample_next`` call
(temperature 0.7, top-p 0.95 -- the trace setting of serve_smollm2.py), whether the call ran without a host
sync (``torch.cuda.set_sync_debug_mode("error")``), and the fraction of rows whose nucleus equals the one an fp64
cumulative sum over the sorted fp32 probabilities keeps (computed on the CPU).
Methods: ``sort`` (filter_logits: sort, cumulative sum, scatter; then a multinomial draw), ``radix`` (sample_next
with its element-wise chains eager) and ``radix_fused`` (sample_next as the engine runs it on CUDA: compiled).

    python benchmarks/sampler.py --out benchmarks/results/sampler.json
"""

from __future__ import annotations

import argparse

import torch

from gearshift.generation import filter_logits, nucleus_probs, sample_next
from gearshift.ops.fused import fusion

from common import device_name, write_json


def sort_sample(logits, temperature, top_p):
    return torch.multinomial(filter_logits(logits, temperature, 0, top_p).softmax(-1), 1).squeeze(-1)


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def sync_free(fn) -> bool:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 512])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/sampler.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels")
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    t, p = args.temperature, args.top_p
    for batch in args.batches:
        scale = torch.logspace(0, 1.2, batch)[:, None]  # from flat (wide nuclei) to peaked rows
        logits = (torch.randn(batch, args.vocab, generator=gen) * scale).to(device, torch.bfloat16)
        probs = (logits.float().cpu() / t).softmax(-1).double()
        ranked, order = probs.sort(-1, descending=True)
        want = torch.zeros(probs.shape, dtype=torch.bool).scatter(-1, order, ranked.cumsum(-1) - ranked < p)
        row = {"batch": batch, "vocab": args.vocab, "nucleus_sizes": [int(want.sum(-1).min()), int(want.sum(-1).max())]}
        for name, fused in (("sort", None), ("radix", False), ("radix_fused", True)):
            if fused is None:
                call = lambda: sort_sample(logits, t, p)  # noqa: E731
                kept = filter_logits(logits, t, 0, p).isfinite().cpu()
            else:
                call = lambda: sample_next(logits, t, 0, p)  # noqa: E731
                scalars = [torch.full((), v, device=device) for v in (t, p)]
                with fusion(fused), torch.no_grad():
                    kept = (nucleus_probs(logits, *scalars) > 0).cpu()
            with fusion(bool(fused)), torch.no_grad():
                row[f"{name}_us"] = timed(call, args.iters)
                row[f"{name}_sync_free"] = sync_free(call)
            row[f"{name}_rows_exact"] = float((kept == want).all(-1).float().mean())
        rows.append(row)
        print(
            f"batch {batch:>4}: sort {row['sort_us']:8.1f} us  radix {row['radix_us']:8.1f} us  "
            f"radix fused {row['radix_fused_us']:8.1f} us  sync-free {row['radix_fused_sync_free']}  "
            f"exact rows: sort {row['sort_rows_exact']:.3f} radix {row['radix_rows_exact']:.3f} "
            f"fused {row['radix_fused_rows_exact']:.3f}",
            flush=True,
        )
        write_json(args.out, {"device": device_name(device), "temperature": t, "top_p": p, "rows": rows})


if __name__ == "__main__":
    main()
