"""Process groups created from a :class:`~dist.topology.RankGrid`, handed to components explicitly.

``torch.distributed.new_group`` is collective over the whole world: every rank creates every group
in the same order and keeps the ones it belongs to. Identical rank lists share one group object.
"""

from __future__ import annotations

from datetime import timedelta

from dataclasses import dataclass, field

import torch.distributed as dist

from dist.topology import FAMILIES, RankGrid

__all__ = ["ParallelGroups", "create_groups"]


@dataclass
class ParallelGroups:
    """This rank's process groups, one per family, plus the ranks in each (global rank ids)."""

    grid: RankGrid
    rank: int
    groups: dict[str, dist.ProcessGroup] = field(repr=False)
    members: dict[str, tuple[int, ...]]

    def __getattr__(self, name: str):
        # tp, pp, dp, ep, edp, etp, embedding, ep_intra, ep_inter
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(name)

    def size(self, family: str) -> int:
        return len(self.members[family])

    def index(self, family: str) -> int:
        """This rank's position inside its ``family`` group."""
        return self.members[family].index(self.rank)


def create_groups(grid: RankGrid, backend: str | None = None, timeout: timedelta | None = None) -> ParallelGroups:
    """Create every group family of ``grid``; must be called by all ranks of the default group.

    ``timeout``: how long a collective of these groups may wait (torch's default for new groups is
    30 minutes, not the world group's timeout); a hung peer then fails the collective instead."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    world = dist.get_world_size()
    if world != grid.world_size:
        raise ValueError(f"the rank grid is for {grid.world_size} ranks but the process group has {world}")
    rank = dist.get_rank()
    cache: dict[tuple[int, ...], dist.ProcessGroup] = {}
    mine: dict[str, dist.ProcessGroup] = {}
    members: dict[str, tuple[int, ...]] = {}
    for family in FAMILIES:
        for ranks in grid.groups[family]:
            if ranks not in cache:
                if len(ranks) == world:
                    cache[ranks] = dist.group.WORLD
                else:
                    cache[ranks] = dist.new_group(list(ranks), backend=backend, timeout=timeout,
                                                 use_local_synchronization=False)
            if rank in ranks:
                mine[family] = cache[ranks]
                members[family] = ranks
    return ParallelGroups(grid=grid, rank=rank, groups=mine, members=members)
