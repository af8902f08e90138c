"""Fused (flash) attention from csrc/flash_attn.cu, with torch SDPA wherever the kernel does not apply.

``attention(q, k, v)`` takes ``q [b, h, s, d]`` and ``k, v [b, h_kv, s, d]`` (grouped-query attention
is handled inside the kernel, so k and v are never repeated). The kernel runs for CUDA fp16 / bf16
tensors with head dim 64 or 128 and equal query / key lengths; anything else (CPU, float32/64, other
head dims) runs torch's SDPA on repeated k, v, and the reason is logged once per process.
Backward recomputes the probabilities from the saved log-sum-exp, so the T x T matrix is never stored.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from moetrain.parallel.cuda_ext import Extension

__all__ = ["attention", "attention_ref", "unsupported", "load", "self_check"]



def self_check(ext, device: str) -> str | None:
    """The kernel once per supported head dim, causal and not, with GQA (dK / dV through the per-head
    partials and their reduction) and without (written directly), at a length that is not a tile multiple,
    against the float64 reference (output, log-sum-exp, gradients; outputs NaN-poisoned first): the first
    case that fails, or None."""
    g = torch.Generator(device=device).manual_seed(0)
    # every dtype the kernel is used in, so a broken instantiation is never enabled
    cases = ((dt, d, c, hk) for dt in KERNEL_DTYPES for d in HEAD_DIMS for c in (True, False) for hk in (2, 4))
    for dtype, D, causal, Hkv in cases:
        q = torch.randn(1, 4, 70, D, device=device, generator=g).to(dtype)
        k = torch.randn(1, Hkv, 70, D, device=device, generator=g).to(dtype)
        v = torch.randn(1, Hkv, 70, D, device=device, generator=g).to(dtype)
        d_o = torch.randn(1, 4, 70, D, device=device, generator=g).to(dtype)
        o, lse = ext.forward(q, k, v, causal, True)
        dq, dk, dv = ext.backward(q, k, v, o, lse, d_o, causal, True, False)
        dq_det, dk_det, dv_det = ext.backward(q, k, v, o, lse, d_o, causal, True, True)  # ordered dQ
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        o_ref, lse_ref = attention_ref(qr, kr, vr, causal)
        o_ref.backward(d_o.double())
        for name, got, want, tol in (("output", o, o_ref, 2e-2), ("lse", lse, lse_ref, 1e-3),
                                     ("dq", dq, qr.grad, 5e-2), ("dk", dk, kr.grad, 5e-2),
                                     ("dv", dv, vr.grad, 5e-2), ("deterministic dq", dq_det, qr.grad, 5e-2)):
            err = (got.double() - want.detach()).abs().max() / want.detach().abs().max().clamp(min=1e-6)
            if not bool(torch.isfinite(got).all()) or float(err) > tol:
                return (f"{dtype}, head dim {D}, causal={causal}, {Hkv} kv heads: {name} "
                        f"(relative error {float(err):.3g})")
        again = ext.backward(q, k, v, o, lse, d_o, causal, False, True)
        if not (torch.equal(dk_det, dk) and torch.equal(dv_det, dv)
                and all(torch.equal(a, b) for a, b in zip(again, (dq_det, dk_det, dv_det)))):
            return (f"{dtype}, head dim {D}, causal={causal}, {Hkv} kv heads: deterministic backward (bits differ "
                    "between runs)")
    return None


_EXT = Extension("moetrain_attn_ops", ["attn_ops.cpp", "flash_attn.cu"], fast_math=True,  # exp2f -> ex2.approx
                 check=self_check)
_log = logging.getLogger("moetrain.attention")
_said: set[str] = set()
HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""What the kernel takes (:func:`unsupported`), and what its self-check runs."""


def load():
    """The compiled extension or None (reason in the log, once)."""
    return _EXT.get()


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "tensors are not on a CUDA device"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (the kernel takes float16 / bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (the kernel takes {' or '.join(map(str, HEAD_DIMS))})"
    if k.shape[2] != q.shape[2] or k.shape != v.shape or k.shape[0] != q.shape[0]:
        return f"query {tuple(q.shape)} and key/value {tuple(k.shape)} lengths differ"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} heads are not a multiple of {k.shape[1]} kv heads"
    if q.shape[0] * q.shape[1] > 65535:  # one grid row per (batch, head)
        return f"batch x heads = {q.shape[0] * q.shape[1]} exceeds 65535"
    if load() is None:
        return f"the kernel is unavailable ({_EXT.reason})"
    return None


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, deterministic: bool = False):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _EXT.get().forward(q, k, v, causal, False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.deterministic = causal, deterministic
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _EXT.get().backward(q, k, v, o, lse, d_o.contiguous(), ctx.causal, False, ctx.deterministic)
        return dq, dk, dv, None, None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              deterministic: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [causal mask]) v, through the fused kernel when it applies. ``deterministic``
    (``train.deterministic``): dQ from the kernel that sums key tiles in a fixed order (no atomics), so the
    gradients have the same bits on every run."""
    why = unsupported(q, k, v)
    if why is None:
        return _FlashAttention.apply(q, k, v, causal, deterministic)
    if why not in _said:
        _said.add(why)
        _log.info("model.attention=fused: torch SDPA runs instead of the kernel: %s", why)
    return _sdpa(q, k, v, causal)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """(o, lse) in float64 with the T x T matrix materialised: what the kernel must equal."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return (s - lse.unsqueeze(-1)).exp() @ v, lse
