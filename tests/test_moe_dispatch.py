"""Dispatch algorithms and the MoE layer under expert parallelism, on gloo ranks.

- hier2d (both phase orders) and hier1d deliver byte-identical receive buffers to flat (8 ranks = 2
  simulated nodes x 4),
  for equal and uneven splits with empty segments; combine(dispatch(x)) is the identity, gradient too.
- The layer at EP = world equals the same layer with every expert local, for every router, and under
  degenerate routings (all tokens to one expert, a rank with no tokens, k = E).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moetrain.config import MoEConfig
from moetrain.dist.groups import create_groups
from moetrain.dist.topology import Layout, build_rank_grid
from moetrain.moe.dispatch import build_plan, exchange_counts
from moetrain.moe.layer import MoEGroups, MoELayer
from moetrain.moe.routers import SparseRouting
from moetrain.moe.runtime import MoERuntime
from moetrain.registry import ROUTERS

_GROUPS: dict = {}


def _groups(world: int, rpn: int):
    key = (world, rpn)
    if key not in _GROUPS:
        _GROUPS[key] = create_groups(build_rank_grid(Layout(dp=world, ep=world), ranks_per_node=rpn))
    return _GROUPS[key]


def _dispatch_case(pattern: str, rpn: int):
    world = dist.get_world_size()
    g = _groups(world, rpn)
    me = dist.get_rank()
    E = 2 * world
    if pattern == "equal":
        counts_E = torch.full((E,), 3, dtype=torch.long)
    else:  # uneven, with empty segments
        counts_E = torch.tensor([(me * 7 + e * 3) % 5 for e in range(E)], dtype=torch.long)
    # each row tagged (source, expert, index within the source's segment)
    tags = [[me, e, i] for e, n in enumerate(counts_E.tolist()) for i in range(n)]
    rows = torch.tensor(tags, dtype=torch.float64).reshape(-1, 3)
    counts = exchange_counts(counts_E, g.group("ep"))
    out = {}
    for algo in ("flat", "hier2d", "hier1d", "hier2d_inter_first"):
        plan = build_plan(algo.removesuffix("_inter_first"), counts, g.rank("ep"), local_experts=2,
                          ep_group=g.group("ep"), intra_group=g.group("ep_intra"), inter_group=g.group("ep_inter"),
                          ranks_per_node=g.size("ep_intra"),
                          inter_first=algo.endswith("_inter_first"))
        x = rows.clone().requires_grad_()
        recv = plan.dispatch(x)
        back = plan.combine(recv * 2.0)
        (gx,) = torch.autograd.grad(back, x, torch.ones_like(back))
        out[algo] = {"recv": recv.detach(), "round_trip": torch.equal(back.detach(), rows * 2.0),
                     "grad": torch.equal(gx, torch.full_like(rows, 2.0)), "recv_counts": plan.recv_counts}
    return out


@pytest.mark.parametrize("pattern", ["equal", "uneven"])
def test_hierarchical_dispatch_is_byte_identical_to_flat(ranks, pattern):
    for rank, res in enumerate(ranks(8, 4).run(_dispatch_case, pattern, 4)):
        flat = res["flat"]["recv"]
        # flat itself: rows from every source in source order, each source's rows for my two experts
        srcs = flat[:, 0].tolist()
        assert srcs == sorted(srcs) and set(flat[:, 1].long().tolist()) <= {2 * rank, 2 * rank + 1}
        assert flat.shape[0] == int(res["flat"]["recv_counts"].sum())
        for algo in ("hier2d", "hier1d", "hier2d_inter_first"):
            assert torch.equal(res[algo]["recv"], flat), (rank, algo)
        for algo in ("flat", "hier2d", "hier1d", "hier2d_inter_first"):
            assert res[algo]["round_trip"] and res[algo]["grad"], (rank, algo)


# ------------------------------------------------------------------------------ the layer under EP
ROUTER_EXTRA = {"switch": {"topk": 1}, "gshard": {"topk": 2}, "sigmoid": {"n_groups": 2, "topk_groups": 1},
                "softmoe": {"slots_per_expert": 2}, "expert_choice": {}, "xmoe": {"xmoe_dim": 4}, "topk": {}}


def _forced(kind: str, num_tokens: int, E: int, rank: int):
    """A stub gate output for degenerate routings."""
    if kind == "all_to_one":
        tok = torch.arange(num_tokens)
        exp = torch.zeros(num_tokens, dtype=torch.long)
    elif kind == "empty_rank":
        n = 0 if rank == 1 else num_tokens
        tok = torch.arange(n)
        exp = torch.arange(n) % E
    else:
        raise ValueError(kind)
    gate = torch.linspace(0.5, 1.5, tok.numel(), dtype=torch.float64)
    return SparseRouting(tok, exp, gate, torch.zeros((), dtype=torch.float64), {"num_tokens": num_tokens})


def _layer_case(router: str, forced: str | None, k: int, capacity_factor, dispatch: str, kernels: str = "torch",
                token_once: bool = True, experts_per_rank: int = 2, info: bool = False, activation: str = "swiglu",
                d_expert: int = 6):
    """The EP layer (with ``kernels`` stages; ``token_once`` dispatch where it applies) against the all-local
    torch layer on the same tokens: {check: passed}; with ``info`` also (whether the layer took token-once
    dispatch, (rows this rank received, assignments it computed))."""
    world, rank = dist.get_world_size(), dist.get_rank()
    g = _groups(world, 2)
    E = experts_per_rank * world
    extra = dict(ROUTER_EXTRA.get(router, {}))
    args = MoEConfig(num_experts=E, topk=extra.pop("topk", k), d_expert=d_expert, router=router,
                     capacity_factor=capacity_factor, aux_loss_coef=0.1, z_loss_coef=0.01, dispatch=dispatch,
                     token_once=token_once, activation=activation, **extra)
    kw = dict(d_model=8, seed=3, sp=False, dtype=torch.float64)
    ep_layer = MoELayer(args, 0, MoEGroups(ep=g.group("ep"), ep_intra=g.group("ep_intra"),
                                           ep_inter=g.group("ep_inter")),
                        runtime=MoERuntime(fused=kernels == "fused"), **kw)
    ref_layer = MoELayer(args, 0, MoEGroups(), **kw)
    if forced:
        for layer in (ep_layer, ref_layer):
            layer.gate.forward = lambda x, b, _k=forced: _forced(_k, x.shape[0], E, rank)
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    dy = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(200 + rank), dtype=torch.float64)
    outs, rows = [], []
    ep_layer.dispatch.register_forward_hook(lambda m, a, out: rows.append((out[0].shape[0],
                                                                           int(out[1].recv_counts.sum()))))
    for layer in (ep_layer, ref_layer):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    ok = {"output": torch.allclose(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12),
          "input grad": torch.allclose(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)}
    for (name, p_ep), (_, p_ref) in zip(ep_layer.gate.named_parameters(), ref_layer.gate.named_parameters()):
        ok[f"router {name}"] = p_ep.grad is None and p_ref.grad is None or torch.allclose(
            p_ep.grad, p_ref.grad, rtol=1e-11, atol=1e-12)
    local = ep_layer.experts.experts
    for pname in ("w_up_EFD", "w_down_EDF"):
        ref_grad = getattr(ref_layer.experts.experts, pname).grad
        ref_grad = torch.zeros_like(getattr(ref_layer.experts.experts, pname)) if ref_grad is None else ref_grad.clone()
        dist.all_reduce(ref_grad)  # every rank's tokens reach the experts under EP
        mine = ref_grad[local.first:local.first + local.num_local]
        got = getattr(local, pname).grad
        got = torch.zeros_like(mine) if got is None else got
        ok[f"experts {pname}"] = torch.allclose(got, mine, rtol=1e-11, atol=1e-12)
    return (ok, (ep_layer.token_once, rows[0])) if info else ok


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_router_at_ep_world_equals_all_local(ranks, world):
    pool = ranks(world, 2 if world > 2 else 2)
    for router in ROUTERS.names():
        for token_once in (True, False, "auto"):
            res = pool.run(_layer_case, router, None, 2, None, "flat", "torch", token_once, 2, True)
            for rank, (ok, (took, _)) in enumerate(res):
                # token-once applies to every token router (soft MoE mixes tokens into slots: rows travel);
                # auto leaves top-2 of 2 experts per rank alone (a token visits 0.83-0.93 as many ranks)
                assert took == (token_once is True and not ROUTERS.get(router).mixes_tokens), router
                assert all(ok.values()), (router, token_once, rank, {k: v for k, v in ok.items() if not v})


# d_model 8: experts of up width <= 4 take the CPU expert-by-expert pass, wider ones gather -> GEMM -> sum
@pytest.mark.parametrize("world,k,cf,act,f,algo", [(2, 8, None, "gelu", 4, "flat"), (4, 6, None, "swiglu", 2, "hier2d"),
                                                   (4, 6, 0.5, "swiglu", 2, "hier1d"), (2, 8, 0.5, "gelu", 6, "flat"),
                                                   (4, 6, None, "swiglu", 6, "flat")])
def test_token_once_dispatch_is_exact_and_sends_each_token_once_per_rank(ranks, world, k, cf, act, f, algo):
    """Fine-grained top-k (8 experts per rank): the token-once layer equals the all-local layer (float64,
    outputs and every gradient), and the rows it moves are the distinct (token, rank) pairs, far fewer than
    the assignments the experts compute; the assignment-row layout moves one row per assignment. Every
    dispatch algorithm (4 ranks = 2 simulated nodes x 2 for hier2d / hier1d) carries the rows. (On CPU the
    token-once experts run expert by expert, gather -> GEMMs -> weighted scatter, with their own backward.)"""
    for token_once in (True, False, "auto"):  # auto takes it at these shapes (about 2 of 8, 3.4 of 6 ranks)
        res = ranks(world, 2).run(_layer_case, "topk", None, k, cf, algo, "torch", token_once, 8, True, act, f)
        for rank, (ok, (took, (recv_rows, assignments))) in enumerate(res):
            assert took is (token_once is not False)
            assert all(ok.values()), (token_once, rank, {k_: v for k_, v in ok.items() if not v})
            if took:
                # 8 tokens per rank reach this rank at most once from each of the world's ranks
                assert 0 < recv_rows <= 8 * world and recv_rows < assignments, (rank, recv_rows, assignments)
            else:
                assert recv_rows == assignments


@pytest.mark.parametrize("forced,k,cf,dispatch", [
    ("all_to_one", 1, None, "flat"),
    ("all_to_one", 1, None, "hier2d"),
    ("empty_rank", 1, None, "hier1d"),
    (None, 8, None, "flat"),        # k = E
    (None, 8, 0.25, "flat"),        # k = E with heavy dropping
    (None, 2, 0.1, "hier2d"),       # capacity 1
])
def test_degenerate_routings_do_not_crash_and_stay_exact(ranks, forced, k, cf, dispatch):
    for rank, ok in enumerate(ranks(4, 2).run(_layer_case, "topk", forced, k, cf, dispatch)):
        assert all(ok.values()), (rank, {k_: v for k_, v in ok.items() if not v})


def _offs(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def test_grouped_mm_paths_agree_with_per_expert_matmuls():
    """The CPU segmented loop and the ``torch._grouped_mm`` function CUDA uses (run here on CPU, where
    torch has it for fp32) against per-expert matmuls, empty experts included."""
    from moetrain.moe.experts import _GroupedMM, _SegmentedMM, grouped_mm

    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 0]
    # d = 64: segments of <= 4 rows take the CPU skinny path ((w @ x^T)^T), the 5-row one the plain one
    for dtype, d, f in ((torch.float64, 6, 4), (torch.float32, 6, 4), (torch.float32, 8, 12), (torch.float64, 64, 24)):
        x = torch.randn(9, d, generator=gen, dtype=dtype, requires_grad=True)
        w = torch.randn(5, f, d, generator=gen, dtype=dtype, requires_grad=True)  # [E, out, in]
        g = torch.randn(9, f, generator=gen, dtype=dtype)
        ref = torch.cat([s @ w[e].t() for e, s in enumerate(x.split(counts))])
        rgx, rgw = torch.autograd.grad(ref, (x, w), g)
        fns = [grouped_mm, lambda a, b, c: _SegmentedMM.apply(a, b, c, None)]
        if dtype == torch.float32 and d * 4 % 16 == 0:  # torch's CPU _grouped_mm takes fp32
            fns.append(lambda a, b, c: _GroupedMM.apply(a, b, _offs(c), None))
        for fn in fns:
            y = fn(x, w, counts)
            gx, gw = torch.autograd.grad(y, (x, w), g)
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, ref, **tol)
            torch.testing.assert_close(gx, rgx, **tol)
            torch.testing.assert_close(gw, rgw, **tol)
    # an expanded incoming gradient (from .sum()) must work on every path
    x = torch.randn(9, 8, dtype=torch.float32, requires_grad=True)
    grouped_mm(x, torch.randn(5, 12, 8, requires_grad=True), counts).sum().backward()
    assert x.grad is not None and x.grad.shape == (9, 8)
    x.grad = None
    _GroupedMM.apply(x, torch.randn(5, 12, 8, requires_grad=True), _offs(counts), None).sum().backward()
    assert x.grad is not None and x.grad.shape == (9, 8)
    empty = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    assert grouped_mm(empty, w.detach().double(), [0] * 5).grad_fn is not None


def test_fused_grouped_mm_only_gets_dtypes_its_checks_accept():
    """CUDA's ``_grouped_mm`` is only chosen for dtypes torch's own (meta) checks accept: torch 2.13 rejects
    fp32 / fp16 / fp64 there, so those take the segmented loop instead of failing on the first GPU run."""
    from moetrain.moe.experts import fused_grouped_mm_fits, grouped_mm_takes

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.empty(32, 16, dtype=dtype, device="meta")
        w = torch.empty(2, 16, 16, dtype=dtype, device="meta")
        try:
            torch._grouped_mm(x, w, offs=torch.empty(2, dtype=torch.int32, device="meta"))
            accepted = True
        except RuntimeError:
            accepted = False
        assert grouped_mm_takes(dtype) == accepted
        assert fused_grouped_mm_fits(torch.empty(4, 16, dtype=dtype), torch.empty(2, 16, 16, dtype=dtype)) == accepted
    # misaligned rows (3 bf16 = 6 bytes) never take the fused path
    bf16 = torch.bfloat16
    assert not fused_grouped_mm_fits(torch.empty(4, 3, dtype=bf16), torch.empty(2, 16, 3, dtype=bf16))


def test_pending_weight_grads_are_left_for_the_taker_on_every_grouped_mm_path():
    """With ``pending`` the experts' backward returns no weight gradient and queues it; ``take`` then
    computes exactly the gradient the immediate path gives (summed per parameter)."""
    from moetrain.moe.experts import _GroupedMM, grouped_mm
    from moetrain.parallel.weight_grad import PendingWeightGrads

    gen = torch.Generator().manual_seed(5)
    counts = [4, 0, 3]
    x = torch.randn(7, 8, generator=gen, requires_grad=True)
    w1 = torch.nn.Parameter(torch.randn(3, 12, 8, generator=gen))
    w2 = torch.nn.Parameter(torch.randn(3, 8, 12, generator=gen))
    sample_w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.0, 1.0])
    paths = {
        "segmented": lambda a, w, p: grouped_mm(a, w, counts, None, p),
        "sampled": lambda a, w, p: grouped_mm(a, w, counts, sample_w, p),
        "grouped_mm": lambda a, w, p: _GroupedMM.apply(a, w, _offs(counts), p),
    }
    for name, mm in paths.items():
        ref = torch.autograd.grad(mm(torch.relu(mm(x, w1, None)), w2, None).pow(2).sum(), (x, w1, w2))
        pending = PendingWeightGrads((w1, w2))
        gx, g1, g2 = torch.autograd.grad(mm(torch.relu(mm(x, w1, pending)), w2, pending).pow(2).sum(), (x, w1, w2),
                                         allow_unused=True, materialize_grads=False)
        assert g1 is None and g2 is None and len(pending.queue) == 2, name
        torch.testing.assert_close(gx, ref[0], rtol=0, atol=0)
        t1, t2 = pending.take()
        assert not pending.queue, name
        torch.testing.assert_close(t1, ref[1], rtol=0, atol=0)
        torch.testing.assert_close(t2, ref[2], rtol=0, atol=0)


def _overlap_case(dispatch: str):
    """The same EP layer with the weight-gradient overlap on and off: identical outputs and gradients; with
    it on the experts' weight gradients land only after the dispatch backward's all-to-all started
    (asynchronously), with it off before that (blocking) all-to-all."""
    world, rank = dist.get_world_size(), dist.get_rank()
    g = _groups(world, 2)
    args = MoEConfig(num_experts=2 * world, topk=2, d_expert=6, router="topk", aux_loss_coef=0.1, dispatch=dispatch)
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    from moetrain.parallel.weight_grad import PendingWeightGrads

    events: list[str] = []
    real_a2a, real_take = dist.all_to_all_single, PendingWeightGrads.take

    def a2a(*a, **kw):
        events.append("a2a async" if kw.get("async_op") else "a2a")
        return real_a2a(*a, **kw)

    def take(self):
        events.append("take")
        return real_take(self)

    res = {}
    dist.all_to_all_single, PendingWeightGrads.take = a2a, take
    try:
        for overlap in (False, True):
            layer = MoELayer(args, 0, MoEGroups(ep=g.group("ep"), ep_intra=g.group("ep_intra"),
                                                ep_inter=g.group("ep_inter")), d_model=8, seed=3, sp=False,
                             dtype=torch.float64)
            layer.overlap_weight_grads = overlap
            for p in layer.experts.experts.weights:
                p.register_post_accumulate_grad_hook(lambda p: events.append("expert wgrad"))
            xi = x.clone().requires_grad_()
            y = layer(xi)
            events.clear()
            y.pow(2).sum().backward()
            res[overlap] = ([y.detach(), xi.grad] + [p.grad for p in layer.parameters()], list(events))
    finally:
        dist.all_to_all_single, PendingWeightGrads.take = real_a2a, real_take
    (t_off, ev_off), (t_on, ev_on) = res[False], res[True]
    first_on = ev_on.index("expert wgrad")
    last_off = max(i for i, e in enumerate(ev_off) if e == "expert wgrad")
    return {"same tensors": all(torch.equal(a, b) for a, b in zip(t_off, t_on)),
            "on: wgrads computed while an async all-to-all is in flight": ev_on.count("take") == 1
            and "a2a async" in ev_on[:ev_on.index("take")] and ev_on.index("take") < first_on
            and ev_on.count("expert wgrad") == 2,
            "off: wgrads before the dispatch backward's all-to-all": "a2a async" not in ev_off and "take" not in ev_off
            and "a2a" in ev_off[last_off:]}


@pytest.mark.parametrize("dispatch", ["flat", "hier2d", "hier1d"])
def test_expert_weight_grads_overlap_the_dispatch_backward_exactly(ranks, dispatch):
    for rank, ok in enumerate(ranks(4, 2).run(_overlap_case, dispatch)):
        assert all(ok.values()), (rank, {k: v for k, v in ok.items() if not v})


def test_blocked_input_grad_equals_one_matmul():
    """The CPU fp32 input gradient summed over 32/64-row weight slices (incl. a ragged last slice) is the
    same product as one GEMM, alone and inside grouped_mm's backward."""
    from moetrain.moe.experts import grouped_mm, input_grad

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 1024, generator=gen)  # [O, I]: I >= 1024 and O >= 256 take the sliced path
    for rows in (5, 32, 40, 128, 200):  # 5-32 rows: 32-row slices; 40-128: 64-row slices; 200: one GEMM
        g = torch.randn(rows, 300, generator=gen)
        out = torch.empty(rows, 1024)
        input_grad(g, w, out)
        torch.testing.assert_close(out.double(), g.double() @ w.double(), rtol=1e-5, atol=1e-4)
    counts = [40, 0, 20, 200]
    x = torch.randn(sum(counts), 1024, generator=gen, requires_grad=True)
    we = torch.randn(4, 300, 1024, generator=gen, requires_grad=True)  # [E, out, in]
    gy = torch.randn(sum(counts), 300, generator=gen)
    (gx,) = torch.autograd.grad(grouped_mm(x, we, counts), x, gy)
    ref = torch.cat([s.double() @ we[e].detach().double() for e, s in enumerate(gy.split(counts))])
    torch.testing.assert_close(gx.double(), ref, rtol=1e-5, atol=1e-4)


