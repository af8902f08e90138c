"""``moetrain plan --calibrate``: measure this machine and write a hardware file for the planner.

Measured with one thread per rank, as the local launcher runs its simulated ranks: GEMM rates by shape for
each dtype (a per-call cost and a rate fitted to 2mnk over sizes 64..1024, so ``gemm_efficiency`` is 1 and
``peak_tflops`` is the fitted rate), causal SDPA against that rate (``attention_efficiency``), copy bandwidth
(``hbm_gbps``), and gloo all-reduce latency and bandwidth between two local ranks over 127.0.0.1 (both link
classes: simulated nodes share the loopback). Device memory is this machine's RAM divided by its cores.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

__all__ = ["calibrate"]


def _median_time(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_fit(dtype) -> tuple[float, float]:
    """(seconds per call, FLOP/s) fitted over square-ish GEMMs."""
    import torch

    from moetrain.moe.perf_model import fit_alpha_beta

    flops, times = [], []
    for n in (64, 128, 256, 384, 512, 768, 1024):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times.append(_median_time(lambda a=a, b=b: a @ b, reps=3 if n >= 768 else 7))
        flops.append(2.0 * n ** 3)
    ab = fit_alpha_beta(flops, times)
    return ab.alpha, 1.0 / ab.beta if ab.beta > 0 else max(f / t for f, t in zip(flops, times))


def _allreduce() -> list[tuple[int, float]]:
    import torch
    import torch.distributed as dist

    out = []
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 21, 1 << 23):
        x = torch.ones(n // 4, dtype=torch.float32)
        dist.barrier()
        out.append((n, _median_time(lambda x=x: dist.all_reduce(x), reps=5)))
    return out


def calibrate(name: str = "this machine (calibrated)") -> str:
    """The hardware file's YAML text for this machine."""
    import torch
    import torch.nn.functional as F

    from moetrain.launch.local import LocalRanks
    from moetrain.moe.perf_model import fit_alpha_beta

    torch.set_num_threads(1)
    peaks, launch = {}, []
    for key, dtype in (("float32", torch.float32), ("float64", torch.float64), ("bfloat16", torch.bfloat16)):
        alpha, rate = _gemm_fit(dtype)
        peaks[key] = round(rate / 1e12, 6)
        launch.append(alpha)
    # causal SDPA: its rate on the causal half of 4 b s^2 h hd, against the float32 GEMM rate
    q = torch.randn(2, 4, 256, 64)
    t = _median_time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    attention_eff = (0.5 * 4 * 2 * 256 * 256 * 4 * 64 / t) / (peaks["float32"] * 1e12)
    big = torch.empty(256 * 2**20 // 4)
    dst = torch.empty_like(big)
    copy = _median_time(lambda: dst.copy_(big))
    hbm = 2 * big.numel() * 4 / copy / 1e9
    with LocalRanks(2, ranks_per_node=2, timeout=300) as pool:
        samples = pool.run(_allreduce)[0]
    # ring all-reduce over 2 ranks moves n bytes each way in 2 steps: t = 2 alpha + n / bw
    ab = fit_alpha_beta([n for n, _ in samples], [t for _, t in samples])
    latency_us = ab.alpha / 2 * 1e6
    bandwidth = 1.0 / ab.beta / 1e9 if ab.beta > 0 else 1.0
    cores = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    link = {"latency_us": round(latency_us, 3), "bandwidth_gbps": round(bandwidth, 4)}
    lines = [
        f"# Measured by `moetrain plan --calibrate` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.processor() or platform.machine()},",
        f"# {cores} cores, torch {torch.__version__}, one thread per rank (the local launcher's ranks).",
        f"name: {name}",
        f"device_memory_gib: {ram / cores / 2**30:.3f}   # RAM / cores",
        "reserved_gib: 0.35               # a rank's start-up memory (torch, gloo) before the model",
        f"devices_per_node: {cores}",
        "peak_tflops:                     # fitted GEMM rate (2mnk over 64..1024)",
    ] + [f"  {k}: {v}" for k, v in peaks.items()] + [
        "gemm_efficiency: 1.0             # the peak above is already the achieved rate",
        f"gemm_launch_us: {statistics.median(launch) * 1e6:.3f}   # fitted per-call cost",
        f"hbm_gbps: {hbm:.3f}              # 256 MiB copy, read + write",
        f"attention_efficiency: {attention_eff:.4f}   # causal SDPA [2,4,256,64] vs the float32 GEMM rate",
        "intra:                           # gloo all-reduce between 2 ranks over 127.0.0.1",
        f"  latency_us: {link['latency_us']}",
        f"  bandwidth_gbps: {link['bandwidth_gbps']}",
        "inter:                           # the same loopback (simulated nodes share it)",
        f"  latency_us: {link['latency_us']}",
        f"  bandwidth_gbps: {link['bandwidth_gbps']}",
        f"host_copy_gbps: {hbm:.3f}",
        f"host_adam_gparams_per_s: {hbm / 28:.4f}   # AdamW reads/writes ~28 bytes per float32 parameter",
        "source: measured",
    ]
    return "\n".join(lines) + "\n"
