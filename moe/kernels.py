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
build fails (said once), the torch reference runs. :func:`pack_rows` and :func:`combine_rows` are the
autograd functions the MoE layer's fused order / inverse-order stages call (``moe.kernels``); each
call takes the kernel when the extension is loaded and its tensors are CUDA fp32/fp16/bf16, the
reference otherwise, so the same layer code runs (and is tested) on CPU.
"""

from __future__ import annotations

import torch

from moetrain.errors import UserError
from moetrain.parallel.cuda_ext import CSRC, Extension

__all__ = ["load", "route_topk_ref", "rank_in_expert_ref", "pack_rows_ref", "combine_rows_ref", "positions_ref",
           "CSRC", "KernelError", "require", "use_fused", "select_experts", "positions", "pack_rows", "combine_rows",
           "KernelArgumentError", "check_route_args", "check_rank_args", "check_rows_args", "SELF_CHECK_DTYPES"]



SELF_CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels take (``_KERNEL_DTYPES``): the self-check runs every kernel in each."""


def self_check(ext, device: str) -> str | None:
    """Every kernel of ``ext`` once on small random inputs against its reference: the first that
    disagrees (bit-exact indices, positions and packing; float tolerance for gates and sums), or None."""
    g = torch.Generator(device=device).manual_seed(0)
    T, E, K, D = 257, 16, 4, 72
    logits = torch.randn(T, E, device=device, generator=g)
    bias = torch.randn(E, device=device, generator=g) * 0.1

    def close(a, b, tol=1e-4):
        return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))

    for dtype in SELF_CHECK_DTYPES:  # every storage type a path may run in, so no broken instantiation is enabled
        lg = logits.to(dtype)
        for sigmoid, b in ((False, None), (True, bias)):
            e, gate, psum = ext.route_topk(lg, b, K, sigmoid, True)
            re, rg, rps = route_topk_ref(lg, b, K, sigmoid, True)
            if not (torch.equal(e, re) and close(gate, rg) and close(psum, rps)):
                return f"route_topk ({dtype}, sigmoid={sigmoid})"
    e, gate, _ = ext.route_topk(logits, None, K, False, True)
    keep = torch.rand(T, K, device=device, generator=g) < 0.8
    for order in (0, 1):
        rank, total = ext.rank_in_expert(e, keep, E, order)
        if not all(torch.equal(a, b) for a, b in zip((rank, total), rank_in_expert_ref(e, keep, E, order))):
            return f"rank_in_expert (order={order})"
    pos, counts = positions_ref(e, keep, E)
    n = int(counts.sum())
    for dtype in SELF_CHECK_DTYPES:
        x = torch.randn(T, D, device=device, generator=g).to(dtype)
        rows = ext.pack_rows(x, pos, n)
        if not torch.equal(rows, pack_rows_ref(x, pos, n)):
            return f"pack_rows ({dtype})"
        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        if not close(ext.combine_rows(rows, pos, gate), combine_rows_ref(rows, pos, gate), tol):
            return f"combine_rows ({dtype})"
        dy = torch.randn(T, D, device=device, generator=g).to(dtype)
        got, want = ext.combine_rows_backward(dy, rows, pos, gate), combine_rows_backward_ref(dy, rows, pos, gate)
        if not (close(got[0], want[0], tol) and close(got[1], want[1], tol)):
            return f"combine_rows_backward ({dtype})"
        if not close(ext.pack_rows_backward(rows, pos, T), pack_rows_backward_ref(rows, pos, T), tol):
            return f"pack_rows_backward ({dtype})"
    return None


_EXT = Extension("moetrain_moe_ops", ["moe_ops.cpp", "moe_kernels.cu"],  # precise expf: selection = reference
                 check=self_check)
_KERNEL_DTYPES = SELF_CHECK_DTYPES


class KernelError(UserError, RuntimeError):
    """The CUDA kernels were asked for (``moe.kernels: cuda``) but cannot be used."""


def require():
    """The extension, or :class:`KernelError` saying why it is unavailable."""
    ext = load()
    if ext is None:
        raise KernelError(f"moe.kernels=cuda but the csrc kernels are unavailable ({_EXT.reason}); "
                          "use moe.kernels=auto to fall back to the torch path")
    return ext


