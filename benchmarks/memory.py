"""Per-rank memory at ZeRO stage 0 / 1 / 2 (and offload) on 8 simulated CPU ranks, and the largest
model that fits this machine at each stage.

For each stage: the trainer's memory report (parameters, gradients kept between steps, optimizer
state, one micro-batch's saved activations; max over ranks) and each rank's measured peak resident
memory growth over two training steps (``ru_maxrss`` after minus before building the trainer; max
over ranks). The peak growth divided by the rank's parameter count gives bytes per parameter at
this layout, from which the largest model fitting ``--budget-gib`` over all 8 ranks follows
(after each rank's fixed start-up memory, measured before the model exists).

    python benchmarks/memory.py [--d-model 512] [--layers 4] [--experts 8] [--budget-gib 24]
"""

from __future__ import annotations

import argparse
import os
import platform


def _rank(overrides: list[str]) -> dict:
    import resource

    import torch.distributed as dist

    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    summary = trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in trainer.params)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"base": base, "growth": peak - base, "params": n_params})
    return {"memory": summary["memory"], "ranks": every, "loss": summary["losses"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--stages", default="0,1,2,2cpu", help="comma list of ZeRO stages; 'cpu' suffix = offload")
    a = ap.parse_args()
    from moetrain.launch.local import LocalRanks

    d = a.d_model
    common = [f"model.layers={a.layers}", f"model.d_model={d}", f"model.heads={d // 64}", f"model.d_ffn={4 * d}",
              "model.vocab_size=8192", "model.seq_len=64", f"moe.num_experts={a.experts}", "moe.every=1",
              f"moe.d_expert={2 * d}", "train.steps=2", "train.micro_batch_size=1", "train.global_batch_size=8",
              "train.dtype=float32", "data.source=synthetic", "logging.every=1000", "cluster.nodes=2",
              "cluster.ranks_per_node=4", "parallel.tp=1", f"parallel.ep={a.ep}"]
    rows = []
    for item in a.stages.split(","):
        stage, offload = int(item[0]), ("cpu" if item.endswith("cpu") else "none")
        with LocalRanks(8, ranks_per_node=4, timeout=1800) as pool:  # fresh processes: ru_maxrss is a lifetime peak
            out = pool.run(_rank, common + [f"train.optimizer.zero_stage={stage}",
                                            f"train.optimizer.offload={offload}"])[0]
        rows.append((stage, offload, out))
    gib = 2**30
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch CPU; "
          f"8 ranks (2 simulated nodes x 4), tp=1 dp=8 ep={a.ep} (experts' edp={8 // a.ep}), float32")
    total = rows[0][2]["ranks"]
    print(f"model: {a.layers} layers, d_model={d}, {a.experts} experts of d_expert={2 * d} per layer; "
          f"{max(r['params'] for r in total) / 1e6:.1f}M parameters on the largest rank")
    print("bytes/param: all ranks' peak growth / the model's parameters; largest model: this shape family "
          "scaled until the 8 ranks' growth fills the budget (an extrapolation, not a run)")
    print("| ZeRO | offload | params MiB | grads kept MiB | optimizer MiB | activations MiB | peak growth MiB "
          "| bytes/param (all ranks) | largest model (B params) |")
    print("|---|---|---|---|---|---|---|---|---|")
    from moetrain.config import load_config
    from moetrain.models.spec import get_model_spec

    cfg = load_config(None, common)
    logical = get_model_spec(cfg).facts().total_params
    for stage, offload, out in rows:
        m = out["memory"]["max"]
        grown = sum(r["growth"] for r in out["ranks"])
        base = max(r["base"] for r in out["ranks"])
        # memory grows with the model at a fixed layout: scale this model until all ranks fill the budget
        fit = (a.budget_gib * gib - 8 * base) / grown * logical
        print(f"| {stage} | {offload} | {m['params'] / 2**20:.1f} | {m['grads'] / 2**20:.1f} | "
              f"{m['optimizer'] / 2**20:.1f} | {m['activations'] / 2**20:.1f} | "
              f"{max(r['growth'] for r in out['ranks']) / 2**20:.0f} | {grown / logical:.1f} | {fit / 1e9:.2f} |")
    print(f"start-up memory per rank before the model (torch, gloo): {base / 2**20:.0f} MiB; "
          f"budget {a.budget_gib} GiB for all 8 ranks")


if __name__ == "__main__":
    main()
