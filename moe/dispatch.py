"""Dispatch and combine: move expert-sorted rows to the ranks that own the experts, and back.

Every algorithm compiles to a :class:`Plan`, a list of steps (uneven all-to-all in a group, or a local
row permutation) computed from the count matrix ``C[src, e]`` (rows that EP member ``src`` sends to
global expert ``e``), which one all-gather of per-expert counts gives every member. ``dispatch`` runs
the steps forward; ``combine`` runs them backward with splits swapped and permutations inverted.
All three algorithms deliver byte-identical receive buffers: rows ordered by (source member, local
expert), each segment in the sender's order.

- ``flat``: one all-to-all in the EP group.
- ``hier2d`` (Tutel's 2D): regroup rows by destination local index, all-to-all inside the node
  (``ep_intra``), regroup by destination node, all-to-all among same-local-index peers (``ep_inter``).
  Needs the same number of EP members on every node. ``inter_first`` runs the two phases the other way
  round (same volumes and message counts): all-to-all among same-local-index peers first, then inside
  the destination node. Alone the order changes nothing; chunk-pipelined it decides which link idles
  while the first chunk's first phase and the last chunk's last phase run, so the pipelined path puts
  the slower link first (moe/tuning.py).
- ``hier1d``: gather everything to the node leader (``ep_intra``), exchange among leaders
  (``ep_inter`` of local index 0), scatter from the leader.

Weight gradients in flight: given a :class:`~parallel.weight_grad.PendingWeightGrads` over the experts'
weights, the dispatch's last all-to-all (the first exchange of the backward) starts its backward
exchange asynchronously, computes the experts' weight gradients the experts' backward left pending,
then waits: the exchange needs only the experts' input gradients, so the weight-gradient GEMMs hide it.

The algorithms are registered by name in :data:`moetrain.registry.DISPATCHERS` (``moe.dispatch``): each is
a function from a :class:`Counts` view (the count matrix and where this member sits) to a list of
:class:`Step` s; a new algorithm only has to deliver the same receive buffer.

Members of an EP group are its ranks in ascending order, which is node-major (ranks of a node are
contiguous), so member m lives on node m // L at local index m % L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.dist.groups import rank_size
from moetrain.parallel.weight_grad import PendingWeightGrads
from moetrain.registry import DISPATCHERS

__all__ = ["all_to_all", "Plan", "Step", "Counts", "build_plan", "exchange_counts", "segments_perm", "permute_rows",
           "inverse_permutation", "flat_steps", "hier2d_steps", "hier1d_steps"]


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group, async_op: bool = False):
    """``all_to_all_single`` of ``x`` (``send[j]`` rows to member j, ``recv[j]`` from it) into a new buffer:
    ``(out, work)``, ``work`` None unless ``async_op``."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                                  group=group, async_op=async_op)
    return out, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)[0]

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.recv, ctx.send, ctx.group)[0], None, None, None


class _AllToAllTakingWeightGrads(torch.autograd.Function):
    """``_AllToAll`` that also stands for ``pending.params``: its backward runs the pending weight
    gradients while its own exchange is in flight and returns them as theirs."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, pending: PendingWeightGrads, *params):
        ctx.send, ctx.recv, ctx.group, ctx.pending = send, recv, group, pending
        return _exchange(x, send, recv, group)[0]

    @staticmethod
    def backward(ctx, g):
        out = work = None
        if ctx.needs_input_grad[0]:
            out, work = _exchange(g, ctx.recv, ctx.send, ctx.group, async_op=True)
        grads = ctx.pending.take()
        if work is not None:
            work.wait()
        return (out, None, None, None, None, *grads)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``: gathering by it undoes gathering by ``perm``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm):
        ctx.save_for_backward(perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (perm,) = ctx.saved_tensors
        return g.index_select(0, inverse_permutation(perm)), None


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm`` of the rows. Its backward gathers by the inverse
    permutation, where ``index_select``'s own backward zero-fills a buffer and scatter-adds into it."""
    assert perm.numel() == x.shape[0], "permute_rows needs a permutation of all rows"
    return _PermuteRows.apply(x, perm.to(x.device))


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group,
               pending: PendingWeightGrads | None = None) -> torch.Tensor:
    """Uneven all-to-all with autograd (backward is the same exchange reversed); with ``pending`` the
    backward computes those weight gradients while its exchange is in flight."""
    if len(send) != dist.get_world_size(group) or len(recv) != len(send):
        raise ValueError(f"split lists of length {len(send)}/{len(recv)} for a group of {dist.get_world_size(group)}")
    if sum(send) != x.shape[0]:
        raise ValueError(f"send splits sum to {sum(send)} but the buffer has {x.shape[0]} rows")
    if pending is not None:
        return _AllToAllTakingWeightGrads.apply(x, list(send), list(recv), group, pending, *pending.params)
    return _AllToAll.apply(x, list(send), list(recv), group)


def exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """``C[src, e]`` over the EP group from each member's per-expert send counts (one all-gather).

    ``group=None`` means a single-member group (never WORLD, as it would in torch)."""
    n = rank_size(group)[1]
    if n == 1:
        return counts_E.view(1, -1).cpu()
    out = [torch.empty_like(counts_E) for _ in range(n)]
    dist.all_gather(out, counts_E.contiguous(), group=group)
    return torch.stack(out).cpu()


@dataclass
class Step:
    """One step of a plan: an uneven all-to-all in ``group`` (``send`` / ``recv`` rows per member) or a
    local row permutation (``index``: out = x[index])."""

    kind: str  # "a2a" | "perm"
    group: object = None
    send: list[int] | None = None
    recv: list[int] | None = None
    index: torch.Tensor | None = None  # perm: out = x[index]


def segments_perm(sizes: list[list[int]], order: list[tuple[int, int]]) -> torch.Tensor:
    """Index that re-concatenates a buffer made of segments ``sizes[a][b]`` (a-major) in ``order``."""
    starts, off = {}, 0
    for a, row in enumerate(sizes):
        for b, n in enumerate(row):
            starts[(a, b)] = (off, n)
            off += n
    parts = [torch.arange(starts[k][0], starts[k][0] + starts[k][1]) for k in order]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class Plan:
    """Steps that carry expert-sorted rows to their experts (``dispatch``) and back (``combine``)."""

    def __init__(self, steps: list[Step], recv_counts: torch.Tensor):
        # an exchange within a single-member group (group None: e.g. the inter-node step of an EP group
        # that lives on one node) moves nothing; None must never reach torch, where it means WORLD
        for st in steps:
            if st.kind == "a2a" and st.group is None:
                assert len(st.send) == 1 and st.send == st.recv, "a2a without a group must be a no-op"
        self.steps = [st for st in steps if not (st.kind == "a2a" and st.group is None)]
        self.recv_counts = recv_counts  # [members, local experts]: rows received, by source and expert

    @property
    def exchanges(self) -> bool:
        """Whether the plan moves rows between ranks at all (not with one EP member)."""
        return any(st.kind == "a2a" for st in self.steps)

    def dispatch(self, x: torch.Tensor, pending: PendingWeightGrads | None = None) -> torch.Tensor:
        """Run the steps; ``pending`` rides on the last all-to-all (the backward's first, see the module
        docstring); without any all-to-all it is ignored, and the caller must not leave work on it."""
        last = max((i for i, st in enumerate(self.steps) if st.kind == "a2a"), default=-1)
        for i, st in enumerate(self.steps):
            if st.kind == "a2a":
                x = all_to_all(x, st.send, st.recv, st.group, pending if i == last else None)
            else:
                x = permute_rows(x, st.index)
        return x

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        for st in reversed(self.steps):
            if st.kind == "a2a":
                y = all_to_all(y, st.recv, st.send, st.group)
            else:
                y = permute_rows(y, inverse_permutation(st.index))
        return y


@dataclass(frozen=True)
class Counts:
    """What a dispatch algorithm plans from: member ``me``'s view of the EP group's row counts.

    ``c[src][dst]``: rows EP member ``src`` sends to member ``dst``; members are node-major, so member
    ``m`` is on node ``m // per_node`` at local index ``m % per_node`` (:meth:`member`)."""

    c: list[list[int]]
    me: int
    per_node: int
    ep_group: object = None
    intra_group: object = None
    inter_group: object = None
    inter_first: bool = False

    @property
    def members(self) -> int:
        return len(self.c)

    @property
    def nodes(self) -> int:
        return self.members // self.per_node

    def member(self, node: int, local: int) -> int:
        return node * self.per_node + local


def flat_steps(k: Counts) -> list[Step]:
    """One all-to-all in the EP group."""
    c, me, n = k.c, k.me, k.members
    return [Step("a2a", k.ep_group, [c[me][d] for d in range(n)], [c[s][me] for s in range(n)])]


