"""The experts stage: this rank's local experts applied to rows grouped by expert.

Weights ``w_up_EDF`` (``[E_local, D, 2F/etp]`` for SwiGLU: gate | up; ``[E_local, D, F/etp]`` for GELU)
and ``w_down_EFD`` (``[E_local, F/etp, D]``). Each global expert's weights are drawn in full from their
own streams (``{name}.{gid}.gate|up|down``) and sliced for expert tensor parallelism, so any
(ep, etp) layout holds the same numbers. In checkpoints every expert is stored under its global id.

Compute: one grouped GEMM over the expert segments (``torch._grouped_mm`` on CUDA for bf16, where
available); a segmented loop of matmuls otherwise.

Expert TP (etp > 1): rows are all-gathered from the etp peers (uneven, as an all-to-all), each peer
computes its F/etp slice for all of them, and the partial outputs are reduce-scattered back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.dispatch import all_to_all, segments_perm
from parallel.layers import init_normal

__all__ = ["GroupedExperts"]


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, ep_rank: int, ep_size: int, seed: int,
                 name: str, activation: str = "swiglu", etp_group=None, dtype: torch.dtype = torch.float32,
                 num_layers: int = 1):
        super().__init__()
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts do not split over ep={ep_size}")
        self.etp_group = etp_group
        etp = 1 if etp_group is None else dist.get_world_size(etp_group)
        etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)
        if d_expert % etp:
            raise ValueError(f"expert hidden size {d_expert} does not split over etp={etp}")
        self.num_local = num_experts // ep_size
        self.first = ep_rank * self.num_local
        self.activation = activation
        self.name = name
        self.etp, self.etp_rank = etp, etp_rank
        std_up, std_down = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_expert) / math.sqrt(2 * num_layers)
        ups, downs = [], []
        for gid in range(self.first, self.first + self.num_local):
            parts = ["gate", "up"] if activation == "swiglu" else ["up"]
            up = [init_normal((d_expert, d_model), std_up, seed, f"{name}.{gid}.{p}").chunk(etp)[etp_rank]
                  for p in parts]
            ups.append(torch.cat(up, dim=0).t())  # [D, parts*F/etp]
            downs.append(init_normal((d_model, d_expert), std_down, seed, f"{name}.{gid}.down")
                         .chunk(etp, dim=1)[etp_rank].t())  # [F/etp, D]
        self.w_up_EDF = nn.Parameter(torch.stack(ups).to(dtype).contiguous())
        self.w_down_EFD = nn.Parameter(torch.stack(downs).to(dtype).contiguous())
        for p in (self.w_up_EDF, self.w_down_EFD):
            p.is_expert = True
            p.tp_sharded = True

    def _ffn(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = x @ self.w_up_EDF[e]
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return h @ self.w_down_EFD[e]

    def _grouped(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = [self._ffn(seg, e) for e, seg in enumerate(x_RD.split(counts)) if seg.shape[0] > 0]
        if not outs:
            # No rows for any local expert. The result must still hang off the input's graph: the
            # backward all-to-all that follows is collective, and every rank has to take part in it.
            return x_RD.new_zeros(0, self.w_down_EFD.shape[-1]) + x_RD.sum() * 0
        return torch.cat(outs)

    def forward(self, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by local expert (``counts[e]`` rows for local expert e) -> expert outputs."""
        assert sum(counts) == x_RD.shape[0] and len(counts) == self.num_local
        if self.etp == 1:
            return self._grouped(x_RD, counts)
        # gather every etp peer's rows (and their per-expert counts), regrouped by expert
        n_me = x_RD.shape[0]
        c = torch.tensor(counts, dtype=torch.long)
        peers = [torch.empty_like(c) for _ in range(self.etp)]
        dist.all_gather(peers, c, group=self.etp_group)
        pc = torch.stack(peers).tolist()  # [peer][expert]
        sizes = [sum(row) for row in pc]
        x_all = all_to_all(x_RD.repeat(self.etp, 1), [n_me] * self.etp, sizes, self.etp_group)
        by_expert = segments_perm(pc, [(p, e) for e in range(self.num_local) for p in range(self.etp)])
        y_grouped = self._grouped(x_all.index_select(0, by_expert),
                                  [sum(pc[p][e] for p in range(self.etp)) for e in range(self.num_local)])
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel())
        y_all = y_grouped.index_select(0, back)  # [peer][expert] again: partial sums over F
        partial = all_to_all(y_all, sizes, [n_me] * self.etp, self.etp_group)
        return partial.view(self.etp, n_me, -1).sum(0)

    # ------------------------------------------------------------------ checkpoints by global expert id
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for local in range(self.num_local):
            gid = self.first + local
            for pname in ("w_up_EDF", "w_down_EFD"):
                t = getattr(self, pname)[local]
                destination[f"{prefix}{gid}.{pname}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for local in range(self.num_local):
            gid = self.first + local
            for pname in ("w_up_EDF", "w_down_EFD"):
                key = f"{prefix}{gid}.{pname}"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                with torch.no_grad():
                    getattr(self, pname)[local].copy_(state_dict[key])

    def full(self, local: torch.Tensor, pname: str, ep_group) -> torch.Tensor:
        """All experts' ``pname`` tensors ``[E, ...]`` (unsharded over etp), gathered over ep then etp."""
        t = local.detach()
        if self.etp > 1:
            parts = [torch.empty_like(t) for _ in range(self.etp)]
            dist.all_gather(parts, t.contiguous(), group=self.etp_group)
            if pname == "w_up_EDF" and self.activation == "swiglu":
                gates = torch.cat([p.chunk(2, dim=-1)[0] for p in parts], dim=-1)
                ups = torch.cat([p.chunk(2, dim=-1)[1] for p in parts], dim=-1)
                t = torch.cat([gates, ups], dim=-1)
            else:
                t = torch.cat(parts, dim=-1 if pname == "w_up_EDF" else 1)
        if ep_group is not None and dist.get_world_size(ep_group) > 1:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, t.contiguous(), group=ep_group)
            t = torch.cat(parts, dim=0)
        return t
