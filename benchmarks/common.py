"""Shared helpers of the benchmark scripts: timing, random supernets, freeing memory, result files."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gearshift.timing import device_name  # noqa: E402, F401 - re-exported for the scripts
from gearshift.timing import median_seconds as time_it  # noqa: E402, F401 - re-exported for the scripts


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock timer sees it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_supernet(shape: str, device, context: int | None = None):
    """A random supernet of a named shape ("apriel-15b" or "tiny": 8 layers, window 16) on ``device``, in bf16 on
    CUDA and fp32 on CPU, for inference benchmarks; ``context`` raises its position limit (the 15B shape's is 64k;
    rotary positions extend, and random weights do not care)."""
    import dataclasses

    import torch

    from gearshift.config import SupernetConfig
    from gearshift.model import Supernet

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = SupernetConfig.apriel_15b() if shape == "apriel-15b" else SupernetConfig.tiny(num_layers=8, window=16)
    if context is not None and context > cfg.max_position_embeddings:
        cfg = dataclasses.replace(cfg, max_position_embeddings=context)
    return Supernet.random(cfg, device=device, dtype=dtype).eval()


def release(device) -> None:
    """Free what the last model or engine held (Python objects, then torch's cached CUDA blocks) before the next
    one sizes itself to the free memory."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": date.today().isoformat(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2))


def profile_cuda(fn, top: int = 15) -> dict:
    """Run ``fn()`` once under the profiler: wall ms, total kernel ms (a wall far above it means the GPU
    waits for the host: launches, syncs), the top kernels by device time and the top host ops by self time."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync("cuda" if cuda else "cpu")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        fn()
        sync("cuda" if cuda else "cpu")
        wall = time.perf_counter() - t0
    stats = prof.key_averages()
    kernels = sorted((e for e in stats if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    host = sorted((e for e in stats if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    result = {
        "wall_ms": wall * 1e3,
        "kernels_ms": sum(e.device_time_total for e in kernels) / 1e3,
        "kernel_launches": sum(e.count for e in kernels),
        "top_kernels": [
            {"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3} for e in kernels[:top]
        ],
        "top_host_ops": [
            {"op": e.key[:80], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in host[:top]
        ],
    }
    print(
        f"profile: wall {result['wall_ms']:.1f} ms, kernels {result['kernels_ms']:.1f} ms, "
        f"{result['kernel_launches']} launches",
        flush=True,
    )
    for row in result["top_kernels"]:
        print(f"  {row['ms']:9.2f} ms {row['calls']:6d}x  {row['kernel']}", flush=True)
    for row in result["top_host_ops"]:
        print(f"  host {row['self_ms']:9.2f} ms {row['calls']:6d}x  {row['op']}", flush=True)
    return result
