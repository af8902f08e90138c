"""Routing and packing kernels (csrc/moe_kernels.cu) vs the torch op sequences they replace, on a GPU.

For each case: median time over CUDA-event-timed repeats after warm-up (fresh random inputs, never
zeros), achieved GB/s (bytes read + written) against the device's measured copy bandwidth
(a device-to-device ``copy_`` of 1 GiB), and the speed-up over torch.

    python benchmarks/kernels.py [--tokens 16384] [--experts 64] [--topk 8] [--hidden 4096]

Targets (issue #8): packing >= 70% of copy bandwidth; routing >= 3x the torch sequence at
16k tokens x 64 experts x top-8. Needs CUDA; says so and exits otherwise.
"""

from __future__ import annotations

import argparse

import torch  # noqa: E402

from benchmarks.gpu_timing import cuda_time  # noqa: E402


def _time(fn, repeats: int = 50, warmup: int = 10) -> float:
    return cuda_time(fn, repeats, warmup)


def _copy_bandwidth() -> float:
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), repeats=20)


def _torch_routing(logits, k, E):
    prob = logits.float().softmax(-1)
    top_p, top_e = prob.topk(k, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    flat = top_e.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    onehot = torch.nn.functional.one_hot(flat, E)
    rank = (onehot.cumsum(0) - onehot).gather(1, flat.unsqueeze(1))
    return gates, counts, rank, prob.sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device; none here")
        return
    from moetrain.moe.kernels import load, positions_ref

    ext = load()
    if ext is None:
        print("the kernels did not build; see the warning above")
        return
    T, E, K, D = a.tokens, a.experts, a.topk, a.hidden
    copy_bw = _copy_bandwidth()
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

    def kernel_routing():
        e, g, ps = ext.route_topk(logits, None, K, False, True)
        ext.rank_in_expert(e, None, E, 0)

    t_torch = _time(lambda: _torch_routing(logits, K, E))
    t_kern = _time(kernel_routing)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    print("| kernel | torch ms | kernel ms | speed-up | kernel GB/s | % of copy |")
    print("|---|---|---|---|---|---|")
    nbytes = T * E * 2 + T * K * (4 + 4 + 4)
    print(f"| routing T={T} E={E} k={K} | {t_torch * 1e3:.3f} | {t_kern * 1e3:.3f} | {t_torch / t_kern:.2f}x | "
          f"{nbytes / t_kern / 1e9:.0f} | {nbytes / t_kern / copy_bw:.0%} |")
    e, g, _ = ext.route_topk(logits, None, K, False, True)
    pos, counts = positions_ref(e, None, E)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    rows = int(counts.sum())
    token = torch.arange(T, device="cuda").repeat_interleave(K)
    perm = torch.argsort(e.reshape(-1).long(), stable=True)

    rows_of = token[perm]  # the peer at its best: one gather of the packed order, as a user writes it
    t_torch = _time(lambda: x[rows_of])
    t_kern = _time(lambda: ext.pack_rows(x, pos, rows))
    nbytes = 2 * T * K * D * 2
    print(f"| pack T={T} k={K} D={D} | {t_torch * 1e3:.3f} | {t_kern * 1e3:.3f} | {t_torch / t_kern:.2f}x | "
          f"{nbytes / t_kern / 1e9:.0f} | {nbytes / t_kern / copy_bw:.0%} |")
    packed = ext.pack_rows(x, pos, rows)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device="cuda")

    def torch_combine():
        y = packed.index_select(0, inv) * g.reshape(-1, 1).to(packed.dtype)
        return torch.zeros(T, D, device="cuda", dtype=packed.dtype).index_add_(0, token, y)

    t_torch = _time(torch_combine)
    t_kern = _time(lambda: ext.combine_rows(packed, pos, g))
    nbytes = (T * K * D + T * D) * 2
    print(f"| combine T={T} k={K} D={D} | {t_torch * 1e3:.3f} | {t_kern * 1e3:.3f} | {t_torch / t_kern:.2f}x | "
          f"{nbytes / t_kern / 1e9:.0f} | {nbytes / t_kern / copy_bw:.0%} |")
    _layer_rows(T, E, K, D)


def _layer_rows(T: int, E: int, K: int, D: int) -> None:
    """The whole MoE layer (one rank, bf16), forward + backward: torch stages vs the fused kernel stages."""
    from moetrain.config import MoEConfig
    from moetrain.moe.layer import MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    times = {}
    for kern in ("torch", "fused"):
        args = MoEConfig(num_experts=E, topk=K, d_expert=D // 4, router="topk", aux_loss_coef=0.0)
        layer = MoELayer(args, 0, MoEGroups(), d_model=D, sp=False, dtype=torch.bfloat16,
                         runtime=MoERuntime(fused=kern == "fused")).cuda()
        x = torch.randn(T // 4, 4, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def step(layer=layer, x=x):
            layer(x).sum().backward()

        times[kern] = _time(step, repeats=20, warmup=5)
    print(f"| MoE layer fwd+bwd T={T} E={E} k={K} D={D} | {times['torch'] * 1e3:.3f} | {times['fused'] * 1e3:.3f} | "
          f"{times['torch'] / times['fused']:.2f}x | | |")


if __name__ == "__main__":
    main()
