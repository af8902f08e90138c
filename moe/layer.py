"""The MoE layer: gate -> order -> dispatch -> experts -> combine -> inverse order (FSMoE's stages).

Each stage is a small ``nn.Module``, so ``register_forward_pre_hook`` / ``register_forward_hook`` on
``layer.gate``, ``layer.order``, ``layer.dispatch``, ``layer.experts``, ``layer.combine`` and
``layer.unorder`` time or wrap it, and a user can swap one for their own.

Tensor parallelism. The layer routes the whole micro-batch on every TP rank (all-gathered from the
sequence shards with SP, as a column-parallel layer does) so routing, capacity and the aux losses are
exactly those of one process. Each TP rank then computes only the assignments of its own token chunk
(its slot chunk for Soft MoE), so no expert work is duplicated; the partial outputs are summed over
TP (reduce-scatter to the sequence shards with SP, all-reduce without). Router weights therefore get
partial gradients on each TP rank (``tp_partial_grad``), and the aux loss, computed identically on all
TP ranks, enters the backward with weight 1/tp.

Expert parallelism. Experts ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` live on this rank; rows travel
with the dispatch plan of ``moe.dispatch`` (flat, hier2d or hier1d), exactly the counts each rank
needs (dropless sends no padding); with ``moe.token_once`` (``auto``: where it saves rows) a token travels
once to each rank that holds any of its experts, which weighs and sums its outputs before sending one row back
(moe/token_once.py). In backward the experts' weight gradients are computed while the
dispatch all-to-all's backward exchange is in flight (``PendingWeightGrads``, moe/dispatch.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config import MoEConfig
from moetrain.dist.groups import rank_size
from moetrain.moe import kernels
from moetrain.moe.dispatch import build_plan, exchange_counts, inverse_permutation, permute_rows, segments_perm
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.overlap import SectionTimes, pipelined_experts
from moetrain.moe.routers import Routing, SparseRouting, gather_rows, weighted_token_sum
from moetrain.moe.runtime import MoERuntime
from moetrain.moe.token_once import (
    TokenOnceDispatch,
    TokenOnceExperts,
    TokenOnceOrder,
    TokenOnceUnorder,
    token_once_on,
)
from moetrain.parallel.mappings import copy_to_tp, gather_from_sp, reduce_from_tp, reduce_scatter_to_sp
from moetrain.parallel.rng import init_normal, stream_seed
from moetrain.parallel.weight_grad import PendingWeightGrads
from moetrain.parallel.wtacrs import WTACRSConfig, budget, draw_sample, sampling_probs
from moetrain.registry import ROUTERS

__all__ = ["MoEGroups", "MoELayer"]


@dataclass
class MoEGroups:
    """The process groups the layer needs; None means a single rank."""

    tp: object = None
    ep: object = None
    ep_intra: object = None
    ep_inter: object = None
    etp: object = None

    @staticmethod
    def from_parallel(groups) -> MoEGroups:
        """The layer's view of a :class:`~moetrain.dist.groups.ParallelGroups`."""
        return MoEGroups(**{name: groups.get(name) for name in ("tp", "ep", "ep_intra", "ep_inter", "etp")})


class _AuxLoss(torch.autograd.Function):
    """Identity on ``out`` whose backward also gives ``aux`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, g.new_full(ctx.aux_shape, ctx.scale), None


class Gate(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, x_TD: torch.Tensor, batch: int) -> Routing:
        return self.router(x_TD, batch)


class Order(nn.Module):
    """Sort assignment rows by global expert (= by destination rank, then local expert)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor, routing: Routing):
        perm = torch.argsort(routing.expert_A, stable=True)
        counts_E = torch.bincount(routing.expert_A, minlength=self.num_experts)
        if isinstance(routing, SparseRouting):  # one gather of the tokens, straight into sorted order
            return gather_rows(x_TD, routing.token_A.index_select(0, perm)), counts_E, perm
        return permute_rows(routing.rows(x_TD), perm), counts_E, perm


