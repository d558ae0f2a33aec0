"""Shared helpers of the benchmark scripts: timing, synthetic caches, result files."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gearshift.cache import FullKVCache, RecurrentCache, SupernetCache, WindowKVCache  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, iters: int = 10, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def synthetic_cache(model, placement, batch: int, context: int, extra: int, dtype: torch.dtype) -> SupernetCache:
    """A cache as if ``context`` tokens had been processed, filled with random state (decode speed does not
    depend on the values; prefilling big batches at 32k would take minutes of device time)."""
    device = model.device
    cache = model.new_cache(batch, placement)
    for i, (block, name) in enumerate(zip(model.blocks, cache.placement, strict=True)):
        mixer = block.mixer.mixers[name]
        layer = cache.layers[i]
        if isinstance(layer, FullKVCache):
            c = mixer.cfg
            layer.k = torch.randn(batch, c.head_groups, context + extra, c.head_size, device=device, dtype=dtype)
            layer.v = torch.randn_like(layer.k)
        elif isinstance(layer, WindowKVCache):
            c = mixer.cfg
            layer.k = torch.randn(batch, c.head_groups, layer.capacity, c.head_size, device=device, dtype=dtype)
            layer.v = torch.randn_like(layer.k)
            held = torch.arange(max(0, context - layer.capacity), context, device=device)
            layer.index = torch.full((layer.capacity,), -1, dtype=torch.long, device=device)
            layer.index[held % layer.capacity] = held
        elif isinstance(layer, RecurrentCache):
            kind = mixer.kind
            c = mixer.cfg
            if kind == "gdn":
                heads, dk, dv = c.value_heads, c.key_head_dim, c.value_head_dim
                convs = [2 * mixer.key_dim + mixer.value_dim]
            else:
                heads, dk, dv = c.heads, c.head_dim, c.head_dim
                convs = [c.heads * c.head_dim] * 3
            layer.state = 0.01 * torch.randn(batch, heads, dk, dv, device=device)
            layer.conv = [torch.randn(batch, c.conv_kernel - 1, n, device=device, dtype=dtype) for n in convs]
        layer.length = context
    cache.length = context
    return cache


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": date.today().isoformat(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2))
