"""The planner inside a run: the prediction a job logs at start and the predicted-vs-measured record its summary
keeps, so every run shows the model's error.

The memory prediction needs no hardware file (parameters, gradients and optimizer state are exact; activations
are modeled). The step time needs one: ``logging.plan_hardware`` (a name or a file from ``moetrain plan
--calibrate``), else on CUDA the file matching the device's name (H100, H200, A100, B200); on CPU without a
file, no time prediction.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import JobConfig

__all__ = ["predict_run", "compare_run", "hardware_for"]

_BY_DEVICE = (("H200", "h200_sxm"), ("H100", "h100_sxm"), ("A100", "a100_sxm"), ("GB200", "gb200_nvl72"),
              ("B200", "b200"))


def hardware_for(cfg: JobConfig, device_name: str | None) -> str | None:
    if cfg.logging.plan_hardware:
        return cfg.logging.plan_hardware
    for key, name in _BY_DEVICE:
        if device_name and key in device_name:
            return name
    return None


def predict_run(cfg: JobConfig, device_name: str | None = None) -> dict[str, Any]:
    """What the planner expects of this run: per-stage memory (bytes; activations of one micro-batch), and with a
    hardware file the step time and whether it fits. Never raises: a failing model is reported, not fatal."""
    from moetrain.models.spec import get_model_spec
    from moetrain.plan.memory import stage_memory

    out: dict[str, Any] = {"hardware": None, "step_time_s": None, "fits": None, "error": None}
    try:
        spec = get_model_spec(cfg)
        stages = [stage_memory(cfg, spec, s, imbalance=1.0) for s in range(cfg.parallel.pp)]
        out["memory_per_stage"] = [{"params": m.params, "grads": m.grads, "optimizer": m.optimizer,
                                    "activations": int(m.activation_per_micro_batch)} for m in stages]
        name = hardware_for(cfg, device_name)
        if name:
            from moetrain.plan import load_hardware, make_plan

            hw = load_hardware(name)
            plan = make_plan(cfg, hw)
            out.update(hardware=hw.name, step_time_s=plan["step_time_s"], fits=plan["fits"],
                       memory_total=plan["memory_per_rank"]["total"], device_memory=plan["device_memory"])
    except Exception as exc:  # the prediction must never stop a run
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def compare_run(predicted: dict[str, Any], measured_memory: dict | None, step_times: list[float],
                per_stage: int) -> dict[str, Any]:
    """Predicted beside measured: step time (median of the steps after the first) and each rank's memory, with
    relative errors (predicted / measured - 1)."""
    timed = sorted(step_times[1:] or step_times)
    measured_step = timed[len(timed) // 2] if timed else None
    out: dict[str, Any] = {"predicted": predicted, "measured": {"step_time_s": measured_step}}
    errors: dict[str, Any] = {}
    if predicted.get("step_time_s") and measured_step:
        errors["step_time"] = predicted["step_time_s"] / measured_step - 1
    stages = predicted.get("memory_per_stage")
    if measured_memory and stages:
        per_rank = measured_memory["per_rank"]
        exact = all(r[k] == stages[i // per_stage][k] for i, r in enumerate(per_rank)
                    for k in ("params", "grads", "optimizer"))
        acts = [r["activations"] / stages[i // per_stage]["activations"] - 1 for i, r in enumerate(per_rank)
                if stages[i // per_stage]["activations"]]
        out["measured"]["memory_max"] = measured_memory["max"]
        errors.update(memory_exact=exact, activations_max_abs=max((abs(a) for a in acts), default=None))
    out["error"] = errors
    return out