def use_fused(choice: str, device: torch.device) -> bool:
    """``moe.kernels`` resolved for ``device``: the csrc kernels need a CUDA device and a successful build
    (``cuda``: or :class:`KernelError`; ``auto``: a failed build is logged once and torch ops run)."""
    if choice == "torch" or device.type != "cuda":
        return False
    if choice == "cuda":
        require()
        return True
    return load() is not None


def _ext_for(*tensors: torch.Tensor):
    """The extension when every tensor is a CUDA tensor the kernels take, else None (reference path)."""
    if not all(t.is_cuda for t in tensors):
        return None
    if any(t.is_floating_point() and t.dtype not in _KERNEL_DTYPES for t in tensors):
        return None
    return load()


def load():
    """The compiled extension, or None (no CUDA, no toolkit, or a failed build: reason logged once)."""
    return _EXT.get()


# ------------------------------------------------------------------------------ the argument contract
MAX_EXPERTS_ROUTE = 256  # csrc kMaxExpertsPerLane (8) x a warp (32)
MAX_K = 8  # csrc kMaxK


class KernelArgumentError(ValueError):
    """Arguments a kernel (and its reference) does not take: named, before anything runs."""


def _need(ok: bool, op: str, why: str) -> None:
    if not ok:
        raise KernelArgumentError(f"{op}: {why}")


def _same_device(op: str, **tensors: torch.Tensor | None) -> None:
    given = {k: t for k, t in tensors.items() if t is not None}
    devices = {str(t.device) for t in given.values()}
    _need(len(devices) <= 1, op, "tensors on different devices: " +
          ", ".join(f"{k} on {t.device}" for k, t in given.items()))


def check_route_args(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int) -> None:
    op = "route_topk"
    _same_device(op, logits=logits_TE, bias=bias_E)
    _need(logits_TE.dim() == 2, op, f"logits must be [T, E], got shape {tuple(logits_TE.shape)}")
    _need(logits_TE.is_floating_point(), op, f"logits must be floating point, got {logits_TE.dtype}")
    E = logits_TE.shape[1]
    _need(1 <= k <= E, op, f"k={k} must be in [1, E={E}]")
    _need(bias_E is None or tuple(bias_E.shape) == (E,), op,
          f"bias must be [E={E}], got {None if bias_E is None else tuple(bias_E.shape)}")


def check_rank_args(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int, order: int,
                    shared_bytes_limit: int | None = None) -> None:
    op = "rank_in_expert"
    _same_device(op, expert=expert_TK, keep=keep_TK)
    _need(expert_TK.dim() == 2, op, f"expert ids must be [T, K], got shape {tuple(expert_TK.shape)}")
    _need(not expert_TK.is_floating_point() and expert_TK.dtype != torch.bool, op,
          f"expert ids must be integers, got {expert_TK.dtype}")
    _need(keep_TK is None or keep_TK.shape == expert_TK.shape, op,
          f"keep {None if keep_TK is None else tuple(keep_TK.shape)} must match expert ids {tuple(expert_TK.shape)}")
    _need(num_experts >= 1, op, f"num_experts={num_experts} must be >= 1")
    _need(order in (0, 1), op, f"order={order} must be 0 (token-major) or 1 (choice-major)")
    if shared_bytes_limit is not None:  # one int32 counter per expert in a block's dynamic shared memory
        _need(4 * num_experts <= shared_bytes_limit, op, f"{num_experts} experts need {4 * num_experts} bytes of "
                                                         f"shared memory; the device gives {shared_bytes_limit}")


def check_rows_args(op: str, rows_or_x: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor | None = None,
                    num_rows: int | None = None) -> None:
    """pack_rows / combine_rows (and their backwards): 2-D floating rows, int32 positions [T, K], gates [T, K]."""
    _same_device(op, rows=rows_or_x, pos=pos_TK, gate=gate_TK)
    _need(rows_or_x.dim() == 2 and rows_or_x.is_floating_point(), op,
          f"rows must be a 2-D floating tensor, got {tuple(rows_or_x.shape)} {rows_or_x.dtype}")
    _need(pos_TK.dim() == 2 and pos_TK.dtype == torch.int32, op,
          f"positions must be int32 [T, K], got {tuple(pos_TK.shape)} {pos_TK.dtype}")
    _need(gate_TK is None or gate_TK.shape == pos_TK.shape, op,
          f"gates {None if gate_TK is None else tuple(gate_TK.shape)} must match positions {tuple(pos_TK.shape)}")
    _need(num_rows is None or num_rows >= 0, op, f"rows={num_rows} must be >= 0")


