"""Deferred weight gradients: the input-gradient / weight-gradient split of zero-bubble pipelines.

A zero-bubble schedule runs each micro-batch's backward in two passes: B (gradients of the stage
input, which the previous stage is waiting for) and W (gradients of the weights, which nobody waits
for and so can fill pipeline bubbles). The weight-bearing autograd functions of this project
(:func:`linear`, the experts' segmented matmuls, WTA-CRS linears) call :func:`weight_grad` for their
weight gradient: outside a :func:`defer_weight_grads` context it is computed at once and returned to
autograd as usual; inside, the computation is queued (with the tensors it needs) and the function
returns ``None`` for the weight, and :func:`run_deferred` later adds it to ``param.grad``.
Parameters whose gradient comes from plain torch ops (norm weights, routers) are done in B.

The same split serves one overlap inside a single backward: the MoE experts hand their weight
gradients to a :class:`PendingWeightGrads` (``weight_grad(..., pending=...)``), and the backward of the
dispatch all-to-all, which needs only the experts' input gradients, computes them while its exchange
is in flight (moe/dispatch.py). Zero-bubble deferral, when on, takes precedence.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from moetrain.parallel.grad_storage import fresh_grad

__all__ = ["weight_grad", "defers", "defer_weight_grads", "run_deferred", "linear", "DeferredGrads",
           "PendingWeightGrads"]

DeferredGrads = list[tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]]

_local = threading.local()


@contextlib.contextmanager
def defer_weight_grads(into: DeferredGrads) -> Iterator[DeferredGrads]:
    """Inside this context, weight gradients of deferring functions are appended to ``into``."""
    old = getattr(_local, "queue", None)
    _local.queue = into
    try:
        yield into
    finally:
        _local.queue = old


class PendingWeightGrads:
    """Weight gradients of ``params`` left queued by one backward step for a later step of the same
    backward to compute (:meth:`take`), which hands them to autograd as its own input gradients."""

    def __init__(self, params: tuple[torch.nn.Parameter, ...]):
        self.params = params
        self.queue: DeferredGrads = []

    @torch.no_grad()
    def take(self) -> list[torch.Tensor | None]:
        """Run the queued computations: one summed gradient per parameter (``None`` if none was queued)."""
        grads: dict[int, torch.Tensor] = {}
        for param, compute in self.queue:
            g = compute()
            grads[id(param)] = g if id(param) not in grads else grads[id(param)] + g
        self.queue.clear()
        return [grads.get(id(p)) for p in self.params]


def defers(param: torch.Tensor, pending: PendingWeightGrads | None = None) -> bool:
    """Whether :func:`weight_grad` would queue ``param``'s gradient instead of computing it now (a caller
    that computes it fused with other work does so only when not)."""
    return pending is not None or (getattr(_local, "queue", None) is not None
                                   and isinstance(param, torch.nn.Parameter))


def weight_grad(param: torch.Tensor, compute: Callable[[], torch.Tensor],
                pending: PendingWeightGrads | None = None) -> torch.Tensor | None:
    """``compute()`` now, or ``None`` after queueing it: on the zero-bubble queue when deferral is on
    (see the module docstring), else on ``pending`` when given."""
    queue = getattr(_local, "queue", None)
    if queue is not None and isinstance(param, torch.nn.Parameter):
        queue.append((param, compute))
        return None
    if pending is not None:
        assert any(param is p for p in pending.params), "a pending weight gradient of a parameter nobody takes"
        pending.queue.append((param, compute))
        return None
    return compute()


@torch.no_grad()
def run_deferred(queue: DeferredGrads) -> None:
    """Run the queued weight-gradient computations, accumulating into ``param.grad`` (the W pass)."""
    for param, compute in queue:
        g = compute().to(param.dtype)
        if param.grad is None:
            param.grad = g.contiguous() if g.shape == param.shape else g.reshape(param.shape).clone()
        else:
            param.grad.add_(g)
    queue.clear()


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class _Linear(torch.autograd.Function):
    """``x @ w^T`` whose weight gradient may be deferred (zero-bubble W pass)."""

    @staticmethod
    def forward(ctx, x, w):
        cast = _autocast_dtype(x)
        ctx.x_dtype = x.dtype
        if cast is not None:
            x, w_c = x.to(cast), w.to(cast)
        else:
            w_c = w
        ctx.param = w
        ctx.save_for_backward(x, w_c)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, w_c)

    @staticmethod
    def backward(ctx, g):
        x, w_c = ctx.saved_tensors
        gx = (g @ w_c).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            if g2.dtype == x2.dtype == ctx.param.dtype:
                gw = weight_grad(ctx.param, lambda: torch.mm(g2.t(), x2, out=fresh_grad(ctx.param)))
            else:
                gw = weight_grad(ctx.param, lambda: (g2.t() @ x2).to(ctx.param.dtype))
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias) with a deferrable weight gradient."""
    return _Linear.apply(x, w)
