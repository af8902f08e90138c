"""``moetrain plan``: will a config fit, how fast will it run, which layout is best, before a cluster is booked.

:func:`make_plan` combines the per-rank memory model (:mod:`.memory`, exact for parameters, gradients and
optimizer state), the step-time model (:mod:`.timing`) and a hardware file (:mod:`.hardware`);
:mod:`.search` ranks every valid layout for a device count; :mod:`.calibrate` measures this machine.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import JobConfig
from moetrain.models.spec import get_model_spec
from moetrain.plan.hardware import Hardware, load_hardware
from moetrain.plan.memory import DROPLESS_IMBALANCE, stage_memory
from moetrain.plan.timing import step_time

__all__ = ["make_plan", "format_plan", "load_hardware", "Hardware", "default_hardware"]


def default_hardware(cfg: JobConfig) -> str:
    """``h100_sxm`` for CUDA jobs; CPU jobs need a calibration file (``moetrain plan --calibrate``)."""
    return "h100_sxm"


def make_plan(cfg: JobConfig, hw: Hardware, *, imbalance: float = DROPLESS_IMBALANCE,
              stages: list | None = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``hw``: memory per rank (max over ranks), whether it fits, step time, throughput.
    ``stages``: each pipeline stage's :class:`~moetrain.plan.memory.StageMemory` when already computed."""
    spec = get_model_spec(cfg)
    facts = spec.facts()
    stages = stages or [stage_memory(cfg, spec, s, imbalance) for s in range(cfg.parallel.pp)]
    worst = max(stages, key=lambda m: m.device_total)
    mem = {"params": max(m.params for m in stages), "grads": max(m.grads for m in stages),
           "optimizer": max(0 if m.optimizer_on_host else m.optimizer for m in stages),
           "activations": int(max(m.activations for m in stages)), "buffers": int(max(m.buffers for m in stages)),
           "total": int(worst.device_total)}
    timing = step_time(cfg, spec, hw)
    tokens = cfg.global_batch_size * cfg.model.seq_len
    tps = tokens / timing.step_s
    tflops = facts.flops_per_token * tps / cfg.world_size / 1e12
    peak = hw.peak_flops(cfg.train.dtype)
    return {
        "hardware": hw.name,
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": cfg.dp, "ep": cfg.parallel.ep,
                   "etp": cfg.parallel.etp, "vpp": cfg.parallel.vpp, "sp": cfg.parallel.sp,
                   "schedule": cfg.parallel.schedule, "recompute": cfg.train.recompute,
                   "zero_stage": cfg.train.optimizer.zero_stage, "offload": cfg.train.optimizer.offload,
                   "micro_batch_size": cfg.train.micro_batch_size},
        "memory_per_rank": mem,
        "memory_per_stage": [{"params": m.params, "grads": m.grads, "optimizer": m.optimizer,
                              "activations": int(m.activations), "activation_per_micro_batch":
                              int(m.activation_per_micro_batch), "buffers": int(m.buffers),
                              "total": int(m.device_total)} for m in stages],
        "host_memory_per_rank": max(m.optimizer for m in stages) if cfg.train.optimizer.offload == "cpu" else 0,
        "device_memory": int(hw.usable_bytes),
        "fits": worst.device_total <= hw.usable_bytes,
        "step_time_s": timing.step_s,
        "tokens_per_s": tps,
        "tflops_per_gpu": tflops,
        "mfu": tflops * 1e12 / peak,
        "breakdown": {k: v for k, v in sorted(timing.breakdown.items(), key=lambda kv: -kv[1]) if v > 0},
        "pipeline_bubble_fraction": timing.bubble_fraction,
        "moe_imbalance": imbalance if cfg.moe.enabled and cfg.moe.capacity_factor is None else None,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    lay = plan["layout"]
    mem = plan["memory_per_rank"]
    lines = [
        f"plan on {plan['hardware']}: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} ep={lay['ep']} etp={lay['etp']} "
        f"vpp={lay['vpp']} sp={str(lay['sp']).lower()} schedule={lay['schedule']} recompute={lay['recompute']} "
        f"zero={lay['zero_stage']}{'+offload' if lay['offload'] == 'cpu' else ''} micro={lay['micro_batch_size']}",
        "memory per rank (the most loaded rank):",
    ]
    for key in ("params", "grads", "optimizer", "activations", "buffers"):
        lines.append(f"  {key:<12} {_gib(mem[key]):>12}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<12} {_gib(mem['total']):>12}   of {_gib(plan['device_memory'])} usable: {verdict}")
    if plan.get("host_memory_per_rank"):
        lines.append(f"  optimizer state on the host: {_gib(plan['host_memory_per_rank'])} per rank")
    if plan.get("moe_imbalance"):
        lines.append(f"  (dropless MoE: expert buffers sized for {plan['moe_imbalance']}x the balanced load)")
    lines.append(f"step {plan['step_time_s'] * 1e3:.1f} ms, {plan['tokens_per_s']:,.0f} tokens/s, "
                 f"{plan['tflops_per_gpu']:.1f} TFLOP/s per device, MFU {plan['mfu']:.1%}")
    total = sum(plan["breakdown"].values()) or 1.0
    lines.append("time per step by component (summed over micro-batches; overlapped parts are not added twice):")
    for k, v in plan["breakdown"].items():
        lines.append(f"  {k:<18} {v * 1e3:10.2f} ms  {v / total:6.1%}")
    return "\n".join(lines)
