"""MoE layer forward+backward: moetrain vs DeepSpeed-MoE, side by side on the same ranks and shapes.

Both layers: GELU experts without bias (d -> d_ffn -> d), capacity factor 1.0 with positional drops
(DeepSpeed: top-1 without random token selection, top-2 without second-expert sampling, so both
route deterministically), fp32 gate, expert parallelism over every rank, gloo on CPU. Each timed
iteration is forward, a scalar loss and backward; the time is the slowest rank's, median over
iterations after warm-up, the two layers alternating iteration by iteration; also the CPU time the
process spends per iteration (busiest rank, all threads), which the machine's other load and the
other rank's skew do not inflate. The compute floor is
the expert FLOPs (forward + backward = 3 x 4*T*k*d*d_ffn per rank) over a matmul rate measured on each
rank in the same run.

    DS_ACCELERATOR=cpu python benchmarks/moe_layer.py [--ranks 2] [--tokens 256] [--iters 5]
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 [--kernels fused] [--tokens 4096]

``--device cuda`` is the single-GPU row (one rank, EP = 1, so no all-to-all on either side; DeepSpeed with
DS_ACCELERATOR=cuda); ``--dtype bfloat16`` casts the experts (both gates stay fp32) and the input.

``--compare-wgrad-overlap`` adds moetrain's layer with the expert weight-gradient overlap (weight gradients
computed while the dispatch all-to-all's backward is in flight, ``moe.overlap_wgrad``) set the other way
from its default (off on CPU, on on CUDA) as a third, interleaved layer, and prints both times.

``--dropless`` compares without capacity (DeepSpeed ``drop_tokens=False``, which pads every expert to the
largest expert's load; moetrain ``capacity_factor: null``, exact uneven splits) on one rank only:
DeepSpeed-MoE with drop_tokens=False aborts on CPU/gloo with EP=2 (its ranks disagree on the padded
capacity and the all-to-all sizes mismatch), see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

SHAPES = [  # (d_model, experts, top-k)
    (512, 8, 1), (512, 8, 2), (1024, 64, 1), (1024, 64, 2), (2048, 16, 1), (2048, 16, 2),
]


def _time_interleaved(steps: list[tuple], iters: int, warmup: int, sync=lambda: None) -> list[tuple[float, float]]:
    """(wall, CPU) median of each ``(fn, args)``, run alternately so machine drift hits all of them alike.

    Wall: the slowest rank's. CPU: the process's CPU time (all its threads, gloo's included) on the
    busiest rank, the work a layer costs whatever the other rank and the machine's neighbours are doing."""
    import torch
    import torch.distributed as dist

    times: list[list[float]] = [[] for _ in steps]
    cpus: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + iters):
        for j, (fn, args) in enumerate(steps):
            dist.barrier()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(*args)
            sync()
            t = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time, the busiest rank's CPU
            if i >= warmup:
                times[j].append(float(t[0]))
                cpus[j].append(float(t[1]))
    return [(statistics.median(t), statistics.median(c)) for t, c in zip(times, cpus)]


def _ds_step(layer, x):
    xi = x.detach().requires_grad_()
    out, aux, _ = layer(xi.transpose(0, 1))
    (out.pow(2).mean() + 0.01 * aux).backward()
    layer.zero_grad(set_to_none=True)


def _our_step(layer, x):
    xi = x.detach().requires_grad_()
    layer(xi).pow(2).mean().backward()
    layer.zero_grad(set_to_none=True)


def _expert_rows(ds, ours, x) -> tuple[int, int]:
    """Rows each layer's experts compute on the busiest rank, in one untimed step: DeepSpeed's padded
    capacity slots against moetrain's kept assignments (the wall time is that rank's)."""
    import torch
    import torch.distributed as dist

    rows = torch.zeros(2, dtype=torch.long)

    def hook(i):
        def count(module, inputs):
            rows[i] = inputs[0].numel() // inputs[0].shape[-1]
        return count

    handles = [ds.deepspeed_moe.experts.register_forward_pre_hook(hook(0)),
               ours.experts.register_forward_pre_hook(hook(1))]
    _ds_step(ds, x)
    _our_step(ours, x)
    for h in handles:
        h.remove()
    dist.all_reduce(rows, op=dist.ReduceOp.MAX)
    return int(rows[0]), int(rows[1])


