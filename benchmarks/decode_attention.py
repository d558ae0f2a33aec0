"""Decode attention alone: the fused masked SDPA call (with and without cuDNN's kernels) vs split-KV, by number of
rows and context (15B shape by default, --heads for others).

One decode step's attention in one layer, [rows, 32 query heads, 1, 128] over [rows, 8 KV heads, context, 128]
in bf16 (``--queries``: more queries per row, as a speculative verify pass), with the boolean mask the engine
builds, replayed from a CUDA graph (the engine decodes from graphs, so launch gaps are not counted). Split-KV runs
with its softmax chain compiled (``split-N``, as in the engine's graphs) and plain (``split-N-plain``). Prints
microseconds, the KV bytes read per microsecond (GB/s) and the largest difference from the fused result; writes
JSON.

    python benchmarks/decode_attention.py --out benchmarks/results/decode_attention.json
    python benchmarks/decode_attention.py --device cpu --contexts 512 --rows 1 4 --chunks 64   # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from gearshift import envs
from gearshift.ops import attention as ops
from gearshift.ops.fused import fusion

from common import device_name, sync, time_it, write_json


def timed(fn, device: torch.device, reps: int) -> float:
    """Seconds per call: from a CUDA graph of ``reps`` calls on GPU (no launch gaps), the median on CPU."""
    if device.type != "cuda":
        return time_it(fn, device, reps, 1)
    fn()
    sync(device)
    stream = torch.cuda.Stream()  # warm-up on a side stream, as capture requires
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    sync(device)
    t0 = time.perf_counter()
    graph.replay()
    sync(device)
    return (time.perf_counter() - t0) / reps


def _fused(q, k, v, q_index, k_index, scale, cudnn: bool | None = None):
    """The engine's attention call with split-KV off: one masked SDPA call (cuDNN's kernels or not)."""
    with envs.override(SPLIT_KV=0), ops.cudnn_sdpa(cudnn):
        return ops.attend(q, k, v, q_index, k_index, None, None, scale)


def _split(q, k, v, mask, scale, chunk: int, fused_chain: bool):
    """Split-KV attention, its softmax chain compiled (as in the engine's graphs) or plain."""
    with fusion(fused_chain):
        return ops.split_kv_attention(q, k, v, mask, scale, chunk)


@torch.no_grad()  # inference, as in the engine: the compiled chains run only without gradients
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--chunks", type=int, nargs="*", default=[256, 512, 1024, 2048])
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("Q", "KV", "DIM"),
                    help="query heads, KV heads, head size (default: the 15B shape; SmolLM2: 9 3 64)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--queries", type=int, default=1, help="queries per row (a speculative verify pass: k + 1)")
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, d = args.heads
    scale = d**-0.5
    results = []
    for context in args.contexts:
        length = -(-(context + 16) // 256) * 256  # as the engine's pools: a little room, whole multiples of 256
        for rows in args.rows:
            gen = torch.Generator(device=device).manual_seed(rows)
            t = args.queries
            q = torch.randn(rows, heads, t, d, device=device, dtype=dtype, generator=gen)
            k = torch.randn(rows, kv_heads, length, d, device=device, dtype=dtype, generator=gen)
            v = torch.randn(rows, kv_heads, length, d, device=device, dtype=dtype, generator=gen)
            last = torch.randint(context - 64, context, (rows, 1), device=device, generator=gen)
            held = last - t + 1 + torch.arange(t, device=device)  # the queries' positions [rows, t]
            k_index = torch.arange(length, device=device)[None].expand(rows, -1)
            k_index = torch.where(k_index <= last, k_index, torch.full_like(k_index, -1))  # -1: empty positions
            mask = ops.attention_mask(held, k_index, None, None)
            methods = {"fused": lambda q=q, k=k, v=v, i=k_index, h=held: _fused(q, k, v, h, i, scale)}
            if device.type == "cuda":  # the same call with SDPA kept off cuDNN's kernels (GEARSHIFT_CUDNN_SDPA)
                methods["fused-no-cudnn"] = lambda q=q, k=k, v=v, i=k_index, h=held: _fused(q, k, v, h, i, scale, False)
            for chunk in args.chunks:
                for chain in ("fused", "plain") if device.type == "cuda" else ("plain",):
                    methods[f"split-{chunk}" + ("-plain" if chain == "plain" and device.type == "cuda" else "")] = (
                        lambda q=q, k=k, v=v, m=mask, c=chunk, f=chain == "fused": _split(q, k, v, m, scale, c, f)
                    )
            kv_bytes = 2 * k.numel() * k.element_size()
            reference = methods["fused"]()
            for name, fn in methods.items():
                seconds = timed(fn, device, args.reps)
                diff = float((fn().float() - reference.float()).abs().max())
                row = {"context": context, "rows": rows, "queries": t, "method": name, "us": seconds * 1e6}
                row |= {"kv_gb_per_s": kv_bytes / seconds / 1e9, "max_abs_diff": diff}
                results.append(row)
                print(
                    f"ctx {context:>6} rows {rows:>3} x{t} {name:<15} {row['us']:9.1f} us "
                    f"{row['kv_gb_per_s']:8.0f} GB/s  max|d| {diff:.1e}",
                    flush=True,
                )
            del q, k, v
    write_json(args.out, {"device": device_name(device), "dtype": str(dtype), "rows": results})


if __name__ == "__main__":
    main()
