"""Throughput and efficiency figures: model FLOPs per token, measured matmul rate, peak memory.

FLOPs per token (PaLM / Megatron convention, forward + backward = 3x forward, no recomputation):

    flops_per_token = 6 * N_matmul + 12 * L * s * d

``N_matmul`` counts the weights every token multiplies with: attention projections, the dense MLP
or the top-k active experts plus the router, and the LM head (V*d); the embedding lookup is not a
matmul and is excluded. ``12*L*s*d`` is attention's QK^T and AV (full, not halved for causal).
MFU = achieved model FLOP/s / peak FLOP/s, where the peak on CPU is a matmul rate measured on each
rank at start-up (all ranks at once, so it reflects the cores they share), and on CUDA the
vendor's dense bf16/fp32 rate.
"""

from __future__ import annotations

import resource
import time

import torch

__all__ = ["flops_per_token", "matmul_param_count", "measure_matmul_flops", "peak_memory_bytes", "device_peak_flops"]


def matmul_param_count(layers: int, d_model: int, heads: int, kv_heads: int, d_ffn: int, vocab_size: int,
                       num_experts: int = 0, topk: int = 0, d_expert: int = 0, moe_every: int = 1) -> int:
    hd = d_model // heads
    attn = d_model * heads * hd + 2 * d_model * kv_heads * hd + heads * hd * d_model
    total = 0
    for layer in range(layers):
        if num_experts and (layer + 1) % moe_every == 0:
            total += attn + topk * 3 * d_model * d_expert + d_model * num_experts
        else:
            total += attn + 3 * d_model * d_ffn
    return total + vocab_size * d_model


def flops_per_token(n_matmul: int, layers: int, seq_len: int, d_model: int) -> float:
    return 6.0 * n_matmul + 12.0 * layers * seq_len * d_model


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
