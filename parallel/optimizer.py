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
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at ``horizon`` (default train.steps;
    a resumed run keeps its first run's), and train.min_lr after it."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max((horizon or t.steps) - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


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