def _assignment_table(routing: SparseRouting, num_experts: int) -> tuple[torch.Tensor, int]:
    """Flat slot ``t * K + k`` of each assignment, and K (the expert id stands in for k when the router
    gives no choice index: expert choice, where a token meets each expert at most once)."""
    if routing.choice_A is None:
        K, choice = num_experts, routing.expert_A
    else:
        K, choice = routing.num_choices, routing.choice_A
    return routing.token_A * K + choice, K


class FusedOrder(nn.Module):
    """Order through the csrc kernels: each kept assignment's row in the expert-sorted buffer (the stable
    sort's order) from a per-expert rank, then one packing pass ``rows[pos[t, k]] = x[t]``."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: torch.Tensor, routing: SparseRouting):
        T = x_TD.shape[0]
        slot_A, K = _assignment_table(routing, self.num_experts)
        expert_TK = torch.zeros(T * K, dtype=torch.int32, device=x_TD.device)
        expert_TK[slot_A] = routing.expert_A.to(torch.int32)
        keep_TK = torch.zeros(T * K, dtype=torch.bool, device=x_TD.device)
        keep_TK[slot_A] = True
        pos_TK, counts_E = kernels.positions(expert_TK.view(T, K), keep_TK.view(T, K), self.num_experts)
        rows_sorted = kernels.pack_rows(x_TD, pos_TK, routing.expert_A.numel())
        return rows_sorted, counts_E, pos_TK


class FusedInverseOrder(nn.Module):
    """``y[t] = sum_k gate[t, k] y_sorted[pos[t, k]]`` in one pass (gradients for rows and gates)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, y_sorted: torch.Tensor, pos_TK: torch.Tensor, routing: SparseRouting,
                num_tokens: int) -> torch.Tensor:
        slot_A, K = _assignment_table(routing, self.num_experts)
        gate_TK = routing.gate_A.new_zeros(num_tokens * K).index_put((slot_A,), routing.gate_A)
        return kernels.combine_rows(y_sorted, pos_TK, gate_TK.view(num_tokens, K))


class Dispatch(nn.Module):
    """Exchange counts, build the plan, send rows to their experts' ranks."""

    def __init__(self, algo: str, groups: MoEGroups, local_experts: int):
        super().__init__()
        self.algo, self.groups, self.local_experts = algo, groups, local_experts
        self.me = rank_size(groups.ep)[0]
        self.per_node = rank_size(groups.ep_intra)[1]

    def plan_for(self, counts: torch.Tensor, inter_first: bool = False, local_experts: int | None = None):
        """The plan that moves rows with count matrix ``counts[src, e]`` (all EP members); ``inter_first``:
        hier2d's inter-node phase first (the chunk-pipelined path, when the inter link is the slower);
        ``local_experts``: columns per member of ``counts`` (default: the layer's local experts)."""
        local = self.local_experts if local_experts is None else local_experts
        return build_plan(self.algo, counts, self.me, local_experts=local, ep_group=self.groups.ep,
                          intra_group=self.groups.ep_intra, inter_group=self.groups.ep_inter,
                          ranks_per_node=self.per_node, inter_first=inter_first)

    def forward(self, rows_sorted: torch.Tensor, counts_E: torch.Tensor, pending: PendingWeightGrads | None = None):
        plan = self.plan_for(exchange_counts(counts_E, self.groups.ep))
        return plan.dispatch(rows_sorted, pending), plan


