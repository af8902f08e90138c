"""Tensor-parallel communication as autograd functions (conjugate pairs), device-agnostic (gloo and NCCL).

Activations use the ``[s, b, h]`` layout so the sequence-parallel collectives work on dim 0.

| function                  | forward                       | backward                      |
|---------------------------|-------------------------------|-------------------------------|
| copy_to_tp                | identity                      | all-reduce                    |
| reduce_from_tp            | all-reduce                    | identity                      |
| gather_from_sp            | all-gather dim 0              | reduce-scatter dim 0          |
| reduce_scatter_to_sp      | reduce-scatter dim 0          | all-gather dim 0              |
| scatter_to_sp             | keep own chunk of dim 0       | all-gather dim 0              |
| gather_last_dim           | all-gather last dim           | keep own chunk of last dim    |

Every function is the identity when the group has one rank. The process group is always an argument.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.dist.groups import rank_size

__all__ = [
    "copy_to_tp",
    "reduce_from_tp",
    "gather_from_sp",
    "reduce_scatter_to_sp",
    "scatter_to_sp",
    "gather_last_dim",
    "all_gather_dim0",
    "reduce_scatter_dim0",
]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: dist.ProcessGroup | None) -> int:
    return rank_size(group)[1]


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"dim 0 of size {x.shape[0]} does not split over {n} ranks")
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {n} ranks")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim0(g, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, 0, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim0(g, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = _size(group)
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, g.dim() - 1, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    """A sum over the group that every member uses in its own further work: all-reduce both ways."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the group (e.g. a norm's statistic over TP-sharded features); the gradient is summed too."""
    return x if _size(group) == 1 else _AllReduceSum.apply(x, group)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)
