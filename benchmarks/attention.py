"""Fused attention (csrc/flash_attn.cu) vs torch SDPA's flash backend, on a GPU.

For each (seq, head dim): forward and forward+backward TFLOP/s of both, the ratio, and each one's
fraction of the measured dense bf16 matmul ceiling (an 8192^3 bf16 matmul on this device, ~798 TFLOP/s
on an H100). Causal FLOPs count the visible half: forward 2 * 2 * B * H * T^2 * D / 2, backward 2.5x
forward. Batch x heads fill the chip (tokens per step held near 128k). Median of CUDA-event-timed
repeats after warm-up, fresh random inputs (never zeros).

    python benchmarks/attention.py [--dtype bf16] [--seqs 1024,2048,4096,8192,16384] [--dims 64,128]

Target (issue #9): forward+backward >= 0.8x SDPA. Needs CUDA; says so and exits otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch  # noqa: E402

from benchmarks.gpu_timing import cuda_time  # noqa: E402


def _time(fn, repeats: int = 20, warmup: int = 5) -> float:
    return cuda_time(fn, repeats, warmup)


def _matmul_ceiling(dtype) -> float:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=131072, help="batch * seq per step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA device; none here")
        sys.exit(2)
    from moetrain.parallel.fused_attention import load

    if load() is None:
        sys.exit("the attention kernel did not build (see the log above)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    ceiling = _matmul_ceiling(dtype)
    print(f"device: {torch.cuda.get_device_name()}, {args.dtype}, matmul ceiling {ceiling:.0f} TFLOP/s, causal")
    print("| seq | D | B x H | fused fwd | SDPA fwd | fused fwd+bwd | SDPA fwd+bwd | ratio fwd+bwd | "
          "fused / ceiling | SDPA / ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for D in map(int, args.dims.split(",")):
        for T in map(int, args.seqs.split(",")):
            B = max(1, args.tokens // T)
            t_ff, t_sf, t_fb, t_sb = _case(B, args.heads, args.kv_heads, T, D, dtype)
            flops_f = 4 * B * args.heads * T * T * D / 2
            tf = [flops_f / t / 1e12 for t in (t_ff, t_sf)] + [3.5 * flops_f / t / 1e12 for t in (t_fb, t_sb)]
            print(f"| {T} | {D} | {B}x{args.heads} | {tf[0]:.0f} | {tf[1]:.0f} | {tf[2]:.0f} | {tf[3]:.0f} | "
                  f"{tf[2] / tf[3]:.2f} | {tf[2] / ceiling:.0%} | {tf[3] / ceiling:.0%} |", flush=True)
            torch.cuda.empty_cache()


def _case(B: int, H: int, Hkv: int, T: int, D: int, dtype) -> tuple[float, float, float, float]:
    """Median seconds: fused forward, SDPA (flash) forward, fused forward+backward, SDPA forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moetrain.parallel.fused_attention import _FlashAttention

    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
    d_o = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    rep = H // Hkv

    def fused_fwd():
        return _FlashAttention.apply(q, k, v, True)

    def sdpa_fwd():  # the peer at its best: SDPA's own GQA (no repeated k / v), flash backend
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)

    def both(fwd):
        def run():
            q.grad = k.grad = v.grad = None
            fwd().backward(d_o)
        return run

    with torch.no_grad():
        t_ff, t_sf = _time(fused_fwd), _time(sdpa_fwd)
    return t_ff, t_sf, _time(both(fused_fwd)), _time(both(sdpa_fwd))

if __name__ == "__main__":
    main()
