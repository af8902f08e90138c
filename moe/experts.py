"""The experts stage: this rank's local experts applied to rows grouped by expert.

Weights are stored in ``nn.Linear``'s layout (output features first), which CPU GEMM libraries run
fastest for the skinny per-expert inputs: ``w_up_EFD`` (``[E_local, 2F/etp, D]`` for SwiGLU: gate | up;
``[E_local, F/etp, D]`` for GELU) and ``w_down_EDF`` (``[E_local, D, F/etp]``). Each global expert's
weights are drawn in full from their
own streams (``{name}.{gid}.gate|up|down``) and sliced for expert tensor parallelism, so any
(ep, etp) layout holds the same numbers. In checkpoints every expert is stored under its global id.

Compute: one grouped GEMM over the expert segments (``torch._grouped_mm`` on CUDA, for the dtypes its own
checks accept: bfloat16 in torch 2.13); otherwise a segmented loop of matmuls whose backward writes every
expert's weight gradient in place.

Expert TP (etp > 1): rows are all-gathered from the etp peers (uneven, as an all-to-all), each peer
computes its F/etp slice for all of them, and the partial outputs are reduce-scattered back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.moe.dispatch import all_to_all, inverse_permutation, segments_perm
from moetrain.parallel.grad_storage import fresh_grad
from moetrain.parallel.rng import init_normal
from moetrain.parallel.weight_grad import PendingWeightGrads, weight_grad

__all__ = ["GroupedExperts", "grouped_mm"]


def _segments_forward(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``out[seg e] = x[seg e] @ w[e]^T``. On CPU a skinny segment (rows <= in_features / 16) is computed
    as ``(w[e] @ x^T)^T``, the same product: one thread, MKL, measured 1.1x (d 512, 32 rows) to 1.4x
    (d 1024, 8 rows; d 2048, 32 rows) faster than ``x @ w^T``, and no gain from 64 rows at d 512."""
    out = x.new_empty(x.shape[0], w.shape[1])
    for e, (xs, os) in enumerate(zip(x.split(counts), out.split(counts))):
        if xs.shape[0]:
            rows_times_wt(xs, w[e], os)
    return out


