"""Process groups built from the topology carry correct collectives on 4 and 8 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moetrain.dist.groups import create_groups
from moetrain.dist.topology import Layout, build_rank_grid

_GROUP_CACHE: dict = {}


def _groups(layout: Layout, rpn: int):
    key = (layout, rpn)
    if key not in _GROUP_CACHE:
        _GROUP_CACHE[key] = create_groups(build_rank_grid(layout, ranks_per_node=rpn))
    return _GROUP_CACHE[key]


def _collectives_per_family(layout: Layout, rpn: int) -> dict:
    """Rank-valued all-reduce and all-gather in every family; returns what this rank observed."""
    g = _groups(layout, rpn)
    rank = dist.get_rank()
    seen = {}
    for family, pg in g.groups.items():
        t = torch.tensor([float(rank + 1)], dtype=torch.float64)
        dist.all_reduce(t, group=pg)
        out = [torch.empty(1, dtype=torch.float64) for _ in range(dist.get_world_size(pg))]
        dist.all_gather(out, torch.tensor([float(rank)], dtype=torch.float64), group=pg)
        seen[family] = (t.item(), [int(x.item()) for x in out])
    return seen


LAYOUTS_4 = [Layout(tp=2, dp=2, ep=2), Layout(tp=1, dp=4, ep=4), Layout(tp=2, pp=2, dp=1)]
LAYOUTS_8 = [Layout(tp=2, pp=2, dp=2, ep=2), Layout(tp=2, dp=4, ep=4), Layout(tp=1, dp=8, ep=8),
             Layout(tp=2, dp=4, ep=4, etp=2)]


@pytest.mark.parametrize("world,rpn,layout", [(4, 2, x) for x in LAYOUTS_4] + [(8, 4, x) for x in LAYOUTS_8])
def test_group_collectives_match_grid(ranks, world, rpn, layout):
    results = ranks(world, rpn).run(_collectives_per_family, layout, rpn)
    grid = build_rank_grid(layout, ranks_per_node=rpn)
    for rank, seen in enumerate(results):
        assert set(seen) == set(grid.groups)
        for family, (total, gathered) in seen.items():
            members = grid.group_of(family, rank)
            assert gathered == list(members), (family, rank)
            assert total == sum(m + 1 for m in members), (family, rank)


def _uneven_all_to_all(layout: Layout, rpn: int, family: str):
    """Each member i sends (i + j) % 3 + 1 rows to member j, each row tagged (src, dst, k)."""
    g = _groups(layout, rpn)
    pg = g.groups[family]
    members = g.members[family]
    n, me = len(members), members.index(dist.get_rank())
    send_counts = [(me + j) % 3 + 1 for j in range(n)]
    recv_counts = [(j + me) % 3 + 1 for j in range(n)]
    rows = [torch.tensor([float(me), float(j), float(k)], dtype=torch.float64)
            for j in range(n) for k in range(send_counts[j])]
    send = torch.stack(rows)
    recv = torch.full((sum(recv_counts), 3), -1.0, dtype=torch.float64)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=pg)
    return me, recv_counts, recv.tolist()


@pytest.mark.parametrize("world,rpn,layout,family", [
    (4, 2, Layout(dp=4, ep=4), "ep"),
    (8, 4, Layout(tp=2, dp=4, ep=4), "ep"),
    (8, 4, Layout(dp=8, ep=8), "ep"),
    (8, 4, Layout(dp=8, ep=8), "ep_inter"),
])
def test_uneven_all_to_all_in_ep_group(ranks, world, rpn, layout, family):
    for me, recv_counts, rows in ranks(world, rpn).run(_uneven_all_to_all, layout, rpn, family):
        expect = [[float(src), float(me), float(k)] for src, c in enumerate(recv_counts) for k in range(c)]
        assert rows == expect


def _reuse_case() -> dict:
    from datetime import timedelta

    grid = build_rank_grid(Layout(tp=2, dp=2), ranks_per_node=2)
    a, b = create_groups(grid), create_groups(grid)
    c = create_groups(grid, timeout=timedelta(seconds=77))
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t, group=b.groups["tp"])  # a reused group still works
    return {"same": all(a.groups[f] is b.groups[f] for f in a.groups),
            "new_for_other_timeout": a.groups["tp"] is not c.groups["tp"], "tp_sum": float(t)}


def test_groups_are_reused_across_calls_in_one_process(ranks):
    for rank, out in enumerate(ranks(4, 2).run(_reuse_case)):
        assert out["same"] and out["new_for_other_timeout"], out
        assert out["tp_sum"] == (3.0 if rank < 2 else 7.0)
