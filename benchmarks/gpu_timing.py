"""CUDA-event timing shared by the GPU benchmarks: median seconds after warm-up."""

from __future__ import annotations

import statistics

import torch


def cuda_time(fn, repeats: int = 50, warmup: int = 10) -> float:
    """Median wall time of ``fn()`` on the current stream, in seconds (CUDA events, after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)
