"""Router invariants (property-based) and the order/inverse-order stages, single process, float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrain.config import MoEConfig
from moetrain.moe.layer import InverseOrder, Order
from moetrain.moe.routers import (
    SparseRouting,
    build_router,
    capacity,
    capacity_keep,
    load_balancing_loss,
)


def _x(T: int, D: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _router(kind: str, E: int, k: int, D: int = 8, **kw):
    kw.setdefault("aux_loss_coef", 0.0)
    return build_router(MoEConfig(router=kind, num_experts=E, topk=k, **kw), d_model=D, dtype=torch.float64)


@given(T=st.integers(1, 40), E=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["topk", "switch", "xmoe", "sigmoid"]))
@settings(max_examples=120, deadline=None)
def test_token_choice_invariants_dropless(T, E, k, seed, kind):
    k = 1 if kind == "switch" else min(k, E)
    routing = _router(kind, E, k)(_x(T, 8, seed), batch=1)
    tok, exp, gate = routing.token_A, routing.expert_A, routing.gate_A
    assert tok.numel() == T * k  # dropless: every token gets exactly k assignments
    assert int(routing.stats["tokens_per_expert"].sum()) == T * k
    assert bool((exp >= 0).all() and (exp < E).all())
    for t in range(T):
        chosen = exp[tok == t]
        assert len(set(chosen.tolist())) == k  # k distinct experts
    assert bool((gate >= 0).all())
    sums = torch.zeros(T, dtype=gate.dtype).index_add(0, tok, gate)
    if kind in ("topk", "xmoe") or (kind == "sigmoid" and k > 1):
        torch.testing.assert_close(sums, torch.ones(T, dtype=gate.dtype))  # renormalised
    else:
        assert bool((sums <= 1 + 1e-12).all())


@given(T=st.integers(1, 40), E=st.integers(1, 10), k=st.integers(1, 4), cf=st.floats(0.1, 3.0),
       policy=st.sampled_from(["position", "probs"]), seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_capacity_is_never_exceeded_and_drops_follow_the_policy(T, E, k, cf, policy, seed):
    k = min(k, E)
    routing = _router("topk", E, k, capacity_factor=cf, drop_policy=policy)(_x(T, 8, seed), batch=1)
    cap = capacity(T, k, E, cf)
    assert cap == max(1, math.ceil(T * k * cf / E))
    kept = torch.bincount(routing.expert_A, minlength=E)
    assert bool((kept <= cap).all())
    # recompute the choices without capacity to check which ones the policy kept
    full = _router("topk", E, k)(_x(T, 8, seed), batch=1)
    logits = _x(T, 8, seed) @ _router("topk", E, k).weight.t()
    prob = logits.softmax(-1)
    kept_pairs = set(zip(routing.token_A.tolist(), routing.expert_A.tolist()))
    all_pairs = list(zip(full.token_A.tolist(), full.expert_A.tolist()))
    assert kept_pairs <= set(all_pairs)
    assert len(kept_pairs) == sum(min(int(c), cap) for c in torch.bincount(full.expert_A, minlength=E))
    choice_rank = {}
    for t in range(T):
        for r, e in enumerate(prob[t].topk(k).indices.tolist()):
            choice_rank[(t, e)] = r
    for e in range(E):
        cands = [p for p in all_pairs if p[1] == e]
        if policy == "position":  # first choices before second choices, then token order
            cands.sort(key=lambda p: (choice_rank[p], p[0]))
        else:  # highest probability first (stable: earlier candidate wins a tie)
            cands.sort(key=lambda p: -float(prob[p[0], e].detach()))
        assert {p for p in cands[:cap]} == {p for p in kept_pairs if p[1] == e}


def test_capacity_keep_golden_table():
    # 4 tokens, 2 experts, top-2, capacity 3: expert 0 is chosen by all four tokens
    expert = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    prob = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    pos = capacity_keep(expert, prob, 3, "position")
    # position, first choices before second choices: expert 0 takes t0, t1, t3 (firsts) and drops t2's
    # second choice; expert 1 takes t2 (first), then t0, t1 (seconds) and drops t3's second choice
    assert pos.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    probs = capacity_keep(expert, prob, 3, "probs")
    # probs for expert 0: 0.9 (t1), 0.8 (t3), 0.6 (t0) kept, 0.3 (t2) dropped; expert 1: 0.7, 0.4, 0.2 kept, 0.1 drop
    assert probs.tolist() == [[True, True], [True, False], [True, False], [True, True]]


def test_aux_loss_is_one_under_uniform_routing_and_larger_when_skewed():
    E, T = 4, 8
    uniform_prob = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    balanced = torch.arange(T).remainder(E).unsqueeze(1)
    assert float(load_balancing_loss(uniform_prob, balanced, E)) == pytest.approx(1.0)
    skew_prob = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64).expand(T, E)
    all_zero = torch.zeros(T, 1, dtype=torch.long)
    assert float(load_balancing_loss(skew_prob, all_zero, E)) == pytest.approx(E * 0.7)
    # with f = P (choices follow the probabilities), uniform is the minimum: E * sum p^2 >= 1
    for seed in range(5):
        p = torch.rand(E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(0)
        assert float(E * (p * p).sum()) >= 1.0 - 1e-12


def test_aux_loss_has_router_gradient_only_with_a_coefficient():
    x = _x(16, 8, 0)
    for coef, expect in ((0.0, False), (0.1, True)):
        r = _router("topk", 4, 2, aux_loss_coef=coef)
        routing = r(x, batch=1)
        assert routing.aux_loss.requires_grad == expect


def test_expert_bias_changes_selection_not_gate_values():
    x = _x(32, 8, 1)
    r = _router("sigmoid", 8, 2, bias_update_rate=0.1)
    before = r(x, batch=1)
    r.expert_bias.copy_(torch.linspace(-5, 5, 8))  # a strong preference for high experts
    after = r(x, batch=1)
    assert not torch.equal(before.expert_A, after.expert_A)
    scores = (x @ r.weight.t()).sigmoid()
    for routing in (before, after):
        picked = scores[routing.token_A, routing.expert_A].view(32, 2)
        torch.testing.assert_close(routing.gate_A.view(32, 2), picked / picked.sum(-1, keepdim=True))
    # the update pushes overloaded experts down
    r.expert_bias.zero_()
    r.load.zero_()
    with torch.enable_grad():
        r(x, batch=1)
    load = r.load.clone()
    r.update_bias()
    assert torch.equal(torch.sign(r.expert_bias), torch.sign(load.mean() - load).float())


def test_group_limited_routing_stays_inside_the_best_groups():
    r = _router("sigmoid", 8, 2, n_groups=4, topk_groups=1)
    routing = r(_x(20, 8, 3), batch=1)
    groups = (routing.expert_A // 2).view(20, 2)
    assert bool((groups[:, 0] == groups[:, 1]).all())  # one group per token


def test_expert_choice_and_softmoe_shapes():
    x = _x(12, 8, 4)
    ec = _router("expert_choice", 4, 2)(x, batch=2)
    assert ec.expert_A.numel() == 4 * math.ceil(12 * 2 / 4)
    assert torch.bincount(ec.expert_A, minlength=4).tolist() == [6, 6, 6, 6]
    soft = _router("softmoe", 4, 1, slots_per_expert=2)(x, batch=2)
    assert soft.rows(x).shape == (2 * 4 * 2, 8)
    # each token's combine weights are a distribution over its own sequence's slots
    torch.testing.assert_close(soft.combine_TA.sum(-1), torch.ones(12, dtype=torch.float64))
    assert bool((soft.combine_TA.view(6, 2, 2, 8)[:, 0, 1] == 0).all())


def test_gshard_second_expert_policy():
    x = _x(400, 8, 5)
    routing = _router("gshard", 4, 2)(x, batch=4)
    per_token = torch.bincount(routing.token_A, minlength=400)
    assert set(per_token.tolist()) <= {1, 2} and 0 < int((per_token == 1).sum()) < 400


@given(T=st.integers(1, 30), E=st.integers(1, 8), k=st.integers(1, 3), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_order_then_inverse_order_is_identity_and_matches_dense_einsum(T, E, k, seed):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    expert_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    gate_TK = torch.rand(T, k, generator=gen, dtype=torch.float64)
    routing = SparseRouting(torch.arange(T).repeat_interleave(k), expert_TK.reshape(-1), gate_TK.reshape(-1),
                            torch.zeros(()), {"num_tokens": T})
    rows_sorted, counts, perm = Order(E)(x, routing)
    torch.testing.assert_close(rows_sorted, routing.rows(x)[perm])
    assert torch.equal(counts, torch.bincount(expert_TK.reshape(-1), minlength=E))
    # rows arrive grouped by expert
    assert torch.equal(routing.expert_A[perm], torch.sort(routing.expert_A, stable=True).values)
    # identity with gates 1/k summed over the k choices; the gradient passes through unchanged
    unit = SparseRouting(routing.token_A, routing.expert_A, torch.full_like(routing.gate_A, 1.0 / k),
                         routing.aux_loss, routing.stats)
    back = InverseOrder()(rows_sorted, perm, unit, T)
    torch.testing.assert_close(back, x)
    g = torch.randn(T, 5, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(back, x, g)
    torch.testing.assert_close(gx, g)
    # sparse dispatch/combine equals the dense one-hot einsum of GShard ('te,td->ed' per slot)
    scale = torch.randn(E, generator=gen, dtype=torch.float64)  # a per-expert "expert"
    y_sorted = rows_sorted * scale[torch.sort(routing.expert_A, stable=True).values].unsqueeze(-1)
    sparse = InverseOrder()(y_sorted, perm, routing, T)
    combine_TE = torch.zeros(T, E, dtype=torch.float64).scatter(1, expert_TK, gate_TK)
    dense = torch.einsum("te,e,td->td", combine_TE, scale, x)
    torch.testing.assert_close(sparse, dense)


@given(T=st.integers(1, 30), E=st.integers(1, 8), k=st.integers(1, 3), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_order_and_inverse_order_gradients_match_dense_reference_with_dropped_assignments(T, E, k, seed):
    """Gradients of x and of the gates through order -> per-expert scale -> inverse order equal the dense
    reference's, when some tokens keep fewer than k assignments (capacity drops) or none."""
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    keep_TK = torch.rand(T, k, generator=gen) > 0.3
    scale_E = torch.randn(E, generator=gen, dtype=torch.float64)
    x0 = torch.randn(T, 5, generator=gen, dtype=torch.float64)
    gate0_TK = torch.rand(T, k, generator=gen, dtype=torch.float64)
    g = torch.randn(T, 5, generator=gen, dtype=torch.float64)

    x, gate_TK = x0.clone().requires_grad_(), gate0_TK.clone().requires_grad_()
    token_A = torch.arange(T).repeat_interleave(k)[keep_TK.reshape(-1)]
    expert_A = expert_TK.reshape(-1)[keep_TK.reshape(-1)]
    routing = SparseRouting(token_A, expert_A, gate_TK.reshape(-1)[keep_TK.reshape(-1)], torch.zeros(()),
                            {"num_tokens": T})
    rows_sorted, _, perm = Order(E)(x, routing)
    out = InverseOrder()(rows_sorted * scale_E[expert_A[perm]].unsqueeze(-1), perm, routing, T)
    gx, ggate = torch.autograd.grad(out, (x, gate_TK), g)

    xr, gate_r = x0.clone().requires_grad_(), gate0_TK.clone().requires_grad_()
    combine_TE = torch.zeros(T, E, dtype=torch.float64).scatter(1, expert_TK, gate_r * keep_TK)
    ref = torch.einsum("te,e,td->td", combine_TE, scale_E, xr)
    gx_ref, ggate_ref = torch.autograd.grad(ref, (xr, gate_r), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(ggate, ggate_ref)
