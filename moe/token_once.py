"""Token-once dispatch (``moe.token_once``): each token travels once to every EP rank that holds one of its
experts, not once per assignment, and comes back as one row per (token, rank).

With fine-grained experts (top-8 of 64 or 128) most of a token's assignments land on the same few ranks:
on R ranks a token reaches about ``R * (1 - (1 - 1/R)^k)`` of them (top-8 on 2 ranks: 2, not 8), so the
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

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.moe.dispatch import _exchange, all_to_all, exchange_counts, segments_perm
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.routers import SparseRouting, gather_rows, weighted_token_sum
from moetrain.parallel.weight_grad import PendingWeightGrads

__all__ = ["TokenOnceOrder", "TokenOnceDispatch", "TokenOnceExperts", "TokenOnceUnorder", "Sent", "TokenOncePlan"]


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

    group: object
    send_rows: list[int]
    recv_rows: list[int]
    row_A: torch.Tensor  # per received assignment in (local expert, source) order: its row of the received rows
    gate_A: torch.Tensor  # its gate
    counts: list[int]  # received assignments per local expert
    recv_counts: torch.Tensor  # [source][local expert] assignments, as a dispatch Plan reports them

    def combine(self, y_PD: torch.Tensor) -> torch.Tensor:
        return all_to_all(y_PD, self.recv_rows, self.send_rows, self.group)


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
    """One all-gather of counts, then three all-to-alls: assignment rows (ints), gates, token rows."""

    def __init__(self, group, local_experts: int):
        super().__init__()
        self.group, self.local = group, local_experts
        self.me, self.size = rank_size(group)

    def forward(self, x_PD: torch.Tensor, sent: Sent,
                pending: PendingWeightGrads | None = None) -> tuple[torch.Tensor, TokenOncePlan]:
        R, L, me = self.size, self.local, self.me
        both = exchange_counts(torch.cat([sent.counts_E, sent.rows_R]), self.group)  # [src, E + R]
        counts, rows = both[:, :R * L], both[:, R * L:]
        asg = counts.view(R, R, L).sum(-1)  # asg[src][dst]: assignments
        send_asg, recv_asg = asg[me].tolist(), asg[:, me].tolist()
        send_rows, recv_rows = rows[me].tolist(), rows[:, me].tolist()
        recv_counts = counts[:, me * L:(me + 1) * L]
        row_in = _exchange(sent.row_A, send_asg, recv_asg, self.group)[0]
        gate_in = all_to_all(sent.gate_A, send_asg, recv_asg, self.group)
        x_recv = all_to_all(x_PD, send_rows, recv_rows, self.group, pending)
        # received assignments are in (source, local expert) order; rows of source s start after earlier sources'
        first = torch.tensor(recv_rows).cumsum(0) - torch.tensor(recv_rows)
        src_A = torch.repeat_interleave(torch.arange(R), torch.tensor(recv_asg))
        row_in = row_in + first.index_select(0, src_A).to(row_in.device)
        by_expert = segments_perm(recv_counts.tolist(), [(s, e) for e in range(L) for s in range(R)])
        by_expert = by_expert.to(row_in.device)
        plan = TokenOncePlan(self.group, send_rows, recv_rows, row_in.index_select(0, by_expert),
                             gate_in.index_select(0, by_expert), recv_counts.sum(0).tolist(), recv_counts)
        return x_recv, plan


class TokenOnceExperts(nn.Module):
    """Expand received tokens to their assignments (by local expert), run the experts, weigh and sum each
    received token's outputs: one row per received token."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.experts = experts

    def forward(self, x_recv: torch.Tensor, plan: TokenOncePlan,
                pending: PendingWeightGrads | None = None) -> torch.Tensor:
        y_AD = self.experts(gather_rows(x_recv, plan.row_A), plan.counts, None, pending)
        return weighted_token_sum(y_AD, plan.row_A, plan.gate_A, x_recv.shape[0])


class TokenOnceUnorder(nn.Module):
    """Each token's output: the sum of the rows that came back for it (one per rank it went to)."""

    def forward(self, y_PD: torch.Tensor, sent: Sent, num_tokens: int) -> torch.Tensor:
        return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add(0, sent.token_P, y_PD)
