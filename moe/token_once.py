"""Token-once dispatch (``moe.token_once``): each token travels once to every EP rank that holds one of its
experts, not once per assignment, and comes back as one row per (token, rank).

With fine-grained experts (top-8 of 64 or 128) most of a token's assignments land on the same few ranks:
on R ranks a token reaches :func:`ranks_per_token` of them (top-8 of 128 on 2 ranks: 2, not 8), so the
row all-to-alls, which carry ``D`` values per row, shrink by that factor each way. What travels besides
the rows is small: per assignment, the row of its token in the destination's block and its gate (the
local expert follows from the count matrix). The receiving rank expands its tokens to assignment rows in
(local expert, source) order, runs the experts, and weighs and sums each token's outputs before sending
them back; the sender adds the one row it gets from each rank. Gradients flow through the same steps
(the gates' through their all-to-all). The result equals the assignment-row dispatch up to the order of
the sum over a token's experts.

Stages, as in the layer (``order``, ``dispatch``, ``experts``, ``combine``, ``unorder``):
:class:`TokenOnceOrder` -> :class:`TokenOnceDispatch` -> :class:`TokenOnceExperts` -> ``Combine`` (the
plan's reverse all-to-all) -> :class:`TokenOnceUnorder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.moe.dispatch import Plan, exchange_counts, segments_perm
from moetrain.moe.experts import GroupedExperts, input_grad, rows_times_wt
from moetrain.moe.routers import SparseRouting, gather_rows, weighted_token_sum
from moetrain.parallel.grad_storage import fresh_grad
from moetrain.parallel.weight_grad import PendingWeightGrads, defers, weight_grad

__all__ = ["ranks_per_token", "token_once_pays", "token_once_on", "TokenOnceOrder", "TokenOnceDispatch",
           "TokenOnceExperts", "TokenOnceUnorder", "Sent", "TokenOncePlan"]


def ranks_per_token(num_experts: int, topk: int, ep: int) -> float:
    """Expected EP ranks a token's ``topk`` distinct experts fall on under uniform routing (experts split in
    contiguous blocks of E/ep): each rank is missed with probability C(E - E/ep, k) / C(E, k)."""
    local = num_experts // ep
    k = min(topk, num_experts)
    miss = math.comb(num_experts - local, k) / math.comb(num_experts, k) if k <= num_experts - local else 0.0
    return ep * (1.0 - miss)


def token_once_pays(num_experts: int, topk: int, ep: int) -> bool:
    """``moe.token_once: auto``: the rows on the wire drop to at most 3/4 (top-8 of 128 on 2 ranks: 1/4;
    top-2 of 8 on 2 ranks: 0.79, measured no faster: the two extra exchanges eat the saving)."""
    return ep > 1 and ranks_per_token(num_experts, topk, ep) <= 0.75 * min(topk, num_experts)


def token_once_on(setting, num_experts: int, topk: int, ep: int) -> bool:
    """``moe.token_once`` (``auto`` | bool) resolved for ``topk`` experts per token at this EP degree (before
    the layer's own conditions: a token router, no csrc kernels, chunk pipelining or WTA-CRS on the experts)."""
    wanted = token_once_pays(num_experts, topk, ep) if setting == "auto" else bool(setting)
    return wanted and ep > 1


@dataclass
class Sent:
    """The sender's side: which token each sent row is, and what describes its assignments."""

    token_P: torch.Tensor  # token of each sent row (rows ordered by destination member, then token)
    rows_R: torch.Tensor  # rows sent to each member
    counts_E: torch.Tensor  # assignments per global expert
    row_A: torch.Tensor  # per assignment, sorted by global expert: its token's row in the destination's block
    gate_A: torch.Tensor  # per assignment, same order: its gate (differentiable)


@dataclass
class TokenOncePlan:
    """The receiver's side of one exchange; ``combine`` sends the per-row results back."""

    rows: Plan  # moves the token rows (one "expert" per member: rows ordered by source member)
    row_A: torch.Tensor  # per received assignment in (local expert, source) order: its row of the received rows
    gate_A: torch.Tensor  # its gate
    counts: list[int]  # received assignments per local expert
    recv_counts: torch.Tensor  # [source][local expert] assignments, as a dispatch Plan reports them

    def combine(self, y_PD: torch.Tensor) -> torch.Tensor:
        return self.rows.combine(y_PD)


class TokenOnceOrder(nn.Module):
    """Pick the (destination, token) pairs and gather one row per pair; sort the assignments by expert."""

    def __init__(self, num_experts: int, ep_size: int):
        super().__init__()
        self.num_experts, self.ep_size = num_experts, ep_size
        self.local = num_experts // ep_size

    def forward(self, x_TD: torch.Tensor, routing: SparseRouting) -> tuple[torch.Tensor, Sent]:
        T = x_TD.shape[0]
        expert_A = routing.expert_A
        dest_A = torch.div(expert_A, self.local, rounding_mode="floor")
        key_P, pair_A = torch.unique(dest_A * T + routing.token_A, sorted=True, return_inverse=True)
        dest_P = torch.div(key_P, T, rounding_mode="floor")
        token_P = key_P - dest_P * T
        rows_R = torch.bincount(dest_P, minlength=self.ep_size)
        first_R = rows_R.cumsum(0) - rows_R
        perm = torch.argsort(expert_A, stable=True)
        row_A = (pair_A - first_R.index_select(0, dest_A)).index_select(0, perm)
        sent = Sent(token_P, rows_R, torch.bincount(expert_A, minlength=self.num_experts), row_A,
                    routing.gate_A.index_select(0, perm))
        return gather_rows(x_TD, token_P), sent


class TokenOnceDispatch(nn.Module):
    """One all-gather of counts; then, by the layer's dispatch algorithm (flat, hier2d, hier1d: each delivers
    rows in (source member, expert) order), the assignments' rows-in-block (ints) and gates, and the token
    rows (planned as one "expert" per member)."""

    def __init__(self, planner: nn.Module):
        super().__init__()
        self.planner = planner  # the layer's Dispatch: plan_for(counts, local_experts=...) by its algorithm
        self.group, self.local = planner.groups.ep, planner.local_experts
        self.me, self.size = rank_size(self.group)

    def forward(self, x_PD: torch.Tensor, sent: Sent,
                pending: PendingWeightGrads | None = None) -> tuple[torch.Tensor, TokenOncePlan]:
        R, L, me = self.size, self.local, self.me
        both = exchange_counts(torch.cat([sent.counts_E, sent.rows_R]), self.group)  # [src, E + R]
        counts, rows = both[:, :R * L], both[:, R * L:]
        by_assignment = self.planner.plan_for(counts, local_experts=L)
        by_row = self.planner.plan_for(rows, local_experts=1)
        with torch.no_grad():
            row_in = by_assignment.dispatch(sent.row_A)
        gate_in = by_assignment.dispatch(sent.gate_A)
        x_recv = by_row.dispatch(x_PD, pending)
        # received assignments are in (source, local expert) order; rows of source s follow earlier sources'
        recv_rows = rows[:, me]
        first = recv_rows.cumsum(0) - recv_rows
        recv_counts = by_assignment.recv_counts
        src_A = torch.repeat_interleave(torch.arange(R), recv_counts.sum(1))
        row_in = row_in + first.index_select(0, src_A).to(row_in.device)
        by_expert = segments_perm(recv_counts.tolist(), [(s, e) for e in range(L) for s in range(R)])
        by_expert = by_expert.to(row_in.device)
        plan = TokenOncePlan(by_row, row_in.index_select(0, by_expert), gate_in.index_select(0, by_expert),
                             recv_counts.sum(0).tolist(), recv_counts)
        return x_recv, plan


def _act(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _act_backward(g: torch.Tensor, h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """Gradient with respect to the pre-activation ``h`` given the gradient ``g`` of ``_act(h)``."""
    if not swiglu:
        return torch.ops.aten.gelu_backward(g, h)
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)], dim=-1)


