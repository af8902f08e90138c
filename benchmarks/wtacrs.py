"""WTA-CRS vs dense training: saved activations, peak memory, step time, loss after a fixed number of steps.

Every setting trains the same dense transformer on the byte-level text corpus from the same seed, each
in a fresh process (so peak RSS belongs to that run alone): dense (no sampling), then WTA-CRS on every
sampled linear (qkv, attention output, MLP up and down) at keep ratio 1.0, 0.3 and 0.1. Saved
activations are the bytes autograd keeps for backward in one micro-batch (saved-tensor hooks, storages
counted once, parameters excluded). On a GPU (``--device cuda``) the peak is torch's max allocated
memory and the script also searches the largest micro-batch that fits.

    python benchmarks/wtacrs.py [--steps 40] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

BASE = ["cluster.nodes=1", "cluster.ranks_per_node=1", "model.layers=4", "model.d_model=256", "model.heads=8",
        "model.d_ffn=1024", "model.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8",
        "train.lr=0.002", "train.warmup_steps=5", "data.source=text", "logging.every=100000"]
SETTINGS = [("dense", ["wtacrs.enabled=false"])] + [
    (f"wtacrs {r}", ["wtacrs.enabled=true", f"wtacrs.keep_ratio={r}", "wtacrs.layers=[qkv,attn_out,mlp_up,mlp_down]"])
    for r in ("1.0", "0.3", "0.1")]


def _run(overrides: list[str]) -> dict:
    import time

    import torch

    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.metrics import peak_memory_bytes
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, BASE + overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    times, losses, saved = [], [], []
    while trainer.step < cfg.train.steps:
        t0 = time.perf_counter()
        out = trainer.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(out["loss"])
        saved.append(out["saved_activation_bytes"])
    return {"step_s": statistics.median(times[2:]), "final_loss": sum(losses[-5:]) / 5, "saved": max(saved),
            "peak": peak_memory_bytes(trainer.device),
            "cuda": torch.cuda.is_available() and cfg.cluster.device == "cuda"}


def _max_batch(overrides: list[str]) -> int:  # pragma: no cover - needs CUDA
    import torch

    best, mb = 0, 8
    while mb <= 4096:
        try:
            _run(overrides + ["train.steps=2", f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}"])
            best = mb
            mb *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    from moetrain.launch.local import LocalRanks

    extra = [f"train.steps={args.steps}", f"cluster.device={args.device}"]
    if args.device == "cuda":
        extra.append("train.dtype=bfloat16")
    rows = []
    for name, over in SETTINGS:
        with LocalRanks(1, threads=os.cpu_count() or 1, timeout=3600) as pool:  # a fresh process per setting
            res = pool.run(_run, over + extra)[0]
            if args.device == "cuda":  # pragma: no cover
                gpu = [f"cluster.device={args.device}", "train.dtype=bfloat16"]
                res["max_mb"] = pool.run(_max_batch, over + gpu)[0]
        rows.append((name, res))
    dense = rows[0][1]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}; model: 4 layers, d 256, "
          f"seq 256, micro-batch 8, {args.steps} steps on the text corpus")
    head = f"{'setting':<12}{'saved act MiB':>14}{'vs dense':>9}{'peak MiB':>10}{'vs dense':>9}{'step ms':>9}" \
           f"{'final loss':>11}{'vs dense':>9}"
    if args.device == "cuda":
        head += f"{'max micro-batch':>16}"
    print(head)
    for name, r in rows:
        line = (f"{name:<12}{r['saved'] / 2**20:>14.1f}{dense['saved'] / r['saved']:>8.2f}x"
                f"{r['peak'] / 2**20:>10.0f}{dense['peak'] / r['peak']:>8.2f}x{r['step_s'] * 1e3:>9.0f}"
                f"{r['final_loss']:>11.4f}{(r['final_loss'] / dense['final_loss'] - 1) * 100:>+8.1f}%")
        if args.device == "cuda":
            line += f"{r.get('max_mb', 0):>16}"
        print(line)


if __name__ == "__main__":
    main()
