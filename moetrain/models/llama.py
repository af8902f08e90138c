"""The Llama-style decoder family (``model.family: llama``): RMSNorm, RoPE, grouped-query attention and
SwiGLU MLPs; with ``moe.num_experts > 0`` every ``moe.every``-th block's MLP is an MoE layer (Mixtral-
style, plus optional shared experts). The modules are :mod:`moetrain.parallel.model` and
:mod:`moetrain.moe.layer`; this file maps the config onto them and counts what they hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetrain.models.spec import BuildContext, LayerFacts, ModelFacts, ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from moetrain.parallel.model import TransformerArgs

__all__ = ["LlamaSpec"]


class LlamaSpec(ModelSpec):
    name = "llama"

    # ------------------------------------------------------------------ facts
    def _router_params(self) -> tuple[int, int]:
        """(parameters, matmul weights per token) of one block's router."""
        m, moe = self.cfg.model, self.cfg.moe
        d, E = m.d_model, moe.num_experts
        if moe.router == "xmoe":  # projection to xmoe_dim, expert embeddings there, a temperature
            return moe.xmoe_dim * d + E * moe.xmoe_dim + 1, moe.xmoe_dim * d + E * moe.xmoe_dim
        if moe.router == "softmoe":
            return E * moe.slots_per_expert * d, E * moe.slots_per_expert * d
        return E * d, E * d

    def _experts_per_token(self) -> float:
        moe, s = self.cfg.moe, self.cfg.model.seq_len
        if moe.router == "expert_choice":
            return moe.topk * (moe.capacity_factor or 1.0)
        if moe.router == "softmoe":
            return moe.num_experts * moe.slots_per_expert / s
        return {"switch": 1, "gshard": 2}.get(moe.router, moe.topk)

    def facts(self) -> ModelFacts:
        m, moe = self.cfg.model, self.cfg.moe
        d, hd = m.d_model, m.head_dim
        attn = d * m.heads * hd + 2 * d * m.kv_heads * hd + m.heads * hd * d  # q, k, v, out
        norms = 2 * d
        attention_flops = 12.0 * m.seq_len * m.heads * hd
        layers = []
        for i in range(m.layers):
            if moe.is_moe_layer(i):
                per_expert = (3 if moe.activation == "swiglu" else 2) * d * moe.d_expert
                shared = 3 * d * moe.shared_experts * moe.d_expert
                router, router_mm = self._router_params()
                k = self._experts_per_token()
                layers.append(LayerFacts(
                    kind="moe",
                    params=attn + norms + moe.num_experts * per_expert + router + shared,
                    active_params=attn + norms + round(min(k, moe.num_experts) * per_expert) + router + shared,
                    matmul_params=attn + k * per_expert + router_mm + shared,
                    attention_flops=attention_flops))
            else:
                mlp = 3 * d * m.d_ffn
                layers.append(LayerFacts(kind="dense", params=attn + norms + mlp, active_params=attn + norms + mlp,
                                         matmul_params=attn + mlp, attention_flops=attention_flops))
        emb = m.vocab_size * d
        return ModelFacts(layers=tuple(layers), embedding_params=emb, head_params=0 if m.tie_embeddings else emb,
                          final_norm_params=d, head_matmul_params=emb)

    # ------------------------------------------------------------------ building
    def args(self) -> TransformerArgs:
        """The modules' arguments: the ``model`` section plus the run's seed, recomputation and WTA-CRS."""
        from moetrain.parallel.model import TransformerArgs
        from moetrain.parallel.wtacrs import WTACRSConfig

        cfg = self.cfg
        m, w = cfg.model, cfg.wtacrs
        return TransformerArgs(
            layers=m.layers, d_model=m.d_model, heads=m.heads, kv_heads=m.kv_heads, d_ffn=m.d_ffn,
            vocab_size=m.vocab_size, seq_len=m.seq_len, attention=m.attention, tie_embeddings=m.tie_embeddings,
            dropout=m.dropout, norm_eps=m.norm_eps, rope_theta=m.rope_theta, seed=cfg.train.seed,
            wtacrs=WTACRSConfig(keep_ratio=w.keep_ratio, k_min=w.min_rows, seed=cfg.train.seed) if w.enabled else None,
            wtacrs_sites=tuple(w.layers) if w.enabled else (), recompute=cfg.train.recompute)

    def boundary_shape(self, micro_batch: int, tp: int) -> tuple[int, ...]:
        m, sp = self.cfg.model, self.cfg.parallel.sp and tp > 1
        return (m.seq_len // tp if sp else m.seq_len, micro_batch, m.d_model)

    def build(self, ctx: BuildContext) -> list[nn.Module]:
        from moetrain.parallel.model import Transformer
        from moetrain.parallel.pipeline import chunk_layers

        p = self.cfg.parallel
        args = self.args()
        stage = ctx.groups.rank("pp")
        last = p.pp * p.vpp - 1
        return [Transformer(args, tp_group=ctx.groups.get("tp"), sp=p.sp, dtype=ctx.dtype,
                            ffn_factory=self._ffn_factory(args, ctx), layer_ids=ids, pre=c * p.pp + stage == 0,
                            post=c * p.pp + stage == last).to(ctx.device)
                for c, ids in enumerate(chunk_layers(ctx.stage_layers, p.pp, p.vpp, stage))]

    def _ffn_factory(self, args: TransformerArgs, ctx: BuildContext):
        """Each block's feed-forward: the dense SwiGLU MLP, or an MoE layer on ``moe.every``-th blocks."""
        from moetrain.moe.layer import MoEGroups, MoELayer
        from moetrain.parallel.model import SwiGLU

        cfg, moe = self.cfg, self.cfg.moe
        m = cfg.model
        tp_group = ctx.groups.get("tp")
        sp = cfg.parallel.sp
        groups = MoEGroups.from_parallel(ctx.groups)

        def build(layer: int, streams, sampler) -> nn.Module:
            if not moe.is_moe_layer(layer):
                return SwiGLU(m.d_model, m.d_ffn, m.layers, layer, tp_group=tp_group, sp=sp, seed=args.seed,
                              dtype=ctx.dtype, sampler=sampler)
            shared = None
            if moe.shared_experts:
                shared = SwiGLU(m.d_model, moe.shared_experts * moe.d_expert, m.layers, layer, tp_group=tp_group,
                                sp=sp, seed=args.seed, dtype=ctx.dtype, name=f"layers.{layer}.moe.shared",
                                sampler=sampler)
            return MoELayer(moe, layer, groups, d_model=m.d_model, sp=sp, dtype=ctx.dtype, seed=args.seed,
                            num_layers=m.layers, streams=streams, runtime=ctx.moe, shared=shared,
                            wtacrs=args.wtacrs, wtacrs_sites=args.wtacrs_sites)

        return build
