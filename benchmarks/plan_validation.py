"""The planner against measurements: predicted vs measured step time here (1-2 ranks, with this machine's
calibration file), and predicted vs published GPU figures (spec-sheet hardware files, nothing fitted).

    python benchmarks/plan_validation.py [--hardware FILE] [--steps 8]

Without ``--hardware`` it first runs ``moetrain plan --calibrate`` into a temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

COMMON = ["model.vocab_size=512", "model.seq_len=128", "train.micro_batch_size=2", "train.warmup_steps=1",
          "data.source=synthetic", "logging.every=1000", "train.dtype=float32", "checkpoint.resume=never"]
RUNS = {
    "dense, 1 rank": ["model.layers=4", "model.d_model=256", "model.heads=4", "cluster.ranks_per_node=1",
                      "train.global_batch_size=4"],
    "MoE 8x top-2, 1 rank": ["model.layers=4", "model.d_model=256", "model.heads=4", "moe.num_experts=8",
                             "moe.topk=2", "moe.d_expert=512", "cluster.ranks_per_node=1", "train.global_batch_size=4"],
    "MoE, dp2 ep2": ["model.layers=4", "model.d_model=256", "model.heads=4", "moe.num_experts=8", "moe.topk=2",
                     "moe.d_expert=512", "cluster.ranks_per_node=2", "parallel.ep=2", "train.global_batch_size=8"],
    "dense, tp2": ["model.layers=4", "model.d_model=256", "model.heads=4", "cluster.ranks_per_node=2",
                   "parallel.tp=2", "train.global_batch_size=4"],
    "dense, pp2 1f1b": ["model.layers=4", "model.d_model=256", "model.heads=4", "cluster.ranks_per_node=2",
                        "parallel.pp=2", "train.global_batch_size=8"],
}


def measured_here(hw: str, steps: int, repeats: int) -> list[tuple[str, float, list[float]]]:
    """(run, predicted step, each repeat's median step), the runs interleaved repeat by repeat."""
    from moetrain import load_config
    from moetrain.launch.job import run_job

    predicted: dict[str, float] = {}
    measured: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, ov in RUNS.items():
                cfg = load_config(None, COMMON + ov + [f"train.steps={steps}", f"logging.plan_hardware={hw}",
                                                       f"logging.run_dir={tmp}/run"])
                plan = run_job(cfg, None)["plan"]
                predicted[name] = plan["predicted"]["step_time_s"]
                measured[name].append(plan["measured"]["step_time_s"])
    return [(name, predicted[name], measured[name]) for name in RUNS]


def published() -> list[tuple[str, str, float, float, str]]:
    """(case, quantity, predicted, published, source)."""
    from moetrain import load_config
    from moetrain.plan import load_hardware, make_plan
    from moetrain.plan.timing import moe_layer_time

    h100 = load_hardware("h100_sxm")
    gpu = ["cluster.launcher=env", "cluster.device=cuda", "train.dtype=bfloat16", "train.micro_batch_size=1"]
    mixtral = ["model.d_model=4096", "model.heads=32", "model.kv_heads=8", "model.d_ffn=14336", "model.seq_len=4096",
               "moe.num_experts=8", "moe.topk=2", "parallel.ep=8"]
    cfg = load_config(None, gpu + mixtral + ["cluster.nodes=1", "cluster.ranks_per_node=8"])
    layer = moe_layer_time(cfg, h100, 4096, "bfloat16")
    src = "Megatron-LM tests/functional_tests/test_cases/common/moe_perf baseline (H100, TP1 EP8, a2a, bf16)"
    rows = [("Mixtral-like MoE layer, 4096 tokens/rank", "forward ms", layer["fwd"] * 1e3, 4.33, src),
            ("Mixtral-like MoE layer, 4096 tokens/rank", "backward ms", layer["bwd"] * 1e3, 7.68, src)]
    # Mixtral 8x7B training on 64 H100: MCore v0.8 README's reference mapping (TP1 EP8 PP4 VP8, MBS1 GBS256,
    # seq 4096, vocab 32K); 468 TFLOP/s per GPU at MCore v0.9 = 5,872 tokens/s per GPU with Megatron's
    # FLOP formula (79.7 GFLOP/token): compared in tokens/s, so the FLOP conventions do not matter
    cfg = load_config(None, gpu + mixtral + [
        "model.layers=32", "model.vocab_size=32000", "parallel.pp=4", "parallel.vpp=8", "parallel.schedule=interleaved",
        "cluster.nodes=8", "cluster.ranks_per_node=8", "train.global_batch_size=256", "train.optimizer.zero_stage=1"])
    plan = make_plan(cfg, h100)
    rows.append(("Mixtral 8x7B, 64 H100, TP1 EP8 PP4 VP8", "tokens/s per GPU", plan["tokens_per_s"] / 64, 5872.0,
                 "Megatron-Core MoE README (468 TFLOP/s per GPU, MCore v0.9)"))
    # FSMoE vs single-degree chunking (Tutel's scheme): the layer at FSMoE's chosen degrees with co-scheduled links vs
    # one shared degree (2) on one channel, over a grid of MoE layers on 2 nodes x 8 A100 (HDR IB)
    a100 = load_hardware("a100_sxm")
    ratios = []
    for d, f in ((1024, 4096), (2048, 8192), (4096, 14336)):
        for E, k in ((16, 1), (16, 2), (32, 2), (64, 4)):
            for tokens in (2048, 4096, 8192):
                base = gpu + [f"model.d_model={d}", "model.heads=16", f"moe.d_expert={f}", f"moe.num_experts={E}",
                              f"moe.topk={k}", "parallel.ep=16", "cluster.nodes=2", "cluster.ranks_per_node=8"]
                tutel = load_config(None, base + ["moe.pipeline_degree=2", "moe.bwd_pipeline_degree=2",
                                                  "moe.coschedule=false"])
                fs = load_config(None, base + ["moe.pipeline_degree=auto", "moe.bwd_pipeline_degree=auto"])
                t_t = moe_layer_time(tutel, a100, tokens, "bfloat16")
                t_f = moe_layer_time(fs, a100, tokens, "bfloat16")
                ratios.append((t_t["fwd"] + t_t["bwd"]) / (t_f["fwd"] + t_f["bwd"]))
    import statistics

    rows.append(("FSMoE vs single-degree chunking (Tutel's scheme), 36 layers, 2x8 A100", "speed-up (median)",
                 statistics.median(ratios), 1.20, "FSMoE abstract: 1.18-1.22x over Tutel on 1458 layers"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardware", help="a calibration file (default: calibrate now)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each layout, interleaved (the machine is noisy)")
    ap.add_argument("--skip-runs", action="store_true", help="only the published GPU points")
    ap.add_argument("--skip-published", action="store_true", help="only the runs on this machine")
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch CPU")
    if not a.skip_runs:
        hw = a.hardware
        if hw is None:
            from moetrain.plan.calibrate import calibrate

            hw = os.path.join(tempfile.mkdtemp(), "hw.yaml")
            with open(hw, "w") as fh:
                fh.write(calibrate())
        print(f"| run (float32, seq 128, micro-batch 2) | predicted step ms | measured step ms: median of "
              f"{a.repeats} runs (range) | error vs median (range) |")
        print("|---|---|---|---|")
        import statistics

        for name, pred, meas in measured_here(hw, a.steps, a.repeats):
            med = statistics.median(meas)
            lo, hi = min(meas), max(meas)
            print(f"| {name} | {pred * 1e3:.1f} | {med * 1e3:.1f} ({lo * 1e3:.0f}-{hi * 1e3:.0f}) | "
                  f"{pred / med - 1:+.0%} ({pred / hi - 1:+.0%} to {pred / lo - 1:+.0%}) |")
    if a.skip_published:
        return
    print("| published point | quantity | predicted | published | error | source |")
    print("|---|---|---|---|---|---|")
    for case, what, pred, pub, src in published():
        print(f"| {case} | {what} | {pred:,.2f} | {pub:,.2f} | {pred / pub - 1:+.0%} | {src} |")
    print(json.dumps({"note": "hardware files: cluster_configs/hardware (spec sheets; see their comments)"}))


if __name__ == "__main__":
    main()
