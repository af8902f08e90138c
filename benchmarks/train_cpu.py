"""Main CPU job benchmark: tokens/s, MFU against the measured matmul rate, compute vs communication.

Runs the quick-start job (cluster_configs/sim_cpu_8rank.yaml: 8 simulated ranks, TP=2 x SP x DP=4) and,
side by side in the same invocation, the same model and global batch on one process using every
core (no parallelism, no communication). For the parallel run, rank 0 profiles the timed steps with
torch.profiler; communication time is the time the rank spends inside blocking c10d collectives
(TP all-gather / reduce-scatter / all-reduce, self time) plus waiting for the DP gradient buckets.
On a CPU with fewer cores than ranks that "communication" is mostly waiting for peers to be
scheduled: it is the real cost of the collectives on this machine, not network time.

    python benchmarks/train_cpu.py [--steps 30] [--warmup 5] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch  # noqa: E402

from moetrain.config import load_config  # noqa: E402
from moetrain.launch.local import LocalRanks  # noqa: E402
from moetrain.launch.metrics import measure_matmul_flops  # noqa: E402
from moetrain.models.spec import get_model_spec  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs",
                      "sim_cpu_8rank.yaml")


def _bench_rank(overrides: list[str], steps: int, warmup: int, profile: bool) -> dict:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(CONFIG, overrides + [f"train.steps={steps + warmup}"])
    trainer = Trainer(cfg, setup_groups(cfg))
    for _ in range(warmup):
        trainer.train_step()
    times = []
    prof = torch_profile(activities=[ProfilerActivity.CPU]) if profile and dist.get_rank() == 0 else None
    if prof:
        prof.__enter__()
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        out = trainer.train_step()
        times.append(time.perf_counter() - t0)
    comm = 0.0
    if prof:
        prof.__exit__(None, None, None)
        for e in prof.key_averages():
            if e.key.startswith("c10d::"):
                comm += e.self_cpu_time_total / 1e6
            elif e.key == "dp_grad_reduce":
                comm += e.cpu_time_total / 1e6
    return {"times": times, "loss": out["loss"], "comm_s": comm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(CONFIG, args.overrides)
    m = cfg.model
    fpt = get_model_spec(cfg).facts().flops_per_token
    tokens_per_step = cfg.global_batch_size * m.seq_len
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak = statistics.median(measure_matmul_flops(torch.float32, n=1024, reps=10) for _ in range(3))

    with LocalRanks(cfg.world_size, ranks_per_node=cfg.cluster.ranks_per_node, timeout=1800) as pool:
        par = pool.run(_bench_rank, list(args.overrides), args.steps, args.warmup, True)[0]
    serial_over = list(args.overrides) + ["cluster.nodes=1", "cluster.ranks_per_node=1", "parallel.tp=1",
                                          "parallel.sp=false", "parallel.ep=1"]
    with LocalRanks(1, threads=threads, timeout=1800) as pool:
        ser = pool.run(_bench_rank, serial_over, args.steps, args.warmup, False)[0]

    def figures(times: list[float]) -> dict:
        med = statistics.median(times)
        tps = tokens_per_step / med
        return {"step_s": med, "tokens_per_s": tps, "mfu": tps * fpt / peak}

    p, s = figures(par["times"]), figures(ser["times"])
    comm_per_step = par["comm_s"] / args.steps
    floor = tokens_per_step * fpt / peak
    result = {
        "machine": f"{platform.machine()}, {threads} cores, torch {torch.__version__}",
        "model_flops_per_token": fpt, "tokens_per_step": tokens_per_step,
        "matmul_peak_gflops": peak / 1e9, "compute_floor_step_s": floor,
        "parallel_8rank": {**p, "comm_s_per_step": comm_per_step, "compute_s_per_step": p["step_s"] - comm_per_step,
                           "comm_fraction": comm_per_step / p["step_s"]},
        "serial_1proc": s,
        "parallel_over_serial_throughput": p["tokens_per_s"] / s["tokens_per_s"],
    }
    print(json.dumps(result, indent=1))
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s ({threads} threads); model {fpt / 1e6:.2f} MFLOP/token; "
          f"compute floor {floor * 1e3:.0f} ms/step")
    print(f"{'run':<22}{'step ms':>9}{'tokens/s':>10}{'MFU':>7}{'comm ms':>9}{'comm %':>8}")
    print(f"{'8 ranks TP2xSPxDP4':<22}{p['step_s'] * 1e3:>9.0f}{p['tokens_per_s']:>10.0f}{p['mfu']:>7.1%}"
          f"{comm_per_step * 1e3:>9.0f}{comm_per_step / p['step_s']:>8.0%}")
    print(f"{'1 process, no comm':<22}{s['step_s'] * 1e3:>9.0f}{s['tokens_per_s']:>10.0f}{s['mfu']:>7.1%}"
          f"{'-':>9}{'-':>8}")
    print(f"parallel / serial throughput: {result['parallel_over_serial_throughput']:.2f}x")


if __name__ == "__main__":
    main()
