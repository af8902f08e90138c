"""The rank grid: which ranks form each tp/pp/dp/ep/edp group and which ranks share a node.

Pure logic, no processes. A rank is a mixed-radix number whose left-most digit varies fastest
(Megatron-Core's order, so tensor-parallel peers are adjacent and stay inside a node):

    dense side:   rank = tp_i + tp * (dp_i + dp * pp_i)                 order tp-dp-pp
    expert side:  rank = etp_i + etp * (ep_i + ep * (edp_i + edp * pp_i)) order etp-ep-edp-pp

The expert side re-factors the tp*dp ranks of each pipeline stage as etp*ep*edp ("MoE parallel
folding"), so the pipeline groups of both sides are identical and EP is not limited by DP.

Each expert-parallel group is further split by node: ``ep_intra`` (the members on one node) and
``ep_inter`` (the i-th member on each node), which the hierarchical all-to-all algorithms use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Layout", "LayoutError", "RankGrid", "build_rank_grid", "FAMILIES"]

FAMILIES = ("tp", "pp", "dp", "ep", "edp", "etp", "embedding", "ep_intra", "ep_inter")

Groups = tuple[tuple[int, ...], ...]


class LayoutError(ValueError):
    """Parallel degrees that do not form a rank grid; ``field`` names the degree to change, ``world`` says
    whether the reason is the world size."""

    def __init__(self, field: str, reason: str, *, world: bool = False):
        self.field, self.reason, self.world = field, reason, world
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class Layout:
    """Parallel degrees; ``edp`` (expert data parallel) is derived.

    The rules of a valid grid are stated here once (the config reports them with its dotted paths)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise LayoutError(name, f"must be >= 1, got {getattr(self, name)}")
        if (self.tp * self.dp) % (self.ep * self.etp):
            raise LayoutError("ep", f"ep*etp = {self.ep}*{self.etp} must divide the tp*dp = {self.tp}*{self.dp} = "
                                    f"{self.tp * self.dp} ranks of a pipeline stage")

    @classmethod
    def from_world(cls, world: int, *, tp: int = 1, pp: int = 1, dp: int | None = None, ep: int = 1,
                   etp: int = 1) -> Layout:
        """The layout of ``world`` ranks; ``dp`` derived as world / (tp * pp) when None."""
        if world % (tp * pp):
            raise LayoutError("tp", f"tp*pp = {tp}*{pp} = {tp * pp} does not divide the world size {world}",
                              world=True)
        if dp is not None and tp * pp * dp != world:
            raise LayoutError("dp", f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} but the world size is {world}",
                              world=True)
        return cls(tp=tp, pp=pp, dp=world // (tp * pp) if dp is None else dp, ep=ep, etp=etp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return (self.tp * self.dp) // (self.ep * self.etp)


def _orthogonal_groups(dims: Sequence[tuple[str, int]], vary: str) -> Groups:
    """Groups of ranks that differ only in the digit ``vary`` of the mixed-radix rank (left-most fastest)."""
    world = 1
    for _, size in dims:
        world *= size
    buckets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        rest, key = rank, []
        for name, size in dims:
            digit, rest = rest % size, rest // size
            if name != vary:
                key.append(digit)
        buckets.setdefault(tuple(key), []).append(rank)
    return tuple(sorted(tuple(g) for g in buckets.values()))


def _split_by_node(groups: Groups, node_of: Sequence[int]) -> tuple[Groups, Groups]:
    """Split each group into its per-node parts (intra) and the i-th-member-per-node sets (inter)."""
    intra: list[tuple[int, ...]] = []
    inter: list[tuple[int, ...]] = []
    for group in groups:
        per_node: dict[int, list[int]] = {}
        for r in group:
            per_node.setdefault(node_of[r], []).append(r)
        parts = [tuple(v) for _, v in sorted(per_node.items())]
        intra.extend(parts)
        width = max(len(p) for p in parts)
        for i in range(width):
            inter.append(tuple(p[i] for p in parts if i < len(p)))
    return tuple(sorted(intra)), tuple(sorted(inter))


@dataclass(frozen=True)
class RankGrid:
    """Every group family of a job, and the node each rank lives on."""

    layout: Layout
    nodes: Groups
    groups: dict[str, Groups] = field(repr=False)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def node_of(self, rank: int) -> int:
        for i, members in enumerate(self.nodes):
            if rank in members:
                return i
        raise ValueError(f"rank {rank} is not in a world of {self.world_size}")

    def group_of(self, family: str, rank: int) -> tuple[int, ...]:
        """The group of ``family`` that contains ``rank``."""
        if family not in self.groups:
            raise KeyError(f"unknown group family {family!r}; known: {', '.join(self.groups)}")
        for g in self.groups[family]:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is in no {family} group")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index inside each of its groups (tp rank, pp stage, dp rank, ep rank, ...)."""
        return {f: self.group_of(f, rank).index(rank) for f in ("tp", "pp", "dp", "ep", "edp", "etp")}

    def ep_is_uniform(self) -> bool:
        """True when every EP group has the same number of members on each of its nodes (needed by hier2d)."""
        for g in self.groups["ep"]:
            counts: dict[int, int] = {}
            for r in g:
                counts[self.node_of(r)] = counts.get(self.node_of(r), 0) + 1
            if len(set(counts.values())) > 1:
                return False
        return True

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size,
            "nodes": [list(n) for n in self.nodes],
            "groups": {name: [list(g) for g in gs] for name, gs in self.groups.items()},
        }


def build_rank_grid(layout: Layout, *, ranks_per_node: int | None = None,
                    node_of: Sequence[int] | None = None) -> RankGrid:
    """Compute the rank grid for ``layout``.

    Nodes come either from ``node_of`` (node id of each rank, as found by a real launcher) or from
    ``ranks_per_node`` (simulated: consecutive blocks of ranks). Node ids are renumbered 0..n-1 in
    order of their first rank.
    """
    world = layout.world_size
    if node_of is None:
        rpn = ranks_per_node or world
        if rpn < 1 or world % rpn:
            raise ValueError(f"ranks_per_node={rpn} does not divide the world size {world}")
        node_of = [r // rpn for r in range(world)]
    if len(node_of) != world:
        raise ValueError(f"node map has {len(node_of)} entries for a world of {world}")
    renumber: dict[int, int] = {}
    for n in node_of:
        renumber.setdefault(n, len(renumber))
    node_ids = [renumber[n] for n in node_of]
    nodes = tuple(tuple(r for r in range(world) if node_ids[r] == i) for i in range(len(renumber)))

    dense = (("tp", layout.tp), ("dp", layout.dp), ("pp", layout.pp))
    expert = (("etp", layout.etp), ("ep", layout.ep), ("edp", layout.edp), ("pp", layout.pp))
    groups: dict[str, Groups] = {
        "tp": _orthogonal_groups(dense, "tp"),
        "pp": _orthogonal_groups(dense, "pp"),
        "dp": _orthogonal_groups(dense, "dp"),
        "ep": _orthogonal_groups(expert, "ep"),
        "edp": _orthogonal_groups(expert, "edp"),
        "etp": _orthogonal_groups(expert, "etp"),
    }
    assert groups["pp"] == _orthogonal_groups(expert, "pp"), "dense and expert pipeline groups differ"
    groups["embedding"] = tuple(
        (g[0], g[-1]) if len(g) > 1 else (g[0],) for g in groups["pp"]
    )
    groups["ep_intra"], groups["ep_inter"] = _split_by_node(groups["ep"], node_ids)
    return RankGrid(layout=layout, nodes=nodes, groups=groups)
