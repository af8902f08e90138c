"""Rank-grid golden tests: pure logic, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrain.dist.topology import FAMILIES, Layout, build_rank_grid


def L(*groups):
    return tuple(tuple(g) for g in groups)


def test_megatron_worked_example_tp2_pp2_dp2():
    grid = build_rank_grid(Layout(tp=2, pp=2, dp=2, ep=2), ranks_per_node=4)
    g = grid.groups
    assert g["tp"] == L([0, 1], [2, 3], [4, 5], [6, 7])
    assert g["dp"] == L([0, 2], [1, 3], [4, 6], [5, 7])
    assert g["pp"] == L([0, 4], [1, 5], [2, 6], [3, 7])
    assert g["ep"] == L([0, 1], [2, 3], [4, 5], [6, 7])
    assert g["edp"] == L([0, 2], [1, 3], [4, 6], [5, 7])
    assert g["etp"] == L([0], [1], [2], [3], [4], [5], [6], [7])
    assert g["embedding"] == L([0, 4], [1, 5], [2, 6], [3, 7])
    assert grid.nodes == L([0, 1, 2, 3], [4, 5, 6, 7])


def test_expert_tp_folds_ep_out_of_tp_times_dp():
    grid = build_rank_grid(Layout(tp=2, pp=2, dp=2, ep=2, etp=2), ranks_per_node=8)
    assert grid.groups["etp"] == L([0, 1], [2, 3], [4, 5], [6, 7])
    assert grid.groups["ep"] == L([0, 2], [1, 3], [4, 6], [5, 7])
    assert grid.groups["edp"] == L(*[[r] for r in range(8)])


def test_ep_larger_than_dp_is_folded_into_tp_times_dp():
    # tp=2, dp=4: EP=8 spans the whole stage although dp is only 4 (MoE parallel folding).
    grid = build_rank_grid(Layout(tp=2, pp=1, dp=4, ep=8), ranks_per_node=4)
    assert grid.groups["ep"] == L(range(8))
    assert grid.groups["edp"] == L(*[[r] for r in range(8)])
    assert grid.groups["dp"] == L([0, 2, 4, 6], [1, 3, 5, 7])


def test_sim_8rank_two_nodes_ep4():
    grid = build_rank_grid(Layout(tp=2, dp=4, ep=4), ranks_per_node=4)
    assert grid.groups["ep"] == L([0, 1, 2, 3], [4, 5, 6, 7])
    assert grid.groups["edp"] == L([0, 4], [1, 5], [2, 6], [3, 7])
    # Each EP group lives on one node: intra = the group, inter = singletons.
    assert grid.groups["ep_intra"] == grid.groups["ep"]
    assert grid.groups["ep_inter"] == L(*[[r] for r in range(8)])


def test_ep_across_two_nodes_has_intra_and_inter_subgroups():
    grid = build_rank_grid(Layout(tp=1, dp=8, ep=8), ranks_per_node=4)
    assert grid.groups["ep"] == L(range(8))
    assert grid.groups["ep_intra"] == L([0, 1, 2, 3], [4, 5, 6, 7])
    assert grid.groups["ep_inter"] == L([0, 4], [1, 5], [2, 6], [3, 7])
    assert grid.ep_is_uniform()


def test_ep_with_tp2_across_nodes():
    # tp=2 dp=4 ep=4 on 4 nodes of 2: each EP group [0,2,4,6] spans 4 nodes with one member each.
    grid = build_rank_grid(Layout(tp=2, dp=4, ep=4, etp=2), ranks_per_node=2)
    assert grid.groups["ep"] == L([0, 2, 4, 6], [1, 3, 5, 7])
    assert grid.groups["ep_intra"] == L(*[[r] for r in range(8)])
    assert grid.groups["ep_inter"] == L([0, 2, 4, 6], [1, 3, 5, 7])


def test_real_node_map_is_used_and_renumbered():
    node_of = [7, 7, 3, 3]  # launcher-reported node ids in arbitrary numbering
    grid = build_rank_grid(Layout(dp=4, ep=4), node_of=node_of)
    assert grid.nodes == L([0, 1], [2, 3])
    assert grid.groups["ep_intra"] == L([0, 1], [2, 3])
    assert grid.groups["ep_inter"] == L([0, 2], [1, 3])


def test_non_uniform_ep_nodes_detected():
    grid = build_rank_grid(Layout(dp=3, ep=3), node_of=[0, 0, 1])
    assert not grid.ep_is_uniform()


@pytest.mark.parametrize("bad", [dict(tp=0), dict(tp=2, dp=1, ep=4), dict(tp=3, dp=2, ep=4)])
def test_invalid_layouts_raise_value_error(bad):
    with pytest.raises(ValueError):
        build_rank_grid(Layout(**bad))


def test_ranks_per_node_must_divide_world():
    with pytest.raises(ValueError, match="ranks_per_node"):
        build_rank_grid(Layout(dp=4), ranks_per_node=3)


@st.composite
def layouts(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    dp = draw(st.sampled_from([1, 2, 3, 4]))
    pp = draw(st.sampled_from([1, 2, 3]))
    etp = draw(st.sampled_from([d for d in (1, 2, 4) if (tp * dp) % d == 0]))
    ep = draw(st.sampled_from([d for d in range(1, tp * dp + 1) if (tp * dp) % (d * etp) == 0]))
    world = tp * dp * pp
    rpn = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    return Layout(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp), rpn


@given(layouts())
@settings(max_examples=200, deadline=None)
def test_every_rank_once_per_family(arg):
    layout, rpn = arg
    grid = build_rank_grid(layout, ranks_per_node=rpn)
    sizes = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep, "edp": layout.edp,
             "etp": layout.etp}
    for family in FAMILIES:
        flat = sorted(r for g in grid.groups[family] for r in g)
        if family == "embedding":
            # first and last stage of each pipeline: every rank of those stages once
            assert len(set(flat)) == len(flat)
            continue
        assert flat == list(range(layout.world_size)), family
        if family in sizes:
            assert all(len(g) == sizes[family] for g in grid.groups[family]), family
    # tp groups never cross a pipeline stage; pp groups of both generators agree (asserted inside)
    for g in grid.groups["tp"]:
        assert len({grid.group_of("pp", r).index(r) for r in g}) == 1
    # the EP subgroups partition each EP group
    for g in grid.groups["ep"]:
        intra = [s for s in grid.groups["ep_intra"] if s[0] in g]
        assert sorted(r for s in intra for r in s) == list(g)
        assert all(len({grid.node_of(r) for r in s}) == 1 for s in intra)
