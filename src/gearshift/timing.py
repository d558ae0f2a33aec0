"""Timing a callable on CPU or GPU (warm-up, then the median of timed calls; CUDA events on GPU) and naming
the device the figures came from."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import numpy as np
import torch


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call (CUDA events on GPU, so only device time is counted)."""
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
    return float(np.median(times))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"
