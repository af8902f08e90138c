"""Routing and packing: the CUDA kernels of csrc/moe_kernels.cu and the torch reference they must equal.

Contracts (T tokens, E experts, K choices, assignment (t, k)):
- ``route_topk(logits_TE, bias_E, k, sigmoid, renormalize)`` -> expert_TK int32, gate_TK float32,
  prob_sum_E float32: softmax (or sigmoid) scores in fp32, top-k by score + bias (lower id on ties),
  gates from the unbiased scores, renormalised to sum 1 if asked; per-expert sums of the scores.
- ``rank_in_expert(expert_TK, keep_TK, E, order)`` -> rank_TK int32, total_E int32: each kept
  assignment's rank among its expert's kept assignments, visiting token-major (order 0, the sort
  order of the expert stage) or choice-major (order 1, GShard "position" capacity); -1 if not kept.
- ``pack_rows(x_TD, pos_TK, rows)``: out[pos[t,k]] = x[t]; ``combine_rows(rows, pos_TK, gate_TK)``:
  y[t] = sum_k gate[t,k] rows[pos[t,k]] (fp32 accumulation); pos -1 = dropped.

The kernels are built on first use on CUDA machines (:func:`load`); everywhere else, and when the
build fails (said once), the torch reference runs. Wiring into the MoE layer and the GPU checks are
issue #8's remaining work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["load", "route_topk_ref", "rank_in_expert_ref", "pack_rows_ref", "combine_rows_ref", "positions_ref",
           "CSRC"]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_log = logging.getLogger("moetrain.kernels")
_ext = None
_failed: str | None = None


def load():
    """The compiled extension, or None (no CUDA, no toolkit, or a failed build: reason logged once)."""
    global _ext, _failed
    if _ext is not None or _failed is not None:
        return _ext
    if not torch.cuda.is_available():
        _failed = "no CUDA device"
        return None
    try:
        from torch.utils.cpp_extension import load as build

        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        _ext = build(name="moetrain_moe_ops", sources=[str(CSRC / "moe_ops.cpp"), str(CSRC / "moe_kernels.cu")],
                     extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
    except Exception as exc:  # a missing toolkit or a compile error: fall back, say why once
        _failed = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        _log.warning("moetrain CUDA kernels unavailable (%s); using the torch reference path", _failed)
    return _ext


# ------------------------------------------------------------------------------ torch references
def route_topk_ref(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, sigmoid: bool,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = logits_TE.float().sigmoid() if sigmoid else logits_TE.float().softmax(dim=-1)
    key = scores if bias_E is None else scores + bias_E.float()
    expert = torch.sort(-key, dim=-1, stable=True).indices[:, :k]  # lower expert id first on ties
    gate = scores.gather(1, expert)
    if renormalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return expert.to(torch.int32), gate, scores.sum(dim=0)


def rank_in_expert_ref(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int,
                       order: int) -> tuple[torch.Tensor, torch.Tensor]:
    T, K = expert_TK.shape
    e = expert_TK.long()
    keep = torch.ones_like(e, dtype=torch.bool) if keep_TK is None else keep_TK.bool()
    e_vis = (e if order == 0 else e.t()).reshape(-1)
    k_vis = (keep if order == 0 else keep.t()).reshape(-1)
    onehot = torch.nn.functional.one_hot(e_vis, num_experts) * k_vis.unsqueeze(1)
    before = onehot.cumsum(0) - onehot  # kept assignments of the same expert visited earlier
    rank_vis = before.gather(1, e_vis.unsqueeze(1)).squeeze(1)
    rank_vis = torch.where(k_vis, rank_vis, torch.full_like(rank_vis, -1))
    rank = rank_vis.view(T, K) if order == 0 else rank_vis.view(K, T).t()
    return rank.to(torch.int32).contiguous(), onehot.sum(0).to(torch.int32)


def positions_ref(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """Each kept assignment's row in the expert-sorted buffer (token-major within an expert), and the
    per-expert counts: the permutation the expert stage's stable sort produces."""
    rank, total = rank_in_expert_ref(expert_TK, keep_TK, num_experts, 0)
    start = torch.cumsum(total, 0) - total
    pos = torch.where(rank >= 0, rank + start[expert_TK.long()].to(torch.int32), rank)
    return pos, total


def pack_rows_ref(x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int) -> torch.Tensor:
    K = pos_TK.shape[1]
    out = x_TD.new_empty(rows, x_TD.shape[1])
    flat = pos_TK.reshape(-1).long()
    kept = flat >= 0
    src = torch.arange(flat.numel(), device=x_TD.device)[kept] // K
    out[flat[kept]] = x_TD[src]
    return out


def combine_rows_ref(rows: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor) -> torch.Tensor:
    pos = pos_TK.long()
    kept = (pos >= 0).unsqueeze(-1)
    picked = rows.float()[pos.clamp(min=0)] * kept  # [T, K, D]
    return (picked * gate_TK.float().unsqueeze(-1)).sum(1).to(rows.dtype)
