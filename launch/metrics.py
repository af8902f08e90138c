"""Throughput and efficiency figures: peak FLOP/s, peak memory, saved activations.

Model FLOPs per token come from the model spec (``ModelSpec.facts().flops_per_token``, convention in
moetrain/models/spec.py). MFU = achieved model FLOP/s / peak FLOP/s, where the peak on CPU is a matmul
rate measured on each rank at start-up (all ranks at once, so it reflects the cores they share), and on
CUDA the vendor's dense bf16/fp32 rate.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

__all__ = ["measure_matmul_flops", "peak_memory_bytes", "device_peak_flops", "peak_flops_per_rank", "SavedBytes"]


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 384, reps: int = 8,
                         device: str = "cpu") -> float:
    """FLOP/s of an n x n x n matmul on this rank's threads (median of ``reps``)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / max(times[len(times) // 2], 1e-9)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak for known GPUs (vendor figures); None when unknown (the caller measures instead)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}
    for key, (bf16, fp32) in table.items():
        if key in name:
            return bf16 if dtype in (torch.bfloat16, torch.float16) else fp32
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_flops_per_rank(device: torch.device, dtype: torch.dtype, matmul_dtype: torch.dtype) -> float:
    """The MFU denominator: the vendor figure for known GPUs, else a matmul rate measured by every rank at
    once (collective), so each sees its share of the cores it competes for."""
    known = device_peak_flops(device, dtype)
    if known:
        return known
    dist.barrier()
    rate = torch.tensor([measure_matmul_flops(matmul_dtype, n=512, device=str(device))], dtype=torch.float64)
    dist.all_reduce(rate)
    return float(rate.item()) / dist.get_world_size()


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside this context (one micro-batch's
    activations): storages counted once, parameters excluded."""

    def __init__(self, params):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[int] = set()
        self.nbytes = 0

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self._seen and ptr not in self._param_ptrs:
            self._seen.add(ptr)
            self.nbytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