def hier2d_steps(k: Counts) -> list[Step]:
    """Tutel's 2D all-to-all: inside the node, then among same-local-index peers (``inter_first``: the
    other way round)."""
    c, me, L, N, m = k.c, k.me, k.per_node, k.nodes, k.member
    a, i = divmod(me, L)
    if k.inter_first:
        return [
            # my rows are [dst node][dst local]: each node's block goes to my same-local-index peer there
            Step("a2a", k.inter_group, [sum(c[me][m(nn, j)] for j in range(L)) for nn in range(N)],
                 [sum(c[m(src_node, i)][m(a, j)] for j in range(L)) for src_node in range(N)]),
            # received [src node][dst local]; regroup to [dst local][src node]
            Step("perm", index=segments_perm([[c[m(sn, i)][m(a, j)] for j in range(L)] for sn in range(N)],
                                              [(sn, j) for j in range(L) for sn in range(N)])),
            Step("a2a", k.intra_group, [sum(c[m(sn, i)][m(a, j)] for sn in range(N)) for j in range(L)],
                 [sum(c[m(sn, s)][me] for sn in range(N)) for s in range(L)]),
            # received [src local][src node]; regroup to member order [src node][src local]
            Step("perm", index=segments_perm([[c[m(sn, s)][me] for sn in range(N)] for s in range(L)],
                                              [(s, sn) for sn in range(N) for s in range(L)])),
        ]
    return [
        # my rows are [dst node][dst local]; regroup to [dst local][dst node]
        Step("perm", index=segments_perm([[c[me][m(nn, j)] for j in range(L)] for nn in range(N)],
                                          [(nn, j) for j in range(L) for nn in range(N)])),
        Step("a2a", k.intra_group, [sum(c[me][m(nn, j)] for nn in range(N)) for j in range(L)],
             [sum(c[m(a, s)][m(nn, i)] for nn in range(N)) for s in range(L)]),
        # received [src local][dst node]; regroup to [dst node][src local]
        Step("perm", index=segments_perm([[c[m(a, s)][m(nn, i)] for nn in range(N)] for s in range(L)],
                                          [(s, nn) for nn in range(N) for s in range(L)])),
        Step("a2a", k.inter_group, [sum(c[m(a, s)][m(nn, i)] for s in range(L)) for nn in range(N)],
             [sum(c[m(src_node, s)][me] for s in range(L)) for src_node in range(N)]),
    ]


def hier1d_steps(k: Counts) -> list[Step]:
    """Gather to the node leader, exchange among leaders, scatter from the leader."""
    c, me, n, L, N, m = k.c, k.me, k.members, k.per_node, k.nodes, k.member
    a, i = divmod(me, L)
    total_sent = [sum(c[m(a, s)]) for s in range(L)]  # what each local member sends to the leader
    gather = Step("a2a", k.intra_group, [sum(c[me]) if j == 0 else 0 for j in range(L)],
                  total_sent if i == 0 else [0] * L)
    scatter_recv = [sum(c[m(src_node, s)][me] for src_node in range(N) for s in range(L)) if j == 0 else 0
                    for j in range(L)]
    if i != 0:
        return [gather, Step("a2a", k.intra_group, [0] * L, scatter_recv)]
    # leader: buffer is [src local][dst member]; regroup to [dst node][src local][dst local]
    to_nodes = Step("perm", index=segments_perm([[c[m(a, s)][d] for d in range(n)] for s in range(L)],
                                                 [(s, m(nn, j)) for nn in range(N) for s in range(L)
                                                  for j in range(L)]))
    exchange = Step("a2a", k.inter_group,
                    [sum(c[m(a, s)][m(nn, j)] for s in range(L) for j in range(L)) for nn in range(N)],
                    [sum(c[m(src_node, s)][m(a, j)] for s in range(L) for j in range(L)) for src_node in range(N)])
    # received [src node][src local][dst local]; regroup to [dst local][src node][src local]
    sizes = [[c[m(src_node, s)][m(a, j)] for s in range(L) for j in range(L)] for src_node in range(N)]
    to_locals = Step("perm", index=segments_perm(sizes, [(src_node, s * L + j) for j in range(L)
                                                          for src_node in range(N) for s in range(L)]))
    scatter = Step("a2a", k.intra_group,
                   [sum(c[m(src_node, s)][m(a, j)] for src_node in range(N) for s in range(L)) for j in range(L)],
                   scatter_recv)
    return [gather, to_nodes, exchange, to_locals, scatter]


def build_plan(algo: str, counts: torch.Tensor, me: int, *, local_experts: int, ep_group, intra_group=None,
               inter_group=None, ranks_per_node: int = 0, inter_first: bool = False) -> Plan:
    """The plan for member ``me`` given ``counts[src, e]`` (all members' per-expert send counts), by the
    algorithm registered as ``algo`` (:data:`moetrain.registry.DISPATCHERS`).

    ``inter_first`` (hier2d only): the inter-node phase before the intra-node one."""
    n = counts.shape[0]
    recv_counts = counts[:, me * local_experts:(me + 1) * local_experts]
    if n == 1:
        return Plan([], recv_counts)
    L = ranks_per_node if algo != "flat" else n
    if L < 1 or n % L:
        raise ValueError(f"{algo} needs the same number of EP members on every node ({n} members, {L} per node)")
    c = counts.view(n, n, local_experts).sum(-1).tolist()  # c[src][dst] rows
    view = Counts(c, me, L, ep_group=ep_group, intra_group=intra_group, inter_group=inter_group,
                  inter_first=inter_first)
    return Plan(DISPATCHERS.get(algo)(view), recv_counts)
