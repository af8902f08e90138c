"""Multi-head latent attention (DeepSeek-V2/V3), tensor-parallel the way Megatron-Core's MLA is.

Queries come from ``x`` directly or through a query latent (``q_lora_rank``, RMSNorm on it); keys and values
from a key-value latent of ``kv_lora_rank`` (RMSNorm on it), up-projected per head to a no-RoPE key part
and a value; one RoPE key of ``qk_rope_head_dim`` is projected alongside the latent and shared by every
head. A query head is ``[nope | rope]``, its key ``[k_nope | shared k_rope]``; scores are scaled by
``(nope + rope) ** -0.5``; values have their own width ``v_head_dim``.

Under TP (heads split over ranks): the down projections and latent norms are replicated (every rank
computes the latents of the whole sequence; with SP the input is gathered first), their weight gradients
are partial per rank and summed over TP like the other replicated weights; the up projections are
column-parallel by heads; the output projection is row-parallel. The latent norms use eps 1e-6 whatever
``model.norm_eps`` says, as DeepSeek's reference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.parallel.layers import ColumnParallelLinear, RowParallelLinear
from moetrain.parallel.mappings import copy_to_tp, gather_from_sp
from moetrain.parallel.recompute import recompute
from moetrain.parallel.rng import init_normal
from moetrain.parallel.weight_grad import linear

__all__ = ["LatentAttention", "ReplicatedLinear", "LATENT_NORM_EPS"]

LATENT_NORM_EPS = 1e-6


class ReplicatedLinear(nn.Module):
    """``x W^T`` with W whole on every TP rank (a latent's down projection); its gradient is partial per rank
    when the ranks use the output differently (their own heads), so it is summed over TP."""

    def __init__(self, in_features: int, out_features: int, *, seed: int, name: str, std: float,
                 dtype: torch.dtype, partial_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(init_normal((out_features, in_features), std, seed, name).to(dtype))
        self.weight.tp_sharded = False
        self.weight.tp_partial_grad = partial_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on the last dim: the two halves rotated together (Llama), or interleaved pairs (DeepSeek), which
    comes out in the halves layout (queries and keys alike, so their products are unchanged)."""
    if not interleave:
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-b, a], dim=-1) * sin
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class LatentAttention(nn.Module):
    def __init__(self, args, layer: int, *, tp_group, sp: bool, dtype: torch.dtype, sampler=None):
        super().__init__()
        from moetrain.parallel.model import RMSNorm, _rope_tables

        _, tp = rank_size(tp_group)
        d, H = args.d_model, args.heads
        self.heads = H // tp
        self.nope, self.rope, self.vd = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_rank, self.interleave = args.kv_lora_rank, args.rope_interleave
        self.tp_group, self.sp = tp_group, sp and tp > 1
        self.kind, self.selective = args.attention, args.recompute == "selective"
        self.layer, self.rope_theta = layer, args.rope_theta
        name, std, seed = f"layers.{layer}.attn", 1.0 / math.sqrt(d), args.seed
        wgrad = sampler or (lambda site: None)
        qk = self.nope + self.rope
        if args.q_lora_rank:
            self.q_down = ReplicatedLinear(d, args.q_lora_rank, seed=seed, name=f"{name}.q_down", std=std,
                                           dtype=dtype, partial_grad=tp > 1)
            self.q_norm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS, sequence_parallel=tp > 1, dtype=dtype)
            self.q_up = ColumnParallelLinear(args.q_lora_rank, [H * qk], tp_group=tp_group, sp=False, seed=seed,
                                             name=f"{name}.q_up", std=1.0 / math.sqrt(args.q_lora_rank), dtype=dtype,
                                             gather_input=False)
        else:
            self.q = ColumnParallelLinear(d, [H * qk], tp_group=tp_group, sp=False, seed=seed, name=f"{name}.q",
                                          std=std, dtype=dtype, gather_input=False, wgrad=wgrad("qkv"))
        self.kv_down = ReplicatedLinear(d, self.kv_rank + self.rope, seed=seed, name=f"{name}.kv_down", std=std,
                                        dtype=dtype, partial_grad=tp > 1)
        self.kv_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, sequence_parallel=tp > 1, dtype=dtype)
        self.kv_up = ColumnParallelLinear(self.kv_rank, [H * (self.nope + self.vd)], tp_group=tp_group, sp=False,
                                          seed=seed, name=f"{name}.kv_up", std=1.0 / math.sqrt(self.kv_rank),
                                          dtype=dtype, gather_input=False)
        self.out = RowParallelLinear(H * self.vd, d, tp_group=tp_group, sp=sp, seed=seed, name=f"{name}.out",
                                     std=std / math.sqrt(2 * args.layers), dtype=dtype, wgrad=wgrad("attn_out"))
        cos, sin = _rope_tables(args.seq_len, self.rope, args.rope_theta, args.rope_scaling)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.rope_scaling = args.rope_scaling
        from moetrain.parallel.rope import softmax_scale

        self.scale = softmax_scale(qk, args.rope_scaling)  # YaRN's mscale, squared, also on the no-RoPE dims

    def forward(self, x_SBD: torch.Tensor, cache=None) -> torch.Tensor:
        x = gather_from_sp(x_SBD, self.tp_group) if self.sp else copy_to_tp(x_SBD, self.tp_group)
        s, b, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.q(x)
        latent, k_rot = self.kv_down(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_up(self.kv_norm(latent))
        q = q.view(s, b, self.heads, self.nope + self.rope).permute(1, 2, 0, 3)  # [b, h, s, qk]
        kv = kv.view(s, b, self.heads, self.nope + self.vd).permute(1, 2, 0, 3)
        k_rot = k_rot.view(s, b, 1, self.rope).permute(1, 2, 0, 3)  # [b, 1, s, rope]: one for every head
        pos = 0 if cache is None else cache.pos
        if cache is None and self.selective:
            o = recompute(self._core, q, kv, k_rot)
        else:
            o = self._core(q, kv, k_rot, pos, cache)
        return self.out(o.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.vd))

    def _core(self, q: torch.Tensor, kv: torch.Tensor, k_rot: torch.Tensor, pos: int = 0, cache=None) -> torch.Tensor:
        s = q.shape[2]
        from moetrain.parallel.model import rope_upto

        cos, sin = rope_upto(self, pos + s, self.rope)
        cos, sin = cos[pos:pos + s], sin[pos:pos + s]
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k_rot = rotate(k_rot, cos, sin, self.interleave)
        q = torch.cat([q_pass, rotate(q_rot, cos, sin, self.interleave)], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, self.heads, -1, -1)], dim=-1)
        if cache is not None:
            return cache.attend(self.layer, q, k, v, scale=self.scale)
        if self.kind == "eager":
            scores = (q @ k.transpose(-1, -2)) * self.scale
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            return scores.masked_fill(causal, float("-inf")).softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
