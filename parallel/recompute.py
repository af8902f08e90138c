"""Activation recomputation: keep a block's input, drop its internals, run it again in backward.

A thin layer over ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved) that also marks
the recomputing forward, so modules with side effects in forward (expert-load counters of the
aux-loss-free router) do not count a micro-batch twice: see :func:`is_recomputing`.

Modes (``train.recompute``): ``none``; ``selective`` recomputes only core attention (the part whose
saved activations grow with s^2 per head, as in Megatron-LM's selective recomputation); ``full``
recomputes whole transformer blocks, including MoE layers and their all-to-alls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["recompute", "is_recomputing", "MODES"]

MODES = ("none", "selective", "full")

_state = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed region is being re-run for backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _contexts():
    return contextlib.nullcontext(), _recomputing()


def recompute(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` whose intermediate activations are recomputed in backward instead of saved."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)