class ExpertStage(nn.Module):
    """Regroup received rows from (source, expert) to (expert, source) order, run the experts, regroup back."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.experts = experts

    def forward(self, recv: torch.Tensor, plan, sample_w: torch.Tensor | None = None,
                pending: PendingWeightGrads | None = None) -> torch.Tensor:
        rc = plan.recv_counts.tolist()  # [source][local expert]
        n_src, n_loc = len(rc), self.experts.num_local
        by_expert = segments_perm(rc, [(s, e) for e in range(n_loc) for s in range(n_src)])
        counts = [sum(rc[s][e] for s in range(n_src)) for e in range(n_loc)]
        if n_src == 1 or n_loc == 1:  # (source, expert) order is already expert order
            return self.experts(recv, counts, sample_w, pending)
        w = None if sample_w is None else sample_w.index_select(0, by_expert)
        y = self.experts(permute_rows(recv, by_expert), counts, w, pending)
        return permute_rows(y, inverse_permutation(by_expert))


@dataclasses.dataclass
class _RecvCounts:
    recv_counts: torch.Tensor  # [source][local expert], what ExpertStage needs of a plan


class Combine(nn.Module):
    def forward(self, y_recv: torch.Tensor, plan) -> torch.Tensor:
        return plan.combine(y_recv)


class InverseOrder(nn.Module):
    """Undo the expert sort and sum each token's expert outputs with their gate weights."""

    def forward(self, y_sorted: torch.Tensor, perm: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
        if isinstance(routing, SparseRouting):  # weigh and sum straight from sorted order
            return weighted_token_sum(y_sorted, routing.token_A.index_select(0, perm),
                                      routing.gate_A.index_select(0, perm), num_tokens)
        return routing.combine(permute_rows(y_sorted, inverse_permutation(perm)), num_tokens)


class MoELayer(nn.Module):
    """Drop-in feed-forward: ``[s(/tp), b, d] -> [s(/tp), b, d]``.

    ``cfg`` is the ``moe`` config section (``d_expert`` resolved); ``d_model``, ``layer``, ``num_layers`` and
    ``seed`` place it in its model (parameter names, init streams); ``streams`` are the model's per-token
    random streams (stochastic routers); ``runtime`` holds the run's collaborators (aux-loss weight,
    fused kernels, the chunk-pipelined path's link engine, degree tuner and gradient window); ``shared``
    is the shared-expert MLP (``moe.shared_experts > 0``), added to the routed output. ``wtacrs``: the
    experts' up / down weight gradients (``wtacrs_sites`` mlp_up / mlp_down) are WTA-CRS estimates, sampled
    per expert over the micro-batch's assignments at routing time (so every layout draws the same rows).
    """

    def __init__(self, cfg: MoEConfig, layer: int, groups: MoEGroups, *, d_model: int, sp: bool,
                 dtype: torch.dtype, seed: int = 0, num_layers: int = 1, streams=None,
                 runtime: MoERuntime | None = None, shared: nn.Module | None = None,
                 wtacrs: WTACRSConfig | None = None, wtacrs_sites: tuple[str, ...] = ()):
        super().__init__()
        if cfg.d_expert is None:
            raise ValueError("MoELayer needs moe.d_expert (JobConfig fills it from model.d_ffn)")
        runtime = runtime or MoERuntime()
        self.cfg, self.layer, self.groups, self.d_model = cfg, layer, groups, d_model
        self.tp_rank, self.tp_size = rank_size(groups.tp)
        self.sp = sp and self.tp_size > 1
        ep_rank, ep_size = rank_size(groups.ep)
        name = f"layers.{layer}.moe"
        router_cls = ROUTERS.get(cfg.router)
        sample_up, sample_down = (wtacrs is not None and s in wtacrs_sites for s in ("mlp_up", "mlp_down"))
        if (sample_up or sample_down) and router_cls.mixes_tokens:
            raise ValueError(f"WTA-CRS on experts needs token routing; router {cfg.router!r} mixes tokens")
        self.wtacrs = wtacrs if (sample_up or sample_down) else None
        # soft MoE mixes tokens into slots: nothing to pack, it keeps the torch stages
        self.fused = runtime.fused and not router_cls.mixes_tokens
        router = router_cls(cfg, d_model=d_model, seed=seed, name=f"{name}.router", dtype=dtype, streams=streams,
                            fused_select=self.fused)
        for p in router.parameters():
            p.tp_partial_grad = self.tp_size > 1
        self.gate = Gate(router)
        experts = GroupedExperts(cfg.num_experts, d_model, cfg.d_expert, ep_rank=ep_rank, ep_size=ep_size,
                                 seed=seed, name=f"{name}.experts", activation=cfg.activation,
                                 etp_group=groups.etp, ep_group=groups.ep, dtype=dtype, num_layers=num_layers,
                                 sample_up=sample_up, sample_down=sample_down)
        # token-once dispatch (moe/token_once.py): one row per (token, rank) each way instead of one per assignment
        k = getattr(router, "topk", cfg.topk)  # switch / GShard fix their own
        self.token_once = (token_once_on(cfg.token_once, cfg.num_experts, k, ep_size)
                           and not self.fused and not router_cls.mixes_tokens and runtime.engine is None
                           and self.wtacrs is None)
        dispatch = Dispatch(cfg.dispatch, groups, experts.num_local)
        if self.token_once:
            self.order = TokenOnceOrder(cfg.num_experts, ep_size)
            self.dispatch = TokenOnceDispatch(dispatch)
            self.experts = TokenOnceExperts(experts)
            self.unorder = TokenOnceUnorder()
        else:
            self.order = FusedOrder(cfg.num_experts) if self.fused else Order(cfg.num_experts)
            self.dispatch = dispatch
            self.experts = ExpertStage(experts)
            self.unorder = FusedInverseOrder(cfg.num_experts) if self.fused else InverseOrder()
        self.combine = Combine()
        self.shared = shared
        self.shared_gate = None
        if cfg.shared_expert_gate:  # Qwen2-MoE: sigmoid(x w) scales the shared experts' output per token
            w = init_normal((1, d_model), 1.0 / d_model ** 0.5, seed, f"{name}.shared_gate").to(dtype)
            self.shared_gate = nn.Linear(d_model, 1, bias=False, dtype=dtype)
            self.shared_gate.weight = nn.Parameter(w)
            self.shared_gate.weight.tp_sharded = False
            self.shared_gate.weight.tp_partial_grad = self.sp  # sequence shards: each rank's tokens only
        self.aux_scale = runtime.aux_scale  # aux losses weigh like the main loss (1 / micro-batches)
        self.last_stats: dict = {}
        # chunk pipelining (moe/overlap.py): the link engine, a tuner that picks (fwd, bwd) degrees, the
        # reducer's gradient window, and the measured expert compute
        self.engine = runtime.engine
        self.tuner = runtime.tuner()
        self.release_grads = (lambda: runtime.window(getattr(self, "overlap_report", None))) \
            if runtime.window is not None else None
        self.section_times = SectionTimes()
        # the experts' weight-gradient GEMMs run while the dispatch all-to-all's backward is in flight
        # (moe/dispatch.py); None: on for CUDA inputs
        self.overlap_weight_grads: bool | None = None if cfg.overlap_wgrad == "auto" else cfg.overlap_wgrad

    def _sample_assignments(self, routing, x_TD: torch.Tensor) -> torch.Tensor:
        """WTA-CRS weight of each assignment: per expert, over its assignments, p proportional to ||x||."""

        streams = self.router.streams
        first = streams.sample_ids[0] if len(getattr(streams, "sample_ids", ())) else 0
        step = getattr(streams, "step", 0)
        norms = x_TD.detach().to(torch.float64).norm(dim=-1).cpu()
        expert_A, token_A = routing.expert_A.cpu(), routing.token_A.cpu()
        w_A = torch.zeros(expert_A.numel(), dtype=torch.float64)
        for e in range(self.cfg.num_experts):
            cand = (expert_A == e).nonzero().squeeze(-1)
            if cand.numel() == 0:
                continue
            k = budget(cand.numel(), self.wtacrs.keep_ratio, self.wtacrs.k_min)
            if k >= cand.numel():
                w_A[cand] = 1.0
                continue
            gen = torch.Generator().manual_seed(stream_seed(self.wtacrs.seed, f"wtacrs/{self.layer}.experts/{step}/"
                                                                             f"{first}/{e}"))
            sample = draw_sample(sampling_probs(norms[token_A[cand]]), k, gen)
            w_A[cand[sample.winners]] = 1.0
            w_A.index_add_(0, cand[sample.drawn], sample.scale)
        return w_A.to(x_TD.device)

    def _pipelined(self, rows_sorted: torch.Tensor, counts_E: torch.Tensor, shape: tuple) -> torch.Tensor:
        """dispatch -> experts -> combine chunked and overlapped on the link channels (moe/overlap.py)."""
        counts = exchange_counts(counts_E, self.groups.ep)
        degrees = self.tuner.degrees(shape)
        inter_first = self.tuner is not None and self.tuner.inter_first  # read after degrees(): it may reset

        def expert_fn(x: torch.Tensor, recv_counts: list[list[int]]) -> torch.Tensor:
            return self.experts(x, _RecvCounts(torch.tensor(recv_counts, dtype=torch.long)))

        return pipelined_experts(rows_sorted, counts, me=self.dispatch.me, local_experts=self.dispatch.local_experts,
                                 plan_for=functools.partial(self.dispatch.plan_for, inter_first=inter_first),
                                 engine=self.engine, expert_fn=expert_fn,
                                 degrees=degrees, tag=f"moe{self.layer}", times=self.section_times,
                                 release_grads=self.release_grads,
                                 record_shape=self.tuner.profiling or self.section_times.shape is None)

    def _sorted_weights(self, mine: SparseRouting, order: torch.Tensor) -> torch.Tensor:
        """The WTA-CRS weight of each row of the expert-sorted buffer."""
        if not self.fused:
            return mine.sample_w_A.index_select(0, order)
        slot_A, _ = _assignment_table(mine, self.cfg.num_experts)
        pos_A = order.reshape(-1)[slot_A].long()
        return mine.sample_w_A.new_empty(pos_A.numel()).index_copy(0, pos_A, mine.sample_w_A)

    def _pending(self, x_TD: torch.Tensor) -> PendingWeightGrads | None:
        """Weight gradients left for the dispatch all-to-all's backward to compute, when overlap is on."""
        overlap = x_TD.is_cuda if self.overlap_weight_grads is None else self.overlap_weight_grads
        if overlap and torch.is_grad_enabled():
            return PendingWeightGrads(self.experts.experts.weights)
        return None

    def _by_assignment(self, x_TD: torch.Tensor, mine: Routing) -> torch.Tensor:
        """One row per assignment to the experts' ranks and back (chunk-pipelined with the link engine)."""
        # order: perm (the assignment behind each sorted row), or with the kernels pos_TK (the sorted row
        # of each (token, choice))
        rows_sorted, counts_E, order = self.order(x_TD, mine)
        if self.engine is not None:
            y_sorted = self._pipelined(rows_sorted, counts_E, tuple(x_TD.shape))
        else:
            pending = self._pending(x_TD)
            recv, plan = self.dispatch(rows_sorted, counts_E, pending)
            if not plan.exchanges:  # no all-to-all to take them: the experts compute them at once
                pending = None
            recv_w = None
            if getattr(mine, "sample_w_A", None) is not None:  # the weights travel with their rows
                recv_w = plan.dispatch(self._sorted_weights(mine, order).unsqueeze(-1)).squeeze(-1)
            y_recv = self.experts(recv, plan, recv_w, pending)
            y_sorted = self.combine(y_recv, plan)
        return self.unorder(y_sorted, order, mine, x_TD.shape[0])

    def _token_once(self, x_TD: torch.Tensor, mine: SparseRouting) -> torch.Tensor:
        """One row per (token, destination rank) each way (moe/token_once.py)."""
        x_PD, sent = self.order(x_TD, mine)
        pending = self._pending(x_TD)
        x_recv, plan = self.dispatch(x_PD, sent, pending)
        y_recv = self.experts(x_recv, plan, pending)
        return self.unorder(self.combine(y_recv, plan), sent, x_TD.shape[0])

    @property
    def router(self) -> nn.Module:
        return self.gate.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.groups.tp
        x_full = gather_from_sp(x, tp) if self.sp else copy_to_tp(x, tp)
        s, b, d = x_full.shape
        T = s * b
        x_TD = x_full.reshape(T, d)
        routing = self.gate(x_TD, b)
        if self.wtacrs is not None and torch.is_grad_enabled():
            routing.sample_w_A = self._sample_assignments(routing, x_TD)
        mine = routing.subset(self.tp_rank, self.tp_size)
        if self.token_once:
            out = self._token_once(x_TD, mine).view(s, b, d)
        else:
            out = self._by_assignment(x_TD, mine).view(s, b, d)
        out = reduce_scatter_to_sp(out, tp) if self.sp else reduce_from_tp(out, tp)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if routing.aux_loss.requires_grad and torch.is_grad_enabled():
            out = _AuxLoss.apply(out, routing.aux_loss, self.aux_scale / self.tp_size)
        self.last_stats = routing.stats
        return out
