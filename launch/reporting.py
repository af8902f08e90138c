"""What a run tells its user while it trains: the console line, TensorBoard scalars, a progress bar on a
terminal, GPU samples, the per-rank memory report after the first step, and MoE expert-load metrics.

Rank 0 prints and writes; the collectives (GPU samples, memory report) involve every rank.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from moetrain.config import JobConfig
from moetrain.launch.metrics import peak_memory_bytes

__all__ = ["Reporter", "moe_metrics"]


def moe_metrics(layers: list, per_micro: list[dict]) -> dict[str, float]:
    """Expert load per MoE layer over this rank's micro-batches: dropped fraction, load CV, aux losses."""
    out: dict[str, float] = {}
    for layer in layers:
        stats = [m[layer.layer] for m in per_micro if layer.layer in m]
        if not stats:
            continue
        load = torch.stack([s["tokens_per_expert"].to(torch.float64).cpu() for s in stats]).sum(0)
        assigned = sum(s["assignments"] for s in stats)
        key = f"moe/layer{layer.layer}"
        out[f"{key}/dropped_frac"] = sum(s["dropped"] for s in stats) / max(assigned, 1)
        out[f"{key}/load_cv"] = float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))
        out[f"{key}/load_max_over_mean"] = float(load.max() / load.mean().clamp_min(1e-9))
        for name in ("aux_loss", "seq_aux_loss", "z_loss"):
            if name in stats[0]:
                out[f"{key}/{name}"] = sum(s[name] for s in stats) / len(stats)
    return out


def stage_moe_metrics(out: dict[str, Any], groups) -> dict[str, float]:
    """Every pipeline stage's MoE-layer metrics, so rank 0 (the first stage) logs all of them (collective
    over the pipeline group; called on the steps that are logged)."""
    mine = {k: v for k, v in out.items() if k.startswith("moe/")}
    parts: list = [None] * groups.size("pp")
    dist.all_gather_object(parts, mine, group=groups.group("pp"))
    return {k: v for part in parts for k, v in part.items()}


