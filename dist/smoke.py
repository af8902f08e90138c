"""A collective check over every process-group family: proves the groups are wired as the grid says."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist.groups import ParallelGroups

__all__ = ["check_group_collectives"]


def check_group_collectives(groups: ParallelGroups) -> dict[str, list[int]]:
    """All-reduce and all-gather this rank's id in each of its groups; returns the gathered member lists.

    Raises ``RuntimeError`` naming the family when the result disagrees with the grid.
    """
    seen: dict[str, list[int]] = {}
    for family, members in groups.members.items():
        pg = groups.groups[family]
        t = torch.tensor([float(groups.rank)], dtype=torch.float64)
        dist.all_reduce(t, group=pg)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in members]
        dist.all_gather(gathered, torch.tensor([float(groups.rank)], dtype=torch.float64), group=pg)
        got = [int(x.item()) for x in gathered]
        if int(t.item()) != sum(members) or got != list(members):
            raise RuntimeError(f"{family} group on rank {groups.rank}: expected {list(members)}, got {got}")
        seen[family] = got
    return seen