def _bench(shapes, tokens: int, iters: int, warmup: int, device: str, dtype_name: str = "float32",
           kernels: str = "torch", dropless: bool = False, compare_overlap: bool = False) -> list[dict]:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE as DSMoE

    from moetrain.config import MoEConfig
    from moetrain.launch.metrics import measure_matmul_flops
    from moetrain.moe.layer import MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    rate_n = 4096 if cuda else 512
    rate = measure_matmul_flops(dtype, n=rate_n, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = []
    for d, E, k in shapes:
        f = d
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(d, f, bias=False), torch.nn.GELU(),
                                     torch.nn.Linear(f, d, bias=False))
        ds = DSMoE(hidden_size=d, expert=expert, num_experts=E, ep_size=world, k=k, capacity_factor=1.0,
                   eval_capacity_factor=1.0, min_capacity=1, drop_tokens=not dropless, use_rts=False,
                   top2_2nd_expert_sampling=False).to(device)
        ds.deepspeed_moe.experts.to(dtype)  # its gate keeps fp32, as ours does
        margs = MoEConfig(num_experts=E, topk=k, d_expert=f, router="topk" if k > 1 else "switch",
                          capacity_factor=None if dropless else 1.0, drop_policy="position", activation="gelu",
                          aux_loss_coef=0.01)
        groups = MoEGroups(ep=dist.group.WORLD if world > 1 else None)
        layer_kw = dict(d_model=d, sp=False, dtype=dtype, runtime=MoERuntime(fused=kernels == "fused"))
        ours = MoELayer(margs, 0, groups, **layer_kw).to(device)
        x = torch.randn(tokens // 8, 8, d, generator=torch.Generator().manual_seed(rank)).to(device, dtype)
        steps = [(_ds_step, (ds, x)), (_our_step, (ours, x))]
        if compare_overlap:  # the default is on for CUDA, off on CPU (moe.overlap_wgrad: auto)
            flipped = MoELayer(margs, 0, groups, **layer_kw).to(device)
            flipped.overlap_weight_grads = not cuda
            steps.append((_our_step, (flipped, x)))
        timed = _time_interleaved(steps, iters, warmup, sync)
        (t_ds, c_ds), (t_ours, c_ours) = timed[:2]
        rows = _expert_rows(ds, ours, x)
        flops = 3 * 4 * tokens * k * d * f
        results.append({"d": d, "E": E, "k": k, "ds_ms": t_ds * 1e3, "ours_ms": t_ours * 1e3,
                        "ds_cpu_ms": c_ds * 1e3, "ours_cpu_ms": c_ours * 1e3, "ds_rows": rows[0], "ours_rows": rows[1],
                        "floor_ms": flops / rate * 1e3, "rate_gflops": rate / 1e9, "rate_n": rate_n,
                        "flipped_ms": timed[2][0] * 1e3 if compare_overlap else None})
        del ds, ours
    return results if rank == 0 else []


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        d, e, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not DxExK (e.g. 512x8x1)") from None
    if min(d, e, k) < 1 or k > e:
        raise SystemExit(f"--shapes: {text!r} needs positive sizes and k <= experts")
    return d, e, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=None, help="gloo ranks (default 2 on CPU; cuda runs one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--kernels", choices=["torch", "fused"], default="torch",
                    help="moetrain's order/inverse-order stages (fused: the csrc kernels, CUDA only)")
    ap.add_argument("--dropless", action="store_true", help="no capacity limit (one rank only, see the docstring)")
    ap.add_argument("--compare-wgrad-overlap", action="store_true",
                    help="also time moetrain with the expert weight-gradient / all-to-all overlap set the other way")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes", default=None, help="comma-separated DxExK, e.g. 512x8x1,512x8x2 (default: all six)")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [_parse_shape(s) for s in args.shapes.split(",")]
    import importlib.util

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("benchmarks/moe_layer.py runs DeepSpeed-MoE beside moetrain's layer: install deepspeed "
                         "(a dependency of moetrain: pip install -e .)")
    ranks = args.ranks if args.ranks is not None else (1 if args.device == "cuda" else 2)
    if args.device == "cuda":
        if ranks != 1:
            raise SystemExit("--device cuda is the single-GPU row (EP = 1): leave --ranks out")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device on this machine")
    elif ranks < 1:
        raise SystemExit(f"--ranks must be at least 1, got {ranks}")
    if args.dropless and ranks != 1:
        raise SystemExit("--dropless needs --ranks 1: DeepSpeed-MoE without token drops aborts on gloo with "
                         "expert parallelism (its ranks pad to different capacities)")
    from moetrain.launch.local import LocalRanks

    with LocalRanks(ranks, timeout=3600, env={"DS_ACCELERATOR": args.device}) as pool:  # DeepSpeed's device
        res = pool.run(_bench, shapes, args.tokens, args.iters, args.warmup, args.device, args.dtype,
                       args.kernels, args.dropless, args.compare_wgrad_overlap)[0]
    where = (f"{torch.cuda.get_device_name()}, 1 rank (EP = 1)" if args.device == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} cores; {ranks} gloo ranks x 1 thread")
    print(f"machine: {where}; {args.dtype}; moetrain stages {args.kernels}; {args.tokens} tokens/rank; "
          f"expert parallel over all ranks; {'dropless' if args.dropless else 'capacity factor 1.0'}")
    print(f"{'d_model':>7} {'experts':>7} {'k':>2} {'DeepSpeed ms':>13} {'moetrain ms':>12} {'speedup':>8} "
          f"{'floor ms':>9} {'moetrain/floor':>15} {'CPU ms DS / ours':>17} {'CPU ratio':>10} {'rows DS / ours':>15}")
    for r in res:
        print(f"{r['d']:>7} {r['E']:>7} {r['k']:>2} {r['ds_ms']:>13.1f} {r['ours_ms']:>12.1f} "
              f"{r['ds_ms'] / r['ours_ms']:>7.2f}x {r['floor_ms']:>9.1f} {r['ours_ms'] / r['floor_ms']:>14.2f}x "
              f"{r['ds_cpu_ms']:>8.1f} / {r['ours_cpu_ms']:<6.1f} {r['ds_cpu_ms'] / r['ours_cpu_ms']:>9.2f}x "
              f"{r['ds_rows']:>8} / {r['ours_rows']:<6}")
    print("rows: expert rows on the busiest rank (DeepSpeed computes every capacity slot, moetrain the kept "
          "assignments); the layers' GEMM work is in that ratio")
    if args.compare_wgrad_overlap:
        for r in res:
            on, off = ((r["ours_ms"], r["flipped_ms"]) if args.device == "cuda" else (r["flipped_ms"], r["ours_ms"]))
            print(f"{r['d']}/{r['E']}/top-{r['k']}: moetrain with the weight-gradient overlap {on:.1f} ms, without "
                  f"{off:.1f} ms (without / with = {off / on:.3f})")
    print(f"matmul rate per rank ({res[0]['rate_n']}^3 {args.dtype}, measured): {res[0]['rate_gflops']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