# ------------------------------------------------------------------------------ torch references
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/fp16/bf16 (the kernels' math), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def route_topk_ref(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, sigmoid: bool,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_route_args(logits_TE, bias_E, k)
    acc = _acc(logits_TE.dtype)
    scores = logits_TE.to(acc).sigmoid() if sigmoid else logits_TE.to(acc).softmax(dim=-1)
    key = scores if bias_E is None else scores + bias_E.to(acc)
    expert = torch.sort(-key, dim=-1, stable=True).indices[:, :k]  # lower expert id first on ties
    gate = scores.gather(1, expert)
    if renormalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return expert.to(torch.int32), gate, scores.sum(dim=0)


def rank_in_expert_ref(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int,
                       order: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_rank_args(expert_TK, keep_TK, num_experts, order)
    T, K = expert_TK.shape
    e = expert_TK.long()
    keep = torch.ones_like(e, dtype=torch.bool) if keep_TK is None else keep_TK.bool()
    inside = (e >= 0) & (e < num_experts)  # as the kernel: an id outside [0, E) is not ranked (rank -1)
    keep, e = keep & inside, e.clamp(0, num_experts - 1)
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
    return _rows_from_ranks(rank, total, expert_TK), total


def _rows_from_ranks(rank_TK: torch.Tensor, total_E: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """Row in the expert-sorted buffer = the expert's first row + the rank inside it (-1 stays -1)."""
    start = (torch.cumsum(total_E, 0) - total_E).to(torch.int32)
    expert = expert_TK.long().clamp(0, total_E.numel() - 1)  # out-of-range ids have rank -1 and stay -1
    return torch.where(rank_TK >= 0, rank_TK + start[expert], rank_TK).contiguous()


def pack_rows_ref(x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int) -> torch.Tensor:
    check_rows_args("pack_rows", x_TD, pos_TK, num_rows=rows)
    K = pos_TK.shape[1]
    out = x_TD.new_empty(rows, x_TD.shape[1])
    flat = pos_TK.reshape(-1).long()
    kept = flat >= 0
    src = torch.arange(flat.numel(), device=x_TD.device)[kept] // K
    out[flat[kept]] = x_TD[src]
    return out


def pack_rows_backward_ref(d_rows: torch.Tensor, pos_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """dx[t] = sum_k d_rows[pos[t, k]] (accumulated in fp32, or float64 for float64)."""
    return combine_rows_ref(d_rows, pos_TK, torch.ones(pos_TK.shape, dtype=_acc(d_rows.dtype), device=d_rows.device))


def combine_rows_ref(rows: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor) -> torch.Tensor:
    check_rows_args("combine_rows", rows, pos_TK, gate_TK)
    acc = _acc(rows.dtype)
    if rows.shape[0] == 0:  # nothing routed here: every position is -1
        return rows.new_zeros(pos_TK.shape[0], rows.shape[1])
    pos = pos_TK.long()
    kept = (pos >= 0).unsqueeze(-1)
    picked = rows.to(acc)[pos.clamp(min=0)] * kept  # [T, K, D]
    return (picked * gate_TK.to(acc).unsqueeze(-1)).sum(1).to(rows.dtype)


def combine_rows_backward_ref(dy_TD: torch.Tensor, rows: torch.Tensor, pos_TK: torch.Tensor,
                              gate_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d_rows[pos[t, k]] = gate[t, k] dy[t] (rows nobody reads: 0); d_gate[t, k] = <dy[t], rows[pos[t, k]]>."""
    check_rows_args("combine_rows_backward", rows, pos_TK, gate_TK)
    _need(dy_TD.shape == (pos_TK.shape[0], rows.shape[1]), "combine_rows_backward",
          f"dy {tuple(dy_TD.shape)} must be [T={pos_TK.shape[0]}, D={rows.shape[1]}]")
    acc = _acc(rows.dtype)
    pos = pos_TK.reshape(-1).long()
    kept = pos >= 0
    K = pos_TK.shape[1]
    token = torch.arange(pos.numel(), device=rows.device) // K
    g = gate_TK.reshape(-1).to(acc)
    d_rows = torch.zeros_like(rows)
    d_rows[pos[kept]] = (dy_TD.to(acc)[token[kept]] * g[kept].unsqueeze(1)).to(rows.dtype)
    d_gate = torch.zeros(pos.numel(), dtype=acc, device=rows.device)
    d_gate[kept] = (dy_TD.to(acc)[token[kept]] * rows.to(acc)[pos[kept]]).sum(-1)
    return d_rows, d_gate.view(pos_TK.shape)


# ------------------------------------------------------------------------------ what the MoE layer calls
def select_experts(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int, sigmoid: bool) -> torch.Tensor:
    """Top-k expert ids ``[T, k]`` (int64) of softmax/sigmoid scores + selection bias (no gradient)."""
    logits = logits_TE.detach().contiguous()
    check_route_args(logits, bias_E, k)
    ext = _ext_for(logits)
    if ext is not None and logits.shape[1] <= MAX_EXPERTS_ROUTE and k <= MAX_K:  # the kernel's limits
        bias = None if bias_E is None else bias_E.detach().float().contiguous()
        return ext.route_topk(logits, bias, k, sigmoid, False)[0].long()
    return route_topk_ref(logits, bias_E, k, sigmoid, False)[0].long()


def positions(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(pos_TK int32, counts_E int64): each kept assignment's row in the expert-sorted buffer (token-major
    within an expert, the stable sort's order), -1 elsewhere; rows per expert."""
    expert = expert_TK.to(torch.int32).contiguous()
    check_rank_args(expert, keep_TK, num_experts, 0)
    ext = _ext_for(expert)
    if ext is None:
        pos, total = positions_ref(expert, keep_TK, num_experts)
        return pos, total.long()
    keep = None if keep_TK is None else keep_TK.contiguous()
    rank, total = ext.rank_in_expert(expert, keep, num_experts, 0)
    return _rows_from_ranks(rank, total, expert), total.long()


class _PackRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, pos_TK, rows: int):
        ctx.save_for_backward(pos_TK)
        ctx.num_tokens = x_TD.shape[0]
        x = x_TD.contiguous()
        ext = _ext_for(x, pos_TK)
        return ext.pack_rows(x, pos_TK, rows) if ext is not None else pack_rows_ref(x, pos_TK, rows)

    @staticmethod
    def backward(ctx, d_rows):
        (pos_TK,) = ctx.saved_tensors
        d = d_rows.contiguous()
        ext = _ext_for(d, pos_TK)
        dx = (ext.pack_rows_backward(d, pos_TK, ctx.num_tokens) if ext is not None
              else pack_rows_backward_ref(d, pos_TK, ctx.num_tokens))
        return dx, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, pos_TK, gate_TK):
        rows, gate = rows.contiguous(), gate_TK.contiguous()
        ctx.save_for_backward(rows, pos_TK, gate)
        ext = _ext_for(rows, pos_TK)
        return ext.combine_rows(rows, pos_TK, gate) if ext is not None else combine_rows_ref(rows, pos_TK, gate)

    @staticmethod
    def backward(ctx, dy_TD):
        rows, pos_TK, gate = ctx.saved_tensors
        dy = dy_TD.contiguous()
        ext = _ext_for(dy, rows, pos_TK)
        d_rows, d_gate = (ext.combine_rows_backward(dy, rows, pos_TK, gate) if ext is not None
                          else combine_rows_backward_ref(dy, rows, pos_TK, gate))
        return d_rows, None, d_gate.to(gate.dtype)


def pack_rows(x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int) -> torch.Tensor:
    """``out[pos[t, k]] = x[t]`` with autograd (backward sums each token's rows)."""
    return _PackRows.apply(x_TD, pos_TK, rows)


def combine_rows(rows: torch.Tensor, pos_TK: torch.Tensor, gate_TK: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_k gate[t, k] rows[pos[t, k]]`` with autograd for rows and gates."""
    return _CombineRows.apply(rows, pos_TK, gate_TK)