def test_expert_weight_grad_storage_reused_only_when_free():
    """The stacked expert weight's gradient reuses last step's storage after zero_grad(set_to_none=True),
    never while the old gradient is still referenced (accumulation, a kept reference)."""
    from moetrain.moe.experts import grouped_mm

    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(3, 5, 4, generator=gen, dtype=torch.float64))
    counts = [2, 0, 3]
    xs = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]

    def ref_grad(x):
        wr = w.detach().clone().requires_grad_()
        torch.cat([s @ wr[e].t() for e, s in enumerate(x.split(counts))]).pow(2).sum().backward()
        return wr.grad

    def step(x):
        grouped_mm(x, w, counts).pow(2).sum().backward()

    step(xs[0])
    ptr = w.grad.untyped_storage().data_ptr()
    torch.testing.assert_close(w.grad, ref_grad(xs[0]))
    w.grad = None
    step(xs[1])  # reused storage, right values (expert 1 has no rows: its slice must be zeroed)
    assert w.grad.untyped_storage().data_ptr() == ptr
    torch.testing.assert_close(w.grad, ref_grad(xs[1]))
    kept = w.grad
    w.grad = None
    step(xs[2])  # the old gradient is still referenced: a new block, the old values untouched
    assert w.grad.untyped_storage().data_ptr() != ptr
    torch.testing.assert_close(kept, ref_grad(xs[1]))
    torch.testing.assert_close(w.grad, ref_grad(xs[2]))
    step(xs[0])  # accumulation into a live .grad
    torch.testing.assert_close(w.grad, ref_grad(xs[2]) + ref_grad(xs[0]))
    torch.testing.assert_close(kept, ref_grad(xs[1]))


