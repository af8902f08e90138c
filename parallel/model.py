"""Decoder-only transformer (Llama/Mixtral family) built from tensor-parallel layers.

RMSNorm -> grouped-query attention with rotary embedding (heads split over TP) -> residual ->
RMSNorm -> feed-forward (SwiGLU MLP, or whatever ``ffn_factory`` builds, e.g. an MoE layer) -> residual.
Activations are ``[s, b, d]``; with sequence parallelism the residual stream is ``[s/tp, b, d]``.

RNG streams (all derived with :func:`moetrain.parallel.rng.stream_seed` from ``seed``), so that every layout
computes the same function as one process:
- weights: ``layers.{i}.attn.qkv.{0,1,2}``, ``layers.{i}.attn.out``, ``layers.{i}.mlp.up.{0,1}``,
  ``layers.{i}.mlp.down``, ``embed``, ``head``; each drawn in full and sliced per rank;
- dropout: ``dropout/{step}/{sample}/{site}``, one full ``[s, d]`` mask per global sample index and
  site (``{layer}.attn``, ``{layer}.mlp``, ``embed``), sliced to the rank's sequence shard.

WTA-CRS enters through one seam: each linear takes a weight-gradient strategy at construction
(``wgrad``, a :class:`~moetrain.parallel.wtacrs.SampledWeightGrad` for the sites in ``args.wtacrs_sites``,
None for exact gradients); the feed-forward factory gets the same ``sampler`` for its MLPs.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.parallel import fused_attention
from moetrain.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_dim,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from moetrain.parallel.mappings import all_reduce_sum, gather_from_sp, gather_last_dim
from moetrain.parallel.recompute import recompute
from moetrain.parallel.rng import DropoutStream, init_normal
from moetrain.parallel.weight_grad import linear
from moetrain.parallel.wtacrs import SampledWeightGrad, WTACRSConfig

__all__ = ["TransformerArgs", "Transformer", "KVCache", "DropoutStream", "RMSNorm", "SwiGLU", "Sampler"]


@dataclass(frozen=True)
class TransformerArgs:
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    d_ffn: int
    vocab_size: int
    seq_len: int
    attention: str = "sdpa"
    tie_embeddings: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0
    wtacrs: WTACRSConfig | None = None
    """WTA-CRS for the linears named in ``wtacrs_sites`` (None: exact weight gradients everywhere)."""
    wtacrs_sites: tuple[str, ...] = ()
    """qkv | attn_out | mlp_up | mlp_down (mlp_* also cover shared experts and routed experts)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (core attention) | full (whole blocks)."""
    deterministic: bool = False
    """Kernels with order-dependent sums take their ordered paths (the fused attention's dQ)."""
    head_dim: int = 0
    """Width of one head (0: d_model / heads)."""
    qkv_bias: bool = False
    qk_norm: str = "none"
    """none | head (RMSNorm over each head's width) | full (over all heads' projection, all-reduced over TP)."""
    clip_qkv: float | None = None
    kv_lora_rank: int | None = None
    """Multi-head latent attention (parallel/mla.py) when set."""
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False
    rope_scaling: dict | None = None
    """``model.rope_scaling`` as a dict (parallel/rope.py), None for plain RoPE."""

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.d_model // self.heads)


_APEX_RMSNORM = importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.normalization")


class RMSNorm(nn.Module):
    """RMSNorm; NVIDIA apex's fused kernel on CUDA when the real apex is installed, torch's otherwise."""

    def __init__(self, dim: int, eps: float, *, sequence_parallel: bool, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.weight.tp_sharded = False
        self.weight.tp_partial_grad = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _APEX_RMSNORM and x.is_cuda:  # pragma: no cover - needs NVIDIA apex
            from apex.normalization import fused_layer_norm

            return fused_layer_norm.fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature dimension that is split over TP (OLMoE's q / k norm over all heads): the sum of
    squares is all-reduced over the group, the weight is sharded like the features."""

    def __init__(self, dim: int, eps: float, *, tp_group, dtype: torch.dtype):
        super().__init__()
        rank, tp = rank_size(tp_group)
        self.dim, self.eps, self.tp_group = dim, eps, tp_group
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype).chunk(tp)[rank].contiguous())
        self.weight.tp_sharded = tp > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if rank_size(self.tp_group)[1] == 1:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        ss = all_reduce_sum(x.pow(2).sum(-1, keepdim=True), self.tp_group)
        return x * torch.rsqrt(ss / self.dim + self.eps) * self.weight

    def full(self, local: torch.Tensor) -> torch.Tensor:
        return gather_dim(local, 0, self.tp_group)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        rank, tp = rank_size(self.tp_group)
        return full.chunk(tp)[rank]


def _rope_tables(seq_len: int, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[seq_len, head_dim]`` in float64 (rotate-half layout), with ``model.rope_scaling`` applied
    (:func:`moetrain.parallel.rope.scaled_inv_freq`: Llama 3's frequency bands or YaRN, whose attention factor
    scales both tables)."""
    from moetrain.parallel.rope import scaled_inv_freq

    inv, factor = scaled_inv_freq(head_dim, theta, scaling)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)  # [s, hd/2]
    ang = torch.cat([ang, ang], dim=-1)  # [s, hd] (rotate-half convention)
    return ang.cos() * factor, ang.sin() * factor


def rope_upto(mod: nn.Module, end: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention module's RoPE tables (``mod.cos`` / ``mod.sin``), grown once when generation passes the
    training length (``mod.rope_theta`` / ``mod.rope_scaling`` give the frequencies)."""
    if end > mod.cos.shape[0]:
        cos, sin = _rope_tables(max(end, 2 * mod.cos.shape[0]), dim, mod.rope_theta, mod.rope_scaling)
        mod.cos, mod.sin = cos.to(mod.cos), sin.to(mod.sin)
    return mod.cos, mod.sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


Sampler = Callable[[str], "SampledWeightGrad | None"]
"""A block's WTA-CRS seam: the weight-gradient strategy for a linear site (qkv, attn_out, mlp_up, mlp_down)."""


def _exact(site: str) -> None:
    return None


class Attention(nn.Module):
    """Causal grouped-query attention; each TP rank owns heads/tp query heads and kv_heads/tp kv heads."""

    def __init__(self, args: TransformerArgs, layer: int, *, tp_group, sp: bool, dtype: torch.dtype,
                 sampler: Sampler = _exact):
        super().__init__()
        _, tp = rank_size(tp_group)
        hd, d = args.head_dim, args.d_model
        self.hd = hd
        self.heads, self.kv_heads = args.heads // tp, args.kv_heads // tp
        self.kind = args.attention
        self.deterministic = args.deterministic
        self.selective = args.recompute == "selective"
        std = 1.0 / math.sqrt(d)
        self.qkv = ColumnParallelLinear(d, [args.heads * hd, args.kv_heads * hd, args.kv_heads * hd],
                                        tp_group=tp_group, sp=sp, seed=args.seed, name=f"layers.{layer}.attn.qkv",
                                        std=std, dtype=dtype, wgrad=sampler("qkv"), bias=args.qkv_bias)
        self.qk_norm, self.clip = args.qk_norm, args.clip_qkv
        self.q_norm = self.k_norm = None
        if args.qk_norm == "head":  # replicated over TP; each rank's heads give a partial gradient
            self.q_norm = RMSNorm(hd, args.norm_eps, sequence_parallel=tp > 1, dtype=dtype)
            self.k_norm = RMSNorm(hd, args.norm_eps, sequence_parallel=tp > 1, dtype=dtype)
        elif args.qk_norm == "full":
            self.q_norm = ShardedRMSNorm(args.heads * hd, args.norm_eps, tp_group=tp_group, dtype=dtype)
            self.k_norm = ShardedRMSNorm(args.kv_heads * hd, args.norm_eps, tp_group=tp_group, dtype=dtype)
        self.out = RowParallelLinear(args.heads * hd, d, tp_group=tp_group, sp=sp, seed=args.seed,
                                     name=f"layers.{layer}.attn.out", std=std / math.sqrt(2 * args.layers),
                                     dtype=dtype, wgrad=sampler("attn_out"))
        cos, sin = _rope_tables(args.seq_len, hd, args.rope_theta, args.rope_scaling)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        self.rope_theta, self.rope_scaling, self.layer = args.rope_theta, args.rope_scaling, layer

    def forward(self, x_SBD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        qkv = self.qkv(x_SBD)  # [s, b, (H + 2 KV) hd / tp]
        s, b, _ = qkv.shape
        q, k, v = qkv.split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.reshape(s, b, self.heads, self.hd)
        k = k.reshape(s, b, self.kv_heads, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.permute(1, 2, 0, 3)  # [b, h, s, hd]
        k = k.permute(1, 2, 0, 3)
        v = v.reshape(s, b, self.kv_heads, self.hd).permute(1, 2, 0, 3)
        if cache is not None:
            o = self._cached(q, k, v, cache)
        else:
            o = recompute(self._core, q, k, v) if self.selective else self._core(q, k, v)
        o = o.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.hd)
        return self.out(o)

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention of the new tokens (positions ``cache.pos ...``) over every token so far; appends their
        rotated keys and values to ``cache`` (generation)."""
        s, pos = q.shape[2], cache.pos
        cos, sin = rope_upto(self, pos + s, self.hd)
        cos, sin = cos[pos:pos + s], sin[pos:pos + s]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return cache.attend(self.layer, q, k, v, rep=self.heads // self.kv_heads)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rotary embedding and causal attention: ``[b, h, s, hd]`` in and out."""
        s = q.shape[2]
        cos, sin = self.cos[:s], self.sin[:s]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kind == "fused":  # csrc kernel (GQA inside, k and v not repeated); SDPA where it cannot run
            return fused_attention.attention(q, k, v, causal=True, deterministic=self.deterministic)
        if self.kind != "eager":  # SDPA groups the query heads itself (no repeated k / v in memory)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(causal, float("-inf")).softmax(dim=-1) @ v


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate/up column-parallel and down row-parallel."""

    def __init__(self, d_model: int, d_ffn: int, layers: int, layer: int, *, tp_group, sp: bool, seed: int,
                 dtype: torch.dtype, name: str | None = None, sampler: Sampler = _exact):
        super().__init__()
        name = name or f"layers.{layer}.mlp"
        std = 1.0 / math.sqrt(d_model)
        self.up = ColumnParallelLinear(d_model, [d_ffn, d_ffn], tp_group=tp_group, sp=sp, seed=seed,
                                       name=f"{name}.up", std=std, dtype=dtype, wgrad=sampler("mlp_up"))
        self.down = RowParallelLinear(d_ffn, d_model, tp_group=tp_group, sp=sp, seed=seed, name=f"{name}.down",
                                      std=1.0 / math.sqrt(d_ffn) / math.sqrt(2 * layers), dtype=dtype,
                                      wgrad=sampler("mlp_down"))

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x_SBD).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


FFNFactory = Callable[[int, DropoutStream, Sampler], nn.Module]
"""Builds block ``layer``'s feed-forward given the chunk's streams and the block's WTA-CRS sampler."""


class Block(nn.Module):
    def __init__(self, args: TransformerArgs, layer: int, ffn: nn.Module, *, tp_group, sp: bool,
                 dtype: torch.dtype, dropout: DropoutStream, sampler: Sampler = _exact):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps, sequence_parallel=sp, dtype=dtype)
        if args.kv_lora_rank:
            from moetrain.parallel.mla import LatentAttention

            self.attn = LatentAttention(args, layer, tp_group=tp_group, sp=sp, dtype=dtype, sampler=sampler)
        else:
            self.attn = Attention(args, layer, tp_group=tp_group, sp=sp, dtype=dtype, sampler=sampler)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps, sequence_parallel=sp, dtype=dtype)
        self.ffn = ffn
        self.dropout = dropout
        self.full_recompute = args.recompute == "full"

    def forward(self, x_SBD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:  # generation: no dropout, no recomputation
            h = x_SBD + self.attn(self.attn_norm(x_SBD), cache)
            return h + self.ffn(self.ffn_norm(h))
        return recompute(self._forward, x_SBD) if self.full_recompute else self._forward(x_SBD)

    def _forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        h = x_SBD + self.dropout(self.attn(self.attn_norm(x_SBD)), f"{self.layer}.attn")
        return h + self.dropout(self.ffn(self.ffn_norm(h)), f"{self.layer}.mlp")


@dataclass
class KVCache:
    """Generation state: every layer's rotated keys and values so far (``[b, kv_heads/tp, t, hd]``) and the
    position of the next token."""

    k: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    pos: int = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rep: int = 1,
               scale: float | None = None) -> torch.Tensor:
        """Append the new tokens' keys / values ``[b, kv, s, .]`` to ``layer``'s, then attention of the new
        queries (positions ``pos ...``) over every token so far; ``rep``: query heads per key-value head."""
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s, pos = q.shape[2], self.pos
        seen = torch.arange(pos + s, device=q.device)
        allowed = seen.unsqueeze(0) <= (pos + torch.arange(s, device=q.device)).unsqueeze(1)  # [s, pos + s]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


class Transformer(nn.Module):
    """The whole model, or one pipeline chunk of it: the blocks ``layer_ids`` (global layer indices,
    which also name the parameters, so ``layers.5.attn.qkv.weight`` is the same tensor in any layout),
    with the embedding when ``pre`` and the final norm, LM head and loss when ``post``.

    ``forward(inputs, targets_BS)``: ``inputs`` is the token ids ``[b, s]`` when ``pre``, else the hidden
    states ``[s(/tp), b, d]`` from the previous chunk; returns the mean token loss of this micro-batch
    (identical on every TP rank) when ``post``, else the hidden states for the next chunk. With tied
    embeddings a ``post`` chunk without ``pre`` holds its own copy of the embedding weight, kept equal
    to the first stage's by summing their gradients over the embedding group.
    """

    def __init__(self, args: TransformerArgs, *, tp_group=None, sp: bool = False, dtype: torch.dtype = torch.float32,
                 ffn_factory: FFNFactory | None = None, layer_ids: Sequence[int] | None = None,
                 pre: bool = True, post: bool = True):
        super().__init__()
        rank, tp = rank_size(tp_group)
        self.args, self.tp_group, self.sp = args, tp_group, sp and tp > 1
        self.pre, self.post = pre, post
        self.layer_ids = list(range(args.layers) if layer_ids is None else layer_ids)
        self.dropout = DropoutStream(args.seed, args.dropout, args.seq_len)
        self.dropout.seq_offset = rank * (args.seq_len // tp) if self.sp else 0
        self.vocab_padded = padded_vocab_size(args.vocab_size, tp)
        self.vocab_start = rank * (self.vocab_padded // tp)  # this rank's slice of the (padded) vocabulary
        self.embed = None
        if pre or (post and args.tie_embeddings):
            self.embed = VocabParallelEmbedding(args.vocab_size, args.d_model, tp_group=tp_group, sp=self.sp,
                                                seed=args.seed, name="embed", std=1.0, dtype=dtype)

        def dense(layer: int, streams: DropoutStream, sampler: Sampler) -> nn.Module:
            return SwiGLU(args.d_model, args.d_ffn, args.layers, layer, tp_group=tp_group, sp=self.sp,
                          seed=args.seed, dtype=dtype, sampler=sampler)

        factory = ffn_factory or dense
        samplers = {i: self._sampler(i) for i in self.layer_ids}
        self.layers = nn.ModuleDict({
            str(i): Block(args, i, factory(i, self.dropout, samplers[i]), tp_group=tp_group, sp=self.sp,
                          dtype=dtype, dropout=self.dropout, sampler=samplers[i])
            for i in self.layer_ids
        })
        self.norm = RMSNorm(args.d_model, args.norm_eps, sequence_parallel=self.sp, dtype=dtype) if post else None
        if args.tie_embeddings or not post:
            self.head = None
        else:
            self.head = ColumnParallelLinear(args.d_model, [self.vocab_padded], tp_group=tp_group, sp=self.sp,
                                             seed=args.seed, name="head", std=1.0 / math.sqrt(args.d_model),
                                             dtype=dtype, weights=self._head_init(dtype))

    def _sampler(self, layer: int) -> Sampler:
        """Block ``layer``'s WTA-CRS seam: a sampled weight gradient for each site in ``args.wtacrs_sites``
        (dense MLPs and shared experts as mlp_up / mlp_down); never the embedding or the LM head."""
        args = self.args
        if args.wtacrs is None:
            return _exact

        def for_site(site: str) -> SampledWeightGrad | None:
            if site not in args.wtacrs_sites:
                return None
            return SampledWeightGrad(args.wtacrs, self.dropout, f"layers.{layer}.{site}.0")

        return for_site

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient) as the logical unsharded tensor, by name (collective over TP)."""
        out = {}
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                t = p.grad if grads else p.data
                if t is None:
                    continue
                key = f"{mod_name}.{p_name}" if mod_name else p_name
                if key == "head.weight":
                    out[key] = gather_dim(t, 0, self.tp_group)[: self.args.vocab_size]
                elif hasattr(mod, "ep_group"):  # grouped experts: [E, ...] over ep (and etp)
                    out[key] = mod.full(t, p_name)
                elif hasattr(mod, "full"):
                    out[key] = mod.full(t)
                else:
                    out[key] = t.detach().clone()
        return out

    def _head_init(self, dtype: torch.dtype) -> torch.Tensor:
        rank, tp = rank_size(self.tp_group)
        full = torch.zeros(self.vocab_padded, self.args.d_model)
        full[: self.args.vocab_size] = init_normal((self.args.vocab_size, self.args.d_model),
                                                   1.0 / math.sqrt(self.args.d_model), self.args.seed, "head")
        return full.chunk(tp, dim=0)[rank]

    @torch.no_grad()
    def decode(self, ids_BS: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``[b, s, vocab_size]`` of new tokens ``ids_BS`` at positions ``cache.pos ...``, attending to
        the cached ones (the whole model in one chunk, without sequence parallelism; generation)."""
        assert self.pre and self.post and not self.sp, "decode needs the whole model, without SP"
        x = self.embed(ids_BS.t())
        for block in self.layers.values():
            x = block(x, cache)
        cache.pos += ids_BS.shape[1]
        x = self.norm(x)
        if self.head is not None:
            logits = self.head(x)
        else:
            from moetrain.parallel.mappings import copy_to_tp

            logits = linear(copy_to_tp(x, self.tp_group), self.embed.weight)
        full = gather_last_dim(logits, self.tp_group) if rank_size(self.tp_group)[1] > 1 else logits
        return full[..., : self.args.vocab_size].transpose(0, 1)

    def forward(self, inputs: torch.Tensor, targets_BS: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss (``post`` with targets), the logits ``[b, s, vocab_size]`` gathered over TP (``post``
        without targets), or the hidden states for the next chunk."""
        if self.pre:
            x = self.embed(inputs.t())  # [s(/tp), b, d]
            x = self.dropout(x, "embed")
        else:
            x = inputs
        for block in self.layers.values():
            x = block(x)
        if not self.post:
            return x
        x = self.norm(x)
        if self.head is not None:
            logits = self.head(x)  # [s, b, V_pad/tp]
        else:
            from moetrain.parallel.mappings import copy_to_tp

            x = gather_from_sp(x, self.tp_group) if self.sp else copy_to_tp(x, self.tp_group)
            logits = linear(x, self.embed.weight)
        if targets_BS is None:
            full = gather_last_dim(logits, self.tp_group) if rank_size(self.tp_group)[1] > 1 else logits
            return full[..., : self.args.vocab_size].transpose(0, 1)
        loss_SB = vocab_parallel_cross_entropy(logits, targets_BS.t(), self.tp_group, self.args.vocab_size,
                                               vocab_start=self.vocab_start)
        return loss_SB.mean()