def rows_times_wt(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x @ w^T`` for one expert segment (``w`` as ``[out, in]``), skinny segments as ``(w @ x^T)^T``
    on CPU (see :func:`_segments_forward`)."""
    if x.shape[0] * 16 <= w.shape[1] and not x.is_cuda:
        out.copy_(torch.mm(w, x.t()).t())
    else:
        torch.mm(x, w.t(), out=out)


def input_grad(g: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = g @ w`` (``[r, O] @ [O, I]``). MKL's fp32 GEMM runs this shape (few rows, weight not
    transposed) at a third of its rate once ``I >= 1024``; summing it over 32- or 64-row slices of ``w``
    (each slice stays in L2) measured 1.3x-2.8x faster for 8-128 rows on one thread, while 256 rows or
    ``I = 512`` gain nothing (benchmarks/RESULTS.md)."""
    r, k = g.shape
    if g.is_cuda or g.dtype != torch.float32 or r > 128 or w.shape[1] < 1024 or k < 256:
        torch.mm(g, w, out=out)
        return
    kb = 32 if r <= 32 else 64
    torch.mm(g[:, :kb], w[:kb], out=out)
    for k0 in range(kb, k, kb):
        out.addmm_(g[:, k0:k0 + kb], w[k0:k0 + kb])


class _SegmentedMM(torch.autograd.Function):
    """``out[seg e] = x[seg e] @ w[e]^T`` (w as ``[E, out, in]``); backward writes each expert's weight
    gradient in place instead of stacking per-expert gradients."""

    @staticmethod
    def forward(ctx, x, w, counts, pending):
        ctx.save_for_backward(x, w)
        ctx.param, ctx.counts, ctx.pending = w, counts, pending
        return _segments_forward(x, w, counts)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        counts = ctx.counts
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            for e, (gs, gxs) in enumerate(zip(g.split(counts), gx.split(counts))):
                if gs.shape[0]:
                    input_grad(gs, w[e], gxs)

        def wgrad():
            gw = fresh_grad(ctx.param)  # every expert's slice is written once: no full-size memset first
            for e, (xs, gs) in enumerate(zip(x.split(counts), g.split(counts))):
                if xs.shape[0]:
                    torch.mm(gs.t(), xs, out=gw[e])
                else:
                    gw[e].zero_()
            return gw

        gw = weight_grad(ctx.param, wgrad, ctx.pending) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` over expert segments (``offs``: cumulative row counts, int32), with the
    weight gradient (``[E, O, I]`` from one 2-D x 2-D grouped GEMM) going through :func:`weight_grad`
    so it can be deferred or left pending like the segmented loop's."""

    @staticmethod
    def forward(ctx, x, w, offs, pending):
        ctx.save_for_backward(x, w, offs)
        ctx.param, ctx.pending = w, pending
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()  # the gradient of a .sum() arrives expanded, which _grouped_mm rejects
        gx = torch._grouped_mm(g, w, offs=offs) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = weight_grad(ctx.param, lambda: torch._grouped_mm(g.t(), x, offs=offs), ctx.pending)
        return gx, gw, None, None


class _SampledSegmentedMM(torch.autograd.Function):
    """``_SegmentedMM`` whose weight gradient is a WTA-CRS estimate: only rows with sample weight > 0 are
    saved (pre-multiplied by it); forward and input gradient stay exact."""

    @staticmethod
    def forward(ctx, x, w, counts, sample_w_R, pending):
        out = _segments_forward(x, w, counts)
        keep = sample_w_R > 0
        idx = keep.nonzero().squeeze(-1)
        rows = x.detach().index_select(0, idx) * sample_w_R[idx].to(x.dtype).unsqueeze(-1)
        seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                      torch.tensor(counts, device=x.device))
        ctx.kept_counts = torch.bincount(seg[idx], minlength=len(counts)).tolist()
        ctx.counts, ctx.param, ctx.pending = counts, w, pending
        ctx.save_for_backward(rows, idx, w)
        return out

    @staticmethod
    def backward(ctx, g):
        rows, idx, w = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.empty(g.shape[0], w.shape[2], dtype=g.dtype, device=g.device) if ctx.needs_input_grad[0] else None
        if gx is not None:
            for e, (gs, gxs) in enumerate(zip(g.split(ctx.counts), gx.split(ctx.counts))):
                if gs.shape[0]:
                    input_grad(gs, w[e], gxs)
        kept = ctx.kept_counts

        def wgrad():
            gw = fresh_grad(ctx.param)  # every expert's slice is written once: no full-size memset first
            g_kept = g.index_select(0, idx)
            for e, (gs, rs) in enumerate(zip(g_kept.split(kept), rows.split(kept))):
                if gs.shape[0]:
                    torch.mm(gs.t(), rs, out=gw[e])
                else:
                    gw[e].zero_()
            return gw

        gw = weight_grad(ctx.param, wgrad, ctx.pending) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES: dict[torch.dtype, bool] = {}


def grouped_mm_takes(dtype: torch.dtype) -> bool:
    """Whether this torch's ``_grouped_mm`` accepts ``dtype``: asked of its own checks on meta tensors (no
    device needed), once per dtype. torch 2.13's accepts bfloat16 only; fp32 / fp16 / fp64 take the loop."""
    if dtype not in _GROUPED_MM_DTYPES:
        ok = _HAS_GROUPED_MM
        if ok:
            x = torch.empty(32, 16, dtype=dtype, device="meta")
            w = torch.empty(2, 16, 16, dtype=dtype, device="meta")
            try:
                torch._grouped_mm(x, w, offs=torch.empty(2, dtype=torch.int32, device="meta"))
            except (RuntimeError, TypeError, ValueError, NotImplementedError):
                ok = False
        _GROUPED_MM_DTYPES[dtype] = ok
    return _GROUPED_MM_DTYPES[dtype]


def fused_grouped_mm_fits(x_RI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: a dtype its checks accept (:func:`grouped_mm_takes`)
    and rows of a multiple of 16 bytes."""
    item = x_RI.element_size()
    return (x_RI.dtype == w_EOI.dtype and grouped_mm_takes(x_RI.dtype)
            and (x_RI.shape[-1] * item) % 16 == 0 and (w_EOI.shape[1] * item) % 16 == 0)


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int],
               sample_w_R: torch.Tensor | None = None, pending: PendingWeightGrads | None = None) -> torch.Tensor:
    """One grouped GEMM over expert segments: rows ``counts[e]`` of ``x`` times ``w[e]^T``.

    On CUDA torch's fused ``_grouped_mm`` (the dtypes it accepts, 16-byte aligned rows); elsewhere a segmented
    loop with in-place weight gradients (measured faster than ``_grouped_mm`` on CPU). With
    ``sample_w_R`` (WTA-CRS weights per row, 0 = not kept) the weight gradient is the sampled estimate.
    With ``pending`` the weight gradient is left to whoever takes ``pending`` later in the backward.
    """
    if x_RI.shape[0] == 0:
        return x_RI.new_zeros(0, w_EOI.shape[1]) + x_RI.sum() * 0  # stay on the graph (collectives follow)
    if sample_w_R is not None:
        return _SampledSegmentedMM.apply(x_RI, w_EOI, list(counts), sample_w_R, pending)
    if x_RI.is_cuda and fused_grouped_mm_fits(x_RI, w_EOI):  # pragma: no cover - needs CUDA
        offs = torch.tensor(counts, device=x_RI.device).cumsum(0).to(torch.int32)
        return _GroupedMM.apply(x_RI, w_EOI, offs, pending)
    return _SegmentedMM.apply(x_RI, w_EOI, list(counts), pending)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, ep_rank: int, ep_size: int, seed: int,
                 name: str, activation: str = "swiglu", etp_group=None, ep_group=None,
                 dtype: torch.dtype = torch.float32, num_layers: int = 1, sample_up: bool = False,
                 sample_down: bool = False):
        super().__init__()
        self.ep_group = ep_group
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts do not split over ep={ep_size}")
        self.etp_group = etp_group
        etp_rank, etp = rank_size(etp_group)
        if d_expert % etp:
            raise ValueError(f"expert hidden size {d_expert} does not split over etp={etp}")
        self.num_local = num_experts // ep_size
        self.first = ep_rank * self.num_local
        self.activation = activation
        self.name = name
        self.etp, self.etp_rank = etp, etp_rank
        std_up, std_down = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_expert) / math.sqrt(2 * num_layers)
        ups, downs = [], []
        for gid in range(self.first, self.first + self.num_local):
            parts = ["gate", "up"] if activation == "swiglu" else ["up"]
            up = [init_normal((d_expert, d_model), std_up, seed, f"{name}.{gid}.{p}").chunk(etp)[etp_rank]
                  for p in parts]
            ups.append(torch.cat(up, dim=0))  # [parts*F/etp, D]
            downs.append(init_normal((d_model, d_expert), std_down, seed, f"{name}.{gid}.down")
                         .chunk(etp, dim=1)[etp_rank])  # [D, F/etp]
        self.w_up_EFD = nn.Parameter(torch.stack(ups).to(dtype).contiguous())
        self.w_down_EDF = nn.Parameter(torch.stack(downs).to(dtype).contiguous())
        for p in (self.w_up_EFD, self.w_down_EDF):
            p.is_expert = True
            p.tp_sharded = True
        # WTA-CRS on the up / down projection: the rows' sample weights come with the rows
        self.sample_up, self.sample_down = sample_up, sample_down

    @property
    def weights(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.w_up_EFD, self.w_down_EDF

    def _grouped(self, x_RD: torch.Tensor, counts: list[int], sample_w_R: torch.Tensor | None = None,
                 pending: PendingWeightGrads | None = None) -> torch.Tensor:
        h = grouped_mm(x_RD, self.w_up_EFD, counts, sample_w_R if self.sample_up else None, pending)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return grouped_mm(h, self.w_down_EDF, counts, sample_w_R if self.sample_down else None, pending)

    def forward(self, x_RD: torch.Tensor, counts: list[int], sample_w_R: torch.Tensor | None = None,
                pending: PendingWeightGrads | None = None) -> torch.Tensor:
        """Rows grouped by local expert (``counts[e]`` rows for local expert e) -> expert outputs; with
        ``pending`` (over :attr:`weights`) the weight gradients are left for a later backward step."""
        assert sum(counts) == x_RD.shape[0] and len(counts) == self.num_local
        if self.etp == 1:
            return self._grouped(x_RD, counts, sample_w_R, pending)
        assert sample_w_R is None, "WTA-CRS with expert tensor parallelism is rejected by the config"
        # gather every etp peer's rows (and their per-expert counts), regrouped by expert
        n_me = x_RD.shape[0]
        c = torch.tensor(counts, dtype=torch.long)
        peers = [torch.empty_like(c) for _ in range(self.etp)]
        dist.all_gather(peers, c, group=self.etp_group)
        pc = torch.stack(peers).tolist()  # [peer][expert]
        sizes = [sum(row) for row in pc]
        x_all = all_to_all(x_RD.repeat(self.etp, 1), [n_me] * self.etp, sizes, self.etp_group)
        by_expert = segments_perm(pc, [(p, e) for e in range(self.num_local) for p in range(self.etp)])
        y_grouped = self._grouped(x_all.index_select(0, by_expert),
                                  [sum(pc[p][e] for p in range(self.etp)) for e in range(self.num_local)],
                                  pending=pending)
        y_all = y_grouped.index_select(0, inverse_permutation(by_expert))  # [peer][expert] again: partial sums over F
        partial = all_to_all(y_all, sizes, [n_me] * self.etp, self.etp_group)
        return partial.view(self.etp, n_me, -1).sum(0)

    # ------------------------------------------------------------------ checkpoints by global expert id
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for local in range(self.num_local):
            gid = self.first + local
            for pname in ("w_up_EFD", "w_down_EDF"):
                t = getattr(self, pname)[local]
                destination[f"{prefix}{gid}.{pname}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for local in range(self.num_local):
            gid = self.first + local
            for pname in ("w_up_EFD", "w_down_EDF"):
                key = f"{prefix}{gid}.{pname}"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                with torch.no_grad():
                    getattr(self, pname)[local].copy_(state_dict[key])

    def full(self, local: torch.Tensor, pname: str) -> torch.Tensor:
        """All experts' ``pname`` tensors ``[E, ...]`` (unsharded over etp), gathered over ep then etp."""
        t = local.detach()
        if self.etp > 1:
            parts = [torch.empty_like(t) for _ in range(self.etp)]
            dist.all_gather(parts, t.contiguous(), group=self.etp_group)
            if pname == "w_up_EFD" and self.activation == "swiglu":
                gates = torch.cat([p.chunk(2, dim=1)[0] for p in parts], dim=1)
                ups = torch.cat([p.chunk(2, dim=1)[1] for p in parts], dim=1)
                t = torch.cat([gates, ups], dim=1)
            else:
                t = torch.cat(parts, dim=1 if pname == "w_up_EFD" else 2)
        ep = rank_size(self.ep_group)[1]
        if ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=self.ep_group)
            t = torch.cat(parts, dim=0)
        return t

    def shard(self, own_E: torch.Tensor, pname: str) -> torch.Tensor:
        """This rank's ``pname`` tensor from its own experts' unsharded tensors ``[num_local, ...]``."""
        if self.etp == 1:
            return own_E
        if pname == "w_up_EFD" and self.activation == "swiglu":
            gate, up = own_E.chunk(2, dim=1)
            return torch.cat([gate.chunk(self.etp, dim=1)[self.etp_rank], up.chunk(self.etp, dim=1)[self.etp_rank]],
                             dim=1)
        return own_E.chunk(self.etp, dim=1 if pname == "w_up_EFD" else 2)[self.etp_rank]