def test_permute_rows_matches_index_select_with_gradient():
    from moetrain.moe.dispatch import permute_rows

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(7, generator=gen)
    g = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    (ref,) = torch.autograd.grad(x.index_select(0, perm), x, g)
    y = permute_rows(x, perm)
    assert torch.equal(y, x[perm])
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, ref)


def test_token_once_auto_takes_it_where_it_saves_rows():
    """``moe.token_once: auto``: on where a token's experts fall on at most 3/4 as many ranks as it has experts
    (uniform routing), off for top-1 and for top-2 of 8 (0.79 on 2 ranks, 0.93 on 4)."""
    from moetrain.moe.token_once import ranks_per_token, token_once_pays

    assert ranks_per_token(128, 8, 2) == pytest.approx(2 * (1 - math.comb(64, 8) / math.comb(128, 8)))
    assert ranks_per_token(8, 2, 8) == pytest.approx(2.0)  # one expert per rank: every choice is a rank
    assert token_once_pays(128, 8, 2) and token_once_pays(64, 8, 8) and token_once_pays(256, 8, 8)
    assert not token_once_pays(256, 8, 64)  # 4 experts per rank: a token meets ~7.6 ranks
    assert not token_once_pays(8, 2, 2) and not token_once_pays(8, 2, 4) and not token_once_pays(64, 1, 2)
    assert not token_once_pays(128, 8, 1)
    # EP 1: nothing travels, whatever the setting
    cfg = MoEConfig(num_experts=16, topk=8, d_expert=4, token_once=True)
    assert MoELayer(cfg, 0, MoEGroups(), d_model=8, sp=False, dtype=torch.float64).token_once is False


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_per_expert_token_once_experts_equal_gather_grouped_gemm_weighted_sum(activation):
    """The CPU expert-by-expert path of the token-once experts stage against gather -> grouped GEMM ->
    weighted sum (float64: output, input, gate and weight gradients, an expert with no rows), and its weight
    gradients left pending (the dispatch all-to-all's backward takes them) bit-equal to the fused pass."""
    from moetrain.moe.experts import GroupedExperts
    from moetrain.moe.routers import gather_rows, weighted_token_sum
    from moetrain.moe.token_once import _ExpertsPerSegment
    from moetrain.parallel.weight_grad import PendingWeightGrads

    gen = torch.Generator().manual_seed(5)
    ex = GroupedExperts(4, 16, 12, ep_rank=0, ep_size=1, seed=2, name="e", activation=activation,
                        dtype=torch.float64)
    counts = [7, 0, 3, 9]
    row_A = torch.randint(0, 10, (sum(counts),), generator=gen)
    x = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    gate = torch.rand(sum(counts), generator=gen, dtype=torch.float64)
    dy = torch.randn(10, 16, generator=gen, dtype=torch.float64)

    def run(kind):
        xi, gi = x.clone().requires_grad_(), gate.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        pending = PendingWeightGrads(ex.weights) if kind == "pending" else None
        if kind == "reference":
            y = weighted_token_sum(ex(gather_rows(xi, row_A), counts), row_A, gi, 10)
        else:
            y = _ExpertsPerSegment.apply(xi, gi, ex.w_up_EFD, ex.w_down_EDF, row_A, counts,
                                         activation == "swiglu", pending)
        grads = torch.autograd.grad(y, (xi, gi, *ex.weights), dy, allow_unused=True)
        if pending is not None:
            assert grads[2] is None and grads[3] is None
            grads = (*grads[:2], *pending.take())
        return (y.detach(), *grads)

    ref, fused, left = run("reference"), run("fused"), run("pending")
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(left, fused))
    assert torch.equal(fused[3][1], torch.zeros_like(fused[3][1]))  # expert 1 has no rows
