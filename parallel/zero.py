"""ZeRO stage 1 and 2: AdamW whose state (and, at stage 2, the reduced gradients) is sharded over the
data-parallel group of each parameter group.

Why our own and not DeepSpeed's ``DeepSpeedZeroOptimizer`` (tried with deepspeed 0.19.8, see
ARCHITECTURE.md "ZeRO"): its stage-2 reduce-scatter refuses float64 communication (our correctness
tests run in float64), its ``backward`` is only callable from its engine, and it reduces gradients
from its own autograd hooks exactly once per parameter, which conflicts with moetrain's deferred
weight-gradient pass (zero-bubble pipelines), the gradient buckets placed into MoE idle windows,
and the TP / tied-embedding gradient syncs that must happen before the data-parallel sum.

Layout: the parameters of one shard unit (stage 1: all dense parameters over ``dp``, all expert
parameters over ``edp``; stage 2: each gradient bucket of :class:`parallel.data_parallel.GradReducer`,
which reduce-scatters buckets during backward and frees their gradients at once) are laid end to end
in a virtual flat vector of N elements, padded to a multiple of the group size W;
rank r owns elements ``[r·S, (r+1)·S)`` with ``S = ceil(N / W)``. It keeps a master copy of that
slice, AdamW's two moments for it (torch's own AdamW on the slice, so the arithmetic is the same
element-wise as the unsharded optimizer) and, at stage 2, only that slice of the reduced gradient.
After the update the slices are all-gathered back into the parameters.

``offload="cpu"``: master slice, moments and the update live in host memory; gradients go down and
updated parameters come back each step (on CPU ranks the copies are no-ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.parallel.data_parallel import clip_scale, reduce_norm, sum_sq
from moetrain.parallel.mappings import _all_gather_single

__all__ = ["ShardedAdamW"]


@dataclass(eq=False)
class _Shard:
    params: list[nn.Parameter]
    group: object
    divisor: int  # the reduced gradient sum is divided by this (the data-parallel degree)
    world: int
    rank: int
    numel: int
    size: int  # elements per rank (S)
    master: torch.Tensor  # [S] this rank's slice of the parameters (optimizer device)
    grad: torch.Tensor | None = None  # [S] stage 2: this rank's slice of the reduced gradient

    @property
    def lo(self) -> int:
        return self.rank * self.size

    def pieces(self):
        """(param, its flat range [a, b) within this rank's slice, the same range within the param)."""
        offset = 0
        for p in self.params:
            a, b = max(offset, self.lo), min(offset + p.numel(), self.lo + self.size)
            if a < b:
                yield p, (a - self.lo, b - self.lo), (a - offset, b - offset)
            offset += p.numel()

    def flat(self, tensors: list[torch.Tensor | None], like: nn.Parameter) -> torch.Tensor:
        """The padded flat vector [W·S] of per-parameter tensors (None: zeros)."""
        out = like.new_zeros(self.world * self.size)
        offset = 0
        for p, t in zip(self.params, tensors):
            if t is not None:
                out[offset:offset + p.numel()].copy_(t.reshape(-1))
            offset += p.numel()
        return out

    def write_flat(self, start: int, values: torch.Tensor) -> None:
        """Copy ``values`` into the parameters at flat positions [start, start + len) (padding skipped)."""
        end = start + values.numel()
        offset = 0
        for p in self.params:
            a, b = max(offset, start), min(offset + p.numel(), end)
            if a < b:
                p.view(-1)[a - offset:b - offset].copy_(values[a - start:b - start])
            offset += p.numel()

    def gather_into_params(self, chunk: int) -> None:
        """All ranks' updated slices -> the parameters, ``chunk`` elements per rank at a time, so the
        gather buffer stays W·chunk instead of the whole flat vector (collective over the group)."""
        like = self.params[0]
        for c0 in range(0, self.size, chunk):
            piece = self.master.detach()[c0:c0 + chunk].to(like.device, like.dtype)
            if self.world == 1:
                self.write_flat(c0, piece)
                continue
            out = like.new_empty(self.world * piece.numel())
            _all_gather_single(out, piece.contiguous(), group=self.group)
            for r, part in enumerate(out.split(piece.numel())):
                self.write_flat(r * self.size + c0, part)

    def gather(self, slice_S: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
        """All ranks' slices -> the flat vector [W·S] (collective over the group)."""
        slice_S = slice_S.to(like.device, like.dtype)
        if self.world == 1:
            return slice_S
        out = like.new_empty(self.world * self.size)
        _all_gather_single(out, slice_S.contiguous(), group=self.group)
        return out


class ShardedAdamW:
    """AdamW with ZeRO-1/2 sharding; ``param_groups`` is ``[(group, params, divisor)]`` as for GradReducer."""

    def __init__(self, param_groups, *, stage: int, offload: str = "none", lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, gather_bytes: int = 8 * 2**20):
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage must be 1 or 2, got {stage}")
        if offload not in ("none", "cpu"):
            raise ValueError(f"offload must be none or cpu, got {offload!r}")
        self.stage, self.offload = stage, offload
        self.gather_bytes = gather_bytes  # all-gather buffer per step, summed over the group's ranks
        self.shards: list[_Shard] = []
        for entry in param_groups:
            group, params = entry[0], [p for p in entry[1] if p.requires_grad]
            if not params:
                continue
            rank, world = rank_size(group)
            divisor = entry[2] if len(entry) > 2 else world
            numel = sum(p.numel() for p in params)
            size = -(-numel // world)
            dev = torch.device("cpu") if offload == "cpu" else params[0].device
            shard = _Shard(params, group, divisor, world, rank, numel, size,
                           master=torch.zeros(size, dtype=params[0].dtype, device=dev))
            with torch.no_grad():
                for p, (a, b), (pa, pb) in shard.pieces():
                    shard.master[a:b].copy_(p.detach().reshape(-1)[pa:pb])
            shard.master.requires_grad_(True)
            self.shards.append(shard)
        masters = [s.master for s in self.shards]
        foreach = all(m.device.type == "cpu" for m in masters)
        self.inner = torch.optim.AdamW(masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       foreach=foreach, fused=None if foreach else True)
        self._by_param = {id(p): s for s in self.shards for p in s.params}

    # ------------------------------------------------------------------ torch.optim-like surface
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.shards:
            for p in s.params:
                p.grad = None
            s.grad = None

    # ------------------------------------------------------------------ gradients
    def set_grad_slices(self, slices: list[torch.Tensor]) -> None:
        """Stage 2: this rank's slices of the averaged gradients, one per shard (the gradient reducer's
        reduce-scatter in ``scatter`` mode, whose buckets are this optimizer's shards)."""
        assert self.stage == 2 and len(slices) == len(self.shards)
        for s, g in zip(self.shards, slices):
            assert g.numel() == s.size
            s.grad = g

    def grad_norm_sq_local(self, replicas: dict[int, int]) -> torch.Tensor:
        """Stage 2: this rank's share of the squared global norm, from its gradient slices.

        ``replicas[id(p)]`` counts the world's identical copies of p's full gradient; a slice is held
        by replicas / W of them, so each contributes W / replicas of its squares to the sum.
        """
        assert self.stage == 2
        sq = torch.zeros((), dtype=torch.float64)
        for s in self.shards:
            for p, (a, b), _ in s.pieces():
                sq += sum_sq(s.grad[a:b].detach()).cpu() * s.world / replicas[id(p)]
        return sq

    def clip_grad_norm(self, max_norm: float | None, replicas: dict[int, int], world_group=None,
                       votes: torch.Tensor | None = None) -> float:
        """Stage 2's global norm from the gradient slices (stage 1 clips the full gradients as usual)."""
        norm = reduce_norm(self.grad_norm_sq_local(replicas), votes, world_group)
        scale = clip_scale(norm, max_norm)
        if scale is not None:
            for s in self.shards:
                s.grad.mul_(scale)
        return norm

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self) -> None:
        for s in self.shards:
            if self.stage == 2:
                g = s.grad if s.grad is not None else torch.zeros_like(s.master)
            else:
                g = torch.zeros(s.size, dtype=s.params[0].dtype, device=s.params[0].device)
                for p, (a, b), (pa, pb) in s.pieces():
                    if p.grad is not None:
                        g[a:b].copy_(p.grad.reshape(-1)[pa:pb])
            s.master.grad = g.to(s.master.device, s.master.dtype)
        self.inner.step()
        for s in self.shards:
            s.master.grad = None
            s.gather_into_params(max(1, self.gather_bytes // s.master.element_size() // s.world))

    # ------------------------------------------------------------------ state by parameter (checkpoints)
    def param_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every parameter's AdamW state, shaped like the parameter (collective over each shard group)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for s in self.shards:
            st = self.inner.state.get(s.master)
            if not st:
                continue
            moments = {k: s.gather(st[k], s.params[0]) for k in ("exp_avg", "exp_avg_sq")}
            offset = 0
            for p in s.params:
                out[id(p)] = {k: v[offset:offset + p.numel()].view_as(p).clone() for k, v in moments.items()}
                out[id(p)]["step"] = st["step"].detach().clone()
                offset += p.numel()
        return out

    def load_param_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`param_states`: take this rank's slice of every parameter's state."""
        for s in self.shards:
            if not all(id(p) in states for p in s.params):
                raise ValueError("optimizer state is missing for some parameters of a ZeRO group")
            st = {k: torch.zeros_like(s.master, requires_grad=False) for k in ("exp_avg", "exp_avg_sq")}
            for p, (a, b), (pa, pb) in s.pieces():
                for k in st:
                    st[k][a:b].copy_(states[id(p)][k].reshape(-1)[pa:pb])
            step = states[id(s.params[0])]["step"]
            self.inner.state[s.master] = {"step": torch.tensor(float(step), dtype=torch.float32), **st}
        self.refresh_masters()

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """The master slices follow the parameters (after weights were loaded into them)."""
        for s in self.shards:
            for p, (a, b), (pa, pb) in s.pieces():
                s.master[a:b].copy_(p.detach().reshape(-1)[pa:pb])

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: master slice + both moments."""
        return sum(3 * s.size * s.master.element_size() for s in self.shards)

    def grad_bytes(self) -> int:
        """Bytes of gradient this rank keeps between steps (stage 2: its slices; stage 1: full gradients)."""
        if self.stage == 2:
            return sum(s.size * s.master.element_size() for s in self.shards)
        return sum(p.numel() * p.element_size() for s in self.shards for p in s.params)