def _through_activation(g: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, w_down: torch.Tensor,
                        swiglu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's backward down to its pre-activation, from ``g`` (its rows' output gradients, before the
    gates): (gate-weighted activation, the gates' gradient ``<g w_down, a>``, gradient of ``h``)."""
    a = _act(h, swiglu)
    ga = torch.empty_like(a)
    input_grad(g, w_down, ga)  # [n, F], before the gates
    d_gate = (ga * a).sum(dim=1)
    w = gate.to(a.dtype)[:, None]
    gh = _act_backward(ga.mul_(w), h, swiglu)
    return a.mul_(w), d_gate, gh


class _ExpertsPerSegment(torch.autograd.Function):
    """CPU: ``out[r] = sum over the assignments a of row r of gate_a * expert_a(x[r])`` computed expert by
    expert, each expert's rows gathered, multiplied, activated, multiplied and scattered back while they are
    in cache. The ``[assignments, D]`` buffers of gather -> grouped GEMM -> weighted sum (each written and read
    once through memory) never exist; only the ``[assignments, F]`` pre-activations are kept for backward,
    whose loop likewise gathers each expert's output gradients and scatters its input gradients, and
    computes the weight gradients in the same pass unless they are deferred (zero-bubble, or left pending
    for the dispatch all-to-all's backward: then they are a second pass)."""

    @staticmethod
    def forward(ctx, x_PD, gate_A, w_up, w_down, row_A, counts, swiglu, pending):
        out = torch.zeros_like(x_PD)
        h_AF = x_PD.new_empty(row_A.numel(), w_up.shape[1])
        for e, (rows, hs, gs) in enumerate(zip(row_A.split(counts), h_AF.split(counts),
                                               gate_A.split(counts))):
            if not rows.numel():
                continue
            rows_times_wt(x_PD.index_select(0, rows), w_up[e], hs)
            y = torch.mm(_act(hs, swiglu), w_down[e].t())
            out.index_add_(0, rows, y.mul_(gs.to(y.dtype)[:, None]))
        ctx.save_for_backward(x_PD, gate_A, w_up, w_down, row_A, h_AF)
        ctx.counts, ctx.swiglu, ctx.pending, ctx.params = counts, swiglu, pending, (w_up, w_down)
        return out

    @staticmethod
    def backward(ctx, g_PD):
        x_PD, gate_A, w_up, w_down, row_A, h_AF = ctx.saved_tensors
        counts, swiglu = ctx.counts, ctx.swiglu
        g_PD = g_PD.contiguous()
        p_up, p_down = ctx.params
        fused = not (defers(p_up, ctx.pending) or defers(p_down, ctx.pending))
        gx = torch.zeros_like(x_PD)
        ggate = torch.empty(row_A.numel(), dtype=x_PD.dtype, device=x_PD.device)
        gw_up = fresh_grad(p_up) if fused else None
        gw_down = fresh_grad(p_down) if fused else None
        parts = zip(row_A.split(counts), h_AF.split(counts), gate_A.split(counts), ggate.split(counts))
        for e, (rows, hs, gs, ggs) in enumerate(parts):
            if not rows.numel():
                if fused:
                    gw_up[e].zero_()
                    gw_down[e].zero_()
                continue
            g = g_PD.index_select(0, rows)  # [n, D]: each assignment's output gradient (before its gate)
            a_w, d_gate, gh = _through_activation(g, hs, gs, w_down[e], swiglu)
            ggs.copy_(d_gate)
            gxs = torch.empty_like(g)
            input_grad(gh, w_up[e], gxs)
            gx.index_add_(0, rows, gxs)
            if fused:
                torch.mm(g.t(), a_w, out=gw_down[e])
                torch.mm(gh.t(), x_PD.index_select(0, rows), out=gw_up[e])
        if not fused:
            saved, memo = (g_PD, x_PD, gate_A, row_A, h_AF, counts, swiglu, w_up, w_down), []

            def both(i: int) -> torch.Tensor:  # one pass computes both; whichever is asked first runs it
                if not memo:
                    memo.extend(_weight_grads(*saved))
                return memo[i]

            gw_up = weight_grad(p_up, lambda: both(0), ctx.pending)
            gw_down = weight_grad(p_down, lambda: both(1), ctx.pending)
        return gx, ggate.to(gate_A.dtype), gw_up, gw_down, None, None, None, None


def _weight_grads(g_PD, x_PD, gate_A, row_A, h_AF, counts, swiglu, w_up, w_down):
    """The experts' weight gradients as a pass of their own (when deferred)."""
    gw_up, gw_down = torch.zeros_like(w_up), torch.zeros_like(w_down)
    for e, (rows, hs, gs) in enumerate(zip(row_A.split(counts), h_AF.split(counts), gate_A.split(counts))):
        if not rows.numel():
            continue
        g = g_PD.index_select(0, rows)
        a_w, _, gh = _through_activation(g, hs, gs, w_down[e], swiglu)
        torch.mm(g.t(), a_w, out=gw_down[e])
        torch.mm(gh.t(), x_PD.index_select(0, rows), out=gw_up[e])
    return gw_up, gw_down


class TokenOnceExperts(nn.Module):
    """Expand received tokens to their assignments (by local expert), run the experts, weigh and sum each
    received token's outputs: one row per received token. On CPU with narrow experts in one pass per expert
    (:class:`_ExpertsPerSegment`, see :meth:`per_expert`); elsewhere gather -> grouped GEMM -> weighted sum."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.experts = experts

    def per_expert(self, x_recv: torch.Tensor) -> bool:
        """Whether the expert-by-expert pass runs: on CPU, no expert TP, WTA-CRS or autocast, and experts no wider than
        half the model (their up width): there the ``[assignments, D]`` traffic it saves outweighs the
        ``[assignments, F]`` work it adds (activation recomputed, gate gradient over F). Measured on 2 gloo
        ranks: 1.2x the gather path's experts stage at D 512 / F 128 and 256 top-8, 0.9x at F 1024 top-2."""
        ex = self.experts
        return (not x_recv.is_cuda and ex.etp == 1 and not (ex.sample_up or ex.sample_down)
                and not torch.is_autocast_enabled(x_recv.device.type)  # bf16 autocast: the grouped path's casts
                and 2 * ex.w_up_EFD.shape[1] <= x_recv.shape[1])

    def forward(self, x_recv: torch.Tensor, plan: TokenOncePlan,
                pending: PendingWeightGrads | None = None) -> torch.Tensor:
        ex = self.experts
        if self.per_expert(x_recv):
            return _ExpertsPerSegment.apply(x_recv, plan.gate_A, ex.w_up_EFD, ex.w_down_EDF, plan.row_A,
                                            plan.counts, ex.activation == "swiglu", pending)
        y_AD = ex(gather_rows(x_recv, plan.row_A), plan.counts, None, pending)
        return weighted_token_sum(y_AD, plan.row_A, plan.gate_A, x_recv.shape[0])


class TokenOnceUnorder(nn.Module):
    """Each token's output: the sum of the rows that came back for it (one per rank it went to)."""

    def forward(self, y_PD: torch.Tensor, sent: Sent, num_tokens: int) -> torch.Tensor:
        return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add(0, sent.token_P, y_PD)
