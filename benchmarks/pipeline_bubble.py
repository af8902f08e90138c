"""Pipeline bubble: measured idle fraction of each schedule against the theory.

Every pipeline rank is a gloo process running moetrain's real pipeline runtime (``PipelineRunner``:
the schedules, p2p transfers, deferred weight gradients) on a calibrated busy layer whose forward,
input-gradient and weight-gradient passes take a set time (``unit`` each: F = B = W, so a whole
backward is 2 units). The busy layer sleeps instead of spinning, so p ranks on a 2-core machine do
not compete for cores and the measured idle time is the schedule's, not the scheduler's. With
``vpp`` chunks per rank each chunk takes ``1/vpp`` of the stage's time, so every schedule does the
same work per rank.

Idle fraction of a rank = 1 - (its busy time) / (step wall time, barrier to the last rank's end),
averaged over ranks and over ``--steps`` steps (median of per-step values). Theory: (p-1)/(m+p-1)
for gpipe and 1F1B, (p-1)/(v*m+p-1) interleaved, (p-1)/(3m+p-1) for ZB-H1 with F = B = W.

    python benchmarks/pipeline_bubble.py [--unit-ms 20] [--steps 3] [--pp 2 4] [--micro 4 8 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

SHAPE = (8, 2, 16)  # the activation passed between stages: [s, b, d]


def _stage(p: int, m: int, schedule: str, vpp: int, unit: float, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from moetrain.parallel.pipeline import PipelineRunner
    from moetrain.parallel.weight_grad import weight_grad

    busy = [0.0]

    def work(seconds: float) -> None:
        t0 = time.perf_counter()
        time.sleep(seconds)
        busy[0] += time.perf_counter() - t0

    class Busy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, t):
            work(t)
            ctx.save_for_backward(x, w)
            ctx.param, ctx.t = w, t
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            work(ctx.t)

            def wgrad():
                work(ctx.t)
                return (g * x).sum().reshape(1)

            return g * w, weight_grad(ctx.param, wgrad), None

    rank = dist.get_rank()
    weights = [torch.nn.Parameter(torch.ones(1)) for _ in range(vpp)]
    runner = PipelineRunner(group=dist.group.WORLD, ranks=list(range(p)), stage=rank, vpp=vpp, schedule=schedule,
                            act_shape=SHAPE, act_dtype=torch.float32, device=torch.device("cpu"))
    last = p * vpp - 1

    def forward(c: int, mb: int, inputs):
        x = torch.ones(SHAPE) if inputs is None else inputs
        out = Busy.apply(x, weights[c], unit / vpp)
        return out.sum() if c * p + rank == last else out

    fractions, walls = [], []
    for _ in range(steps + 1):  # the first step warms up
        dist.barrier()
        busy[0] = 0.0
        t0 = time.perf_counter()
        runner.run(m, forward)
        mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        wall = float(mine)
        idle = torch.tensor([1.0 - busy[0] / wall], dtype=torch.float64)
        dist.all_reduce(idle)
        fractions.append(float(idle) / p)
        walls.append(wall)
    return {"idle": statistics.median(fractions[1:]), "wall": statistics.median(walls[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unit-ms", type=float, default=20.0, help="time of one F (= one B = one W) pass")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--vpp", type=int, default=2, help="chunks per rank for the interleaved schedule")
    args = ap.parse_args()

    from moetrain.launch.local import LocalRanks
    from moetrain.parallel.schedules import build_schedule, simulate, theoretical_bubble

    unit = args.unit_ms / 1000.0
    print(f"# pipeline bubble, unit {args.unit_ms:g} ms (F = B = W), median of {args.steps} steps; "
          f"{platform.node()}, {os.cpu_count()} cores")
    print("| p | m | schedule | measured idle | theory | schedule simulated | step s |")
    print("|---|---|---|---|---|---|---|")
    for p in args.pp:
        with LocalRanks(p, timeout=600, threads=1) as pool:
            for m in args.micro:
                for name in ("gpipe", "1f1b", "interleaved", "zero_bubble"):
                    v = args.vpp if name == "interleaved" else 1
                    if name == "interleaved" and m % p:
                        continue
                    got = pool.run(_stage, p, m, name, v, unit, args.steps)[0]
                    split = name == "zero_bubble"
                    sim = simulate(build_schedule(name, p, m, v), v, split_backward=split,
                                   cost={"F": 1.0 / v, "B": (1.0 if split else 2.0) / v, "W": 1.0 / v})
                    label = f"interleaved (v={v})" if name == "interleaved" else name
                    print(f"| {p} | {m} | {label} | {got['idle']:.3f} | {theoretical_bubble(name, p, m, v):.3f} "
                          f"| {sim.bubble():.3f} | {got['wall']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
