"""The optimizer and its learning-rate schedule.

AdamW over this rank's parameters: NVIDIA apex's FusedAdam on CUDA when the real apex is installed,
torch's fused AdamW on CUDA otherwise, its foreach AdamW on CPU; with ZeRO (``train.optimizer.zero_stage``
1 or 2) :class:`~moetrain.parallel.zero.ShardedAdamW` over the gradient reducer's groups (stage 1) or
buckets (stage 2). The schedule is a linear warm-up to ``train.lr``, then cosine decay to
``train.min_lr`` at ``train.steps``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from moetrain.config import TrainConfig
from moetrain.parallel.zero import ShardedAdamW

__all__ = ["lr_at", "build_optimizer"]


def lr_at(step: int, t: TrainConfig, horizon: int | None = None) -> float:
    """Linear warm-up to train.lr, then ``train.lr_schedule`` down to train.min_lr at ``horizon`` (default
    train.steps; a resumed run keeps its first run's), and train.min_lr after it:
    ``cosine``; ``linear``; ``constant`` (train.lr throughout, min_lr unused); ``wsd`` (warm-up, stable at
    train.lr, then a linear decay over the last ``train.lr_decay_fraction`` of the steps after warm-up)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max((horizon or t.steps) - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    if t.lr_schedule == "cosine":
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    if t.lr_schedule == "wsd":
        stable = 1.0 - t.lr_decay_fraction
        progress = 0.0 if progress <= stable else (progress - stable) / max(t.lr_decay_fraction, 1e-12)
    return t.lr - (t.lr - t.min_lr) * progress


def build_optimizer(params: list[torch.nn.Parameter], t: TrainConfig, *, device: torch.device,
                    zero_units: list[tuple] | None = None) -> torch.optim.Optimizer:
    """AdamW for ``params``; with ZeRO, ``zero_units`` are the (group, params[, divisor]) units to shard."""
    o = t.optimizer
    kwargs: dict[str, Any] = dict(lr=t.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.zero_stage:
        return ShardedAdamW(zero_units, stage=o.zero_stage, offload=o.offload, **kwargs)
    if device.type == "cuda" and importlib.util.find_spec("apex") and \
            importlib.util.find_spec("apex.optimizers"):  # pragma: no cover - needs NVIDIA apex
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kwargs)
    if device.type == "cuda":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)
