"""Process groups created from a :class:`~dist.topology.RankGrid`, handed to components explicitly.

``torch.distributed.new_group`` is collective over the whole world: every rank creates every group
in the same order and keeps the ones it belongs to. Identical rank lists share one group object, and
so do later calls in the same process (a process that builds several trainers, like a pool of
simulated ranks, reuses its groups instead of piling up gloo groups, each with its own I/O thread).
Every rank makes the same calls, so every rank reuses the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from moetrain.dist.topology import FAMILIES, RankGrid

__all__ = ["ParallelGroups", "create_groups", "rank_size", "single_rank_groups"]


def rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this rank's index, size) of ``group``; ``None`` stands for a group of one (this rank alone)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups, one per family of :data:`~moetrain.dist.topology.FAMILIES`
    (tp, pp, dp, ep, edp, etp, embedding, ep_intra, ep_inter), and the global ranks in each."""

    grid: RankGrid
    global_rank: int
    groups: dict[str, dist.ProcessGroup] = field(repr=False)
    members: dict[str, tuple[int, ...]]

    def size(self, family: str) -> int:
        return len(self.members[family])

    def rank(self, family: str) -> int:
        """This rank's position inside its ``family`` group."""
        return self.members[family].index(self.global_rank)

    def get(self, family: str) -> dist.ProcessGroup | None:
        """The ``family`` group, or None when it has one rank (callers then skip the collective)."""
        return self.groups[family] if self.size(family) > 1 else None

    def group(self, family: str) -> dist.ProcessGroup:
        """The ``family`` group even when it has one rank."""
        return self.groups[family]


_REUSED: dict = {"world": None, "groups": {}}


def _subgroup(ranks: tuple[int, ...], backend: str | None, timeout: timedelta | None) -> dist.ProcessGroup:
    """``new_group(ranks)``, or the one this process made before for the same world, ranks and settings."""
    if _REUSED["world"] is not dist.group.WORLD:  # a new (re-initialised) world: old groups are gone
        _REUSED.update(world=dist.group.WORLD, groups={})
    key = (ranks, backend, timeout)
    if key not in _REUSED["groups"]:
        _REUSED["groups"][key] = dist.new_group(list(ranks), backend=backend, timeout=timeout,
                                                use_local_synchronization=False)
    return _REUSED["groups"][key]


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
    mine: dict[str, dist.ProcessGroup] = {}
    members: dict[str, tuple[int, ...]] = {}
    for family in FAMILIES:
        for ranks in grid.groups[family]:
            # every rank creates every group, in the same order (_subgroup returns repeats)
            group = dist.group.WORLD if len(ranks) == world else _subgroup(ranks, backend, timeout)
            if rank in ranks:
                mine[family] = group
                members[family] = ranks
    return ParallelGroups(grid=grid, global_rank=rank, groups=mine, members=members)


def single_rank_groups() -> ParallelGroups:
    """The groups of a one-rank layout, for building a model in a process without torch.distributed
    (every family has one member, so layers see no group and run no collective)."""
    from moetrain.dist.topology import Layout, build_rank_grid

    grid = build_rank_grid(Layout(), ranks_per_node=1)
    return ParallelGroups(grid=grid, global_rank=0, groups={}, members={f: (0,) for f in FAMILIES})
