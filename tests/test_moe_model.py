"""Whole model with MoE blocks, trained through the real trainer: EP/TP/DP layouts equal one process.

float64, 3 optimizer steps with accumulation; losses, every first-step gradient (experts gathered by
global id) and every final parameter, for every router and for capacity and dropless routing. The
expert weight-gradient / all-to-all overlap (``moe.overlap_wgrad``, off by default on CPU) is forced on
in the router cases and in about half of the layouts; the one-process reference has no all-to-all.
"""

from __future__ import annotations

import pytest

from tests.test_model_parallel import POOL, _compare, _train

MOE = ["moe.num_experts=8", "moe.every=1", "model.kv_heads=8", "moe.d_expert=32", "moe.aux_loss_coef=0.01",
       "moe.z_loss_coef=0.001"]


def _layout(tp: int, dp: int, ep: int, sp: bool = False, rpn: int | None = None) -> list[str]:
    world = tp * dp
    rpn = rpn or POOL[world][1]
    return [f"cluster.nodes={world // rpn}", f"cluster.ranks_per_node={rpn}", f"parallel.tp={tp}",
            f"parallel.ep={ep}", f"parallel.sp={str(sp).lower()}"]


_REF: dict = {}
OVERLAP = "moe.overlap_wgrad=true"


def _reference(extra: tuple[str, ...]) -> dict:
    if extra not in _REF:
        from moetrain.launch.local import LocalRanks

        with LocalRanks(1, timeout=300) as pool:
            _REF[extra] = pool.run(_train, _layout(1, 1, 1) + MOE + list(extra))[0]
    return _REF[extra]


ROUTER_CASES = {
    "topk": ["moe.router=topk"],
    "switch": ["moe.router=switch", "moe.topk=1"],
    "gshard": ["moe.router=gshard"],
    "sigmoid": ["moe.router=sigmoid", "moe.n_groups=4", "moe.topk_groups=2", "moe.bias_update_rate=0.01"],
    "xmoe": ["moe.router=xmoe", "moe.xmoe_dim=8"],
    "softmoe": ["moe.router=softmoe", "moe.slots_per_expert=2"],
    "expert_choice": ["moe.router=expert_choice"],
    "topk-capacity-probs": ["moe.capacity_factor=1.0", "moe.drop_policy=probs"],
    "topk-capacity-position": ["moe.capacity_factor=0.75", "moe.drop_policy=position", "moe.topk=3"],
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_every_router_ep4_equals_single_process(ranks, case):
    extra = tuple(ROUTER_CASES[case])
    ref = _reference(extra)
    got = ranks(*POOL[4]).run(_train, _layout(1, 4, 4) + MOE + list(extra) + [OVERLAP])[0]
    _compare(got, ref)


@pytest.mark.parametrize("tp,dp,ep,sp,extra", [
    (1, 2, 2, False, ()),
    (1, 8, 8, False, (OVERLAP,)),
    (2, 4, 4, True, ()),                                    # EP folded across TP: tp x dp = 8 ranks
    (2, 4, 8, False, ("moe.shared_experts=1", OVERLAP)),    # ep > dp, shared expert, no SP
    (2, 2, 2, True, ("parallel.etp=2", "moe.capacity_factor=1.25")),  # expert TP
    (2, 2, 2, True, ("parallel.etp=2", OVERLAP)),
    (1, 8, 8, False, ("moe.dispatch=hier2d",)),
    (1, 8, 8, False, ("moe.dispatch=hier1d", "moe.router=gshard", OVERLAP)),
    (2, 4, 4, True, ("moe.dispatch=hier2d", OVERLAP)),     # each EP group inside one node: no inter step
    (2, 4, 4, True, ("moe.dispatch=hier1d",)),
    (1, 4, 4, False, ("train.recompute=full", OVERLAP)),  # the recomputed forward repeats the all-to-alls
    (2, 4, 4, True, ("moe.router=softmoe",)),
    (2, 4, 4, True, ("moe.router=expert_choice", "moe.activation=gelu")),
    # WTA-CRS on every linear and on the experts: the same rows are drawn in every layout
    # token-once dispatch: forced on at top-2 (gather path, weight gradients pending), hier2d with recomputation;
    # auto at top-6 of 8 on 4 ranks (on), GELU experts of 32 <= d_model / 2: the CPU expert-by-expert pass, TP + SP
    (1, 4, 4, False, ("moe.token_once=true", OVERLAP)),
    (1, 8, 8, False, ("moe.token_once=true", "moe.dispatch=hier2d", "train.recompute=full")),
    (2, 4, 4, True, ("moe.topk=6", "moe.activation=gelu")),
    (2, 4, 4, True, ("wtacrs.enabled=true", "wtacrs.keep_ratio=0.3", "wtacrs.min_rows=2",
                     "wtacrs.layers=[qkv,attn_out,mlp_up,mlp_down]", "moe.shared_experts=1", OVERLAP)),
])
def test_moe_layouts_equal_single_process(ranks, tp, dp, ep, sp, extra):
    if dp == 8:  # one sample per rank; the micro-batch is the routing group, so the reference uses it too
        extra = (*extra, "train.micro_batch_size=1")
    model_extra = tuple(x for x in extra if not x.startswith(("parallel.", "moe.token_once")) and x != OVERLAP)
    ref = _reference(model_extra)
    got = ranks(*POOL[tp * dp]).run(_train, _layout(tp, dp, ep, sp) + MOE + list(extra))[0]
    _compare(got, ref)
