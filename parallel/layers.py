"""Megatron-style tensor-parallel layers: column/row-parallel linear, vocab-parallel embedding and loss.

Initialisation is layout-independent: each logical weight is drawn in full from its own RNG stream
(``stream_seed(seed, name)``) and every rank keeps its slice, so tp=1 and tp=4 hold the same numbers.
A fused projection (QKV, gate+up) is a list of logical parts; each part is split over the TP group
separately and the local slices are concatenated, so the fused output splits back into parts locally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.parallel.mappings import (
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from moetrain.parallel.rng import init_normal
from moetrain.parallel.weight_grad import linear
from moetrain.parallel.wtacrs import SampledWeightGrad

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "padded_vocab_size",
    "gather_dim",
]


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab padded to a multiple of ``multiple * tp`` so every TP rank holds an equal, aligned slice."""
    m = multiple * tp
    return ((vocab_size + m - 1) // m) * m


def gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    _, tp = rank_size(group)
    if tp == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _mark(p: nn.Parameter, *, tp_sharded: bool) -> nn.Parameter:
    # tp_sharded: each TP rank holds a different slice (no TP reduction, counted once in norms).
    # (tp_partial_grad, set elsewhere: replicated over TP but each rank's gradient is a partial sum,
    # e.g. SP norm weights and MoE routers; finalize_tp_partial_grads sums it over TP.)
    p.tp_sharded = tp_sharded
    return p


def _matmul(layer: nn.Module, x: torch.Tensor, *, x_group=None, g_group=None) -> torch.Tensor:
    """``x W^T`` with the layer's weight-gradient strategy: WTA-CRS sampling when one was given at
    construction (only while gradients are recorded), the exact (deferrable) weight gradient otherwise.
    ``x_group`` / ``g_group``: the TP group over which input / output-gradient rows are partial."""
    if layer.wgrad is not None and torch.is_grad_enabled() and layer.weight.requires_grad:
        return layer.wgrad.linear(x, layer.weight, x_group=x_group, g_group=g_group)
    return linear(x, layer.weight)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W split along its output dimension; output stays split over TP.

    Input ``[s/tp if sp else s, b, in]``; output ``[s, b, sum(out_parts)/tp]``.
    """

    def __init__(self, in_features: int, out_parts: Sequence[int], *, tp_group, sp: bool, seed: int, name: str,
                 std: float, dtype: torch.dtype = torch.float32, weights: torch.Tensor | None = None,
                 wgrad: SampledWeightGrad | None = None, bias: bool = False, gather_input: bool = True):
        super().__init__()
        rank, tp = rank_size(tp_group)
        self.gather_input = gather_input  # False: the input is already the full, TP-replicated activation
        for n in out_parts:
            if n % tp:
                raise ValueError(f"{name}: output size {n} is not divisible by tp={tp}")
        self.tp_group, self.sp = tp_group, sp
        self.in_features, self.out_parts = in_features, tuple(out_parts)
        if weights is None:
            slices = []
            for i, n in enumerate(out_parts):
                full = init_normal((n, in_features), std, seed, f"{name}.{i}" if len(out_parts) > 1 else name)
                slices.append(full.chunk(tp, dim=0)[rank])
            local = torch.cat(slices, dim=0)
        else:
            local = weights
        self.weight = _mark(nn.Parameter(local.to(dtype).contiguous()), tp_sharded=tp > 1)
        # a bias (zeros at init, like HF's) is split like the weight's rows: its logical tensor is the parts' concat
        self.bias = _mark(nn.Parameter(torch.zeros(sum(out_parts) // tp, dtype=dtype)), tp_sharded=tp > 1) \
            if bias else None
        self.wgrad = wgrad

    @property
    def local_parts(self) -> list[int]:
        _, tp = rank_size(self.tp_group)
        return [n // tp for n in self.out_parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_input:
            x = gather_from_sp(x, self.tp_group) if self.sp else copy_to_tp(x, self.tp_group)
        y = _matmul(self, x, g_group=self.tp_group)
        return y if self.bias is None else y + self.bias

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The logical ``[sum(out_parts), in]`` tensor from this rank's slice of it (collective over TP)."""
        parts = local.split(self.local_parts, dim=0)
        return torch.cat([gather_dim(p, 0, self.tp_group) for p in parts], dim=0)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logical tensor (inverse of :meth:`full`, no communication)."""
        rank, tp = rank_size(self.tp_group)
        return torch.cat([p.chunk(tp, dim=0)[rank] for p in full.split(list(self.out_parts), dim=0)], dim=0)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W split along its input dimension; input arrives split over TP.

    Input ``[s, b, in/tp]``; output ``[s/tp if sp else s, b, out]`` after the TP reduction.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group, sp: bool, seed: int, name: str,
                 std: float, dtype: torch.dtype = torch.float32, wgrad: SampledWeightGrad | None = None):
        super().__init__()
        rank, tp = rank_size(tp_group)
        if in_features % tp:
            raise ValueError(f"{name}: input size {in_features} is not divisible by tp={tp}")
        self.tp_group, self.sp = tp_group, sp
        full = init_normal((out_features, in_features), std, seed, name)
        self.weight = _mark(nn.Parameter(full.chunk(tp, dim=1)[rank].to(dtype).contiguous()), tp_sharded=tp > 1)
        self.wgrad = wgrad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(self, x, x_group=self.tp_group)
        return reduce_scatter_to_sp(y, self.tp_group) if self.sp else reduce_from_tp(y, self.tp_group)

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The logical ``[out, in]`` tensor from this rank's column slice (collective over TP)."""
        return gather_dim(local, 1, self.tp_group)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        rank, tp = rank_size(self.tp_group)
        return full.chunk(tp, dim=1)[rank]


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split over TP; out-of-range ids are masked locally.

    Input token ids ``[s, b]``; output ``[s/tp if sp else s, b, d]``.
    """

    def __init__(self, vocab_size: int, dim: int, *, tp_group, sp: bool, seed: int, name: str, std: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        rank, tp = rank_size(tp_group)
        self.tp_group, self.sp = tp_group, sp
        self.vocab_size = vocab_size
        self.padded = padded_vocab_size(vocab_size, tp)
        per = self.padded // tp
        self.start, self.end = rank * per, (rank + 1) * per
        full = torch.zeros(self.padded, dim)
        full[:vocab_size] = init_normal((vocab_size, dim), std, seed, name)
        self.weight = _mark(nn.Parameter(full[self.start:self.end].to(dtype).contiguous()), tp_sharded=tp > 1)

    def forward(self, ids_SB: torch.Tensor) -> torch.Tensor:
        outside = (ids_SB < self.start) | (ids_SB >= self.end)
        local = (ids_SB - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out, self.tp_group) if self.sp else reduce_from_tp(out, self.tp_group)

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The logical ``[vocab_size, d]`` tensor (padding dropped) from this rank's rows (collective over TP)."""
        return gather_dim(local, 0, self.tp_group)[: self.vocab_size]

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return pad_rows(full, self.padded)[self.start:self.end]


def pad_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """``full`` with zero rows appended up to ``rows`` (the TP-padded vocabulary)."""
    if full.shape[0] == rows:
        return full
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])], dim=0)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits: three small all-reduces forward, none backward.

    Logits of padding entries (global index >= vocab_size) are excluded, so the loss does not depend
    on how much padding a layout adds.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size):
        math_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(math_dtype)
        v_local = x.shape[-1]
        global_idx = torch.arange(vocab_start, vocab_start + v_local, device=x.device)
        pad = global_idx >= vocab_size
        if pad.any():
            x = x.masked_fill(pad, float("-inf"))
        x_max = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX, group=group)
        x = x - x_max.unsqueeze(-1)
        in_range = (target >= vocab_start) & (target < vocab_start + v_local)
        local_t = (target - vocab_start).masked_fill(~in_range, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        exp = x.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(picked, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - picked
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, in_range)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, in_range = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -in_range.to(grad.dtype).unsqueeze(-1))
        grad.mul_(g.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group, vocab_size: int,
                                 vocab_start: int | None = None) -> torch.Tensor:
    """Per-token loss from logits ``[..., V_pad/tp]`` (this rank's vocab slice) and global targets."""
    rank, tp = rank_size(tp_group)
    if vocab_start is None:
        vocab_start = rank * logits.shape[-1]
    return _VocabParallelCE.apply(logits, target, tp_group if tp > 1 else None, vocab_start, vocab_size)


def default_std(d_model: int) -> float:
    return 1.0 / math.sqrt(d_model)