class Reporter:
    """Console, TensorBoard and progress output of one rank (rank 0 writes)."""

    def __init__(self, cfg: JobConfig, *, rank: int, device: torch.device, flops_per_token: float,
                 peak_flops: float):
        self.cfg, self.device = cfg, device
        self.is_logger = rank == 0
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens_per_step = cfg.global_batch_size * cfg.model.seq_len
        self.writer = None
        if self.is_logger and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        self.wandb = None
        if self.is_logger and cfg.logging.wandb is not None:
            import wandb

            w = cfg.logging.wandb
            self.wandb = wandb.init(project=w.project, name=w.run_name, mode=w.mode, dir=cfg.logging.run_dir,
                                    config=cfg.resolved(), settings=wandb.Settings(silent=True))
        self.bar = None
        self.gpu_monitor = None

    def say(self, msg: str) -> None:
        if self.is_logger:
            print(msg, flush=True)

    def start(self, step: int) -> None:
        """A live bar on rank 0 when writing to a terminal (plain step lines otherwise, e.g. in CI logs)."""
        if not (self.is_logger and sys.stdout.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True)
        self.bar.add_task("train", total=self.cfg.train.steps, completed=step, loss=float("nan"))
        self.bar.start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def logs(self, step: int) -> bool:
        """Whether step ``step`` (1-based) gets a console line (the first, every logging.every-th, the last)."""
        return step % self.cfg.logging.every == 0 or step == self.cfg.train.steps or step == 1

    def mfu(self, tokens_per_s: float) -> tuple[float, float]:
        """(TFLOP/s per rank, MFU) at ``tokens_per_s`` over the whole job."""
        tflops = tokens_per_s * self.flops_per_token / dist.get_world_size() / 1e12
        return tflops, (tflops * 1e12 / self.peak_flops if self.peak_flops else float("nan"))

    def step(self, step: int, out: dict[str, float], dt: float) -> None:
        """Log step ``step`` (1-based, just finished) that took ``dt`` seconds."""
        tps = self.tokens_per_step / max(dt, 1e-9)
        tflops, mfu = self.mfu(tps)
        mem = peak_memory_bytes(self.device)
        if self.device.type == "cuda" and step % self.cfg.logging.every == 0:  # every rank: a collective
            self._log_gpus(step)
        if self.writer:
            for k, v in (("loss", out["loss"]), ("lr", out["lr"]), ("grad_norm", out["grad_norm"]),
                         ("tokens_per_s", tps), ("tflops_per_rank", tflops), ("mfu", mfu),
                         ("peak_memory_mib", mem / 2**20)):
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/saved_activation_mib", out["saved_activation_bytes"] / 2**20, step)
            for k, v in out.items():
                if k.startswith("moe/"):
                    self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": out["loss"], "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
                            "train/tokens_per_s": tps, "train/mfu": mfu, "train/peak_memory_mib": mem / 2**20,
                            **{k: v for k, v in out.items() if k.startswith("moe/")}}, step=step)
        if self.bar is not None:
            self.bar.update(self.bar.task_ids[0], completed=step, loss=out["loss"])
        if self.is_logger and self.logs(step):
            print(f"step {step:>5}/{self.cfg.train.steps} | loss {out['loss']:.4f} | lr {out['lr']:.2e} | "
                  f"gnorm {out['grad_norm']:.3f} | {tps:,.0f} tok/s | {tflops * 1e3:.2f} GFLOP/s/rank | "
                  f"MFU {mfu:.1%} | mem {mem / 2**20:.0f} MiB | act {out['saved_activation_bytes'] / 2**20:.1f} MiB",
                  flush=True)

    def evaluation(self, out: dict[str, float]) -> None:
        """One validation result (``Trainer.evaluate``): a console line and TensorBoard scalars."""
        if self.writer:
            self.writer.add_scalar("valid/loss", out["loss"], out["step"])
            self.writer.add_scalar("valid/ppl", out["ppl"], out["step"])
        if self.wandb is not None:
            self.wandb.log({"valid/loss": out["loss"], "valid/ppl": out["ppl"]}, step=out["step"])
        if self.is_logger:
            if self.bar is not None:
                self.bar.console.print(f"valid at step {out['step']} | loss {out['loss']:.4f} | ppl {out['ppl']:.2f}")
            else:
                print(f"valid at step {out['step']:>5} | loss {out['loss']:.4f} | ppl {out['ppl']:.2f} | "
                      f"{out['tokens']:,} tokens", flush=True)

    def _log_gpus(self, step: int) -> None:
        """Every rank's NVML sample (utilisation, memory, power) to TensorBoard as gpu/<metric>/rank<r>."""
        if self.gpu_monitor is None:
            from moetrain.launch.gpu_monitor import GpuMonitor

            self.gpu_monitor = GpuMonitor.create(self.device) or False
        mine = self.gpu_monitor.sample() if self.gpu_monitor else {}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if self.writer:
            for r, sample in enumerate(every):
                for k, v in (sample or {}).items():
                    self.writer.add_scalar(f"{k}/rank{r}", v, step)

    def memory(self, params: list[torch.nn.Parameter], optimizer, activation_bytes: int) -> dict[str, Any]:
        """Per-rank bytes of parameters, gradients kept between steps, optimizer state and the activations
        saved for backward by one micro-batch; logged once after the first step (collective)."""
        zero = self.cfg.train.optimizer.zero_stage
        nbytes = sum(p.numel() * p.element_size() for p in params)
        if zero:
            grads, opt = optimizer.grad_bytes(), optimizer.state_bytes()
        else:
            grads = nbytes
            opt = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        mine = {"params": nbytes, "grads": grads, "optimizer": opt, "activations": int(activation_bytes or 0)}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        peak = {k: max(r[k] for r in every) for k in mine}
        offload = self.cfg.train.optimizer.offload
        where = "host memory" if offload == "cpu" else str(self.device)
        mib = {k: f"{v / 2**20:.2f}" for k, v in peak.items()}
        self.say(f"[moetrain] memory per rank (max over ranks, MiB): params {mib['params']}, grads {mib['grads']}, "
                 f"optimizer state {mib['optimizer']} (ZeRO stage {zero}, on {where}), "
                 f"activations {mib['activations']} per micro-batch")
        return {"per_rank": every, "max": peak, "zero_stage": zero, "offload": offload}

    def summary(self, state, last: dict[str, Any], *, start_step: int, elapsed: float, tokens_per_s: float,
                stopped: dict | None, facts, skipped: list[int], resumed_from: str | None, stage_layers: list[int],
                memory: dict | None, first_step_wall: float | None, moe_degrees: dict) -> dict[str, Any]:
        """This rank's summary of the run (rank 0's is the job's ``--summary``)."""
        cfg, p = self.cfg, self.cfg.parallel
        losses = state.losses
        return {
            "steps": state.step, "losses": losses, "final_loss": losses[-1] if losses else None,
            "tokens_per_s": tokens_per_s, "world_size": dist.get_world_size(),
            "layout": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": cfg.dp},
            "pipeline": {"schedule": p.schedule, "vpp": p.vpp, "stage_layers": stage_layers} if p.pp > 1 else None,
            "restarts": 0, "grad_norms": state.grad_norms,
            "saved_activation_bytes": last.get("saved_activation_bytes"),
            "moe": {k: v for k, v in last.items() if k.startswith("moe/")},
            "resumed_from": resumed_from, "steps_run": state.step - start_step, "elapsed_s": elapsed,
            "model_flops_per_token": self.flops_per_token,
            "params": {"total": facts.total_params, "active": facts.active_params},
            "mfu": self.mfu(tokens_per_s)[1] if self.peak_flops else None, "peak_flops_per_rank": self.peak_flops,
            "peak_memory_bytes": peak_memory_bytes(self.device), "memory": memory, "first_step_wall": first_step_wall,
            "moe_degrees": moe_degrees, "stopped": stopped, "skipped_nonfinite_steps": skipped,
            "already_done": state.step >= cfg.train.steps and state.step == start_step,
        }
