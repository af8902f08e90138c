"""The Llama-style decoder family (``model.family: llama``): RMSNorm, RoPE, grouped-query attention and
SwiGLU MLPs; with ``moe.num_experts > 0`` every ``moe.every``-th block's MLP is an MoE layer (Mixtral-
style, plus optional shared experts). The modules are :mod:`moetrain.parallel.model` and
:mod:`moetrain.moe.layer`; this file maps the config onto them and counts what they hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetrain.models.spec import BuildContext, LayerFacts, ModelFacts, ModelSpec, ParamInfo, RankShape

if TYPE_CHECKING:
    from torch import nn

    from moetrain.parallel.model import TransformerArgs

__all__ = ["LlamaSpec", "MixtralSpec", "Qwen2MoeSpec", "Qwen3MoeSpec", "OlmoeSpec", "DeepseekV3Spec"]


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
        if "_facts" not in self.__dict__:
            self._facts = self._count()
        return self._facts

    def _count(self) -> ModelFacts:
        m, moe = self.cfg.model, self.cfg.moe
        d, hd = m.d_model, m.head_dim
        if m.mla:  # q (through its latent or not), the kv latent with the shared RoPE key, kv up, out
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = (d * m.q_lora_rank + m.q_lora_rank * m.heads * qk) if m.q_lora_rank else d * m.heads * qk
            attn_mm = q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + \
                m.kv_lora_rank * m.heads * (m.qk_nope_head_dim + m.v_head_dim) + m.heads * m.v_head_dim * d
            attention_flops = 6.0 * m.seq_len * m.heads * (qk + m.v_head_dim)
        else:
            attn_mm = d * m.heads * hd + 2 * d * m.kv_heads * hd + m.heads * hd * d  # q, k, v, out
            attention_flops = 12.0 * m.seq_len * m.heads * hd
        attn = attn_mm + self._attn_extras()
        norms = 2 * d
        layers = []
        for i in range(m.layers):
            if moe.is_moe_layer(i):
                per_expert = (3 if moe.activation == "swiglu" else 2) * d * moe.d_expert
                shared = (3 * d * moe.d_shared + (d if moe.shared_expert_gate else 0)) if moe.shared_experts else 0
                router, router_mm = self._router_params()
                k = self._experts_per_token()
                layers.append(LayerFacts(
                    kind="moe",
                    params=attn + norms + moe.num_experts * per_expert + router + shared,
                    active_params=attn + norms + round(min(k, moe.num_experts) * per_expert) + router + shared,
                    matmul_params=attn_mm + k * per_expert + router_mm + shared,
                    attention_flops=attention_flops))
            else:
                mlp = 3 * d * m.d_ffn
                layers.append(LayerFacts(kind="dense", params=attn + norms + mlp, active_params=attn + norms + mlp,
                                         matmul_params=attn_mm + mlp, attention_flops=attention_flops))
        emb = m.vocab_size * d
        return ModelFacts(layers=tuple(layers), embedding_params=emb, head_params=0 if m.tie_embeddings else emb,
                          final_norm_params=d, head_matmul_params=emb)

    def _attn_extras(self) -> int:
        """Parameters of the q/k/v biases and q/k norms (not multiplied with: outside the FLOP count's weights,
        but counted here as parameters, which is all they are)."""
        m = self.cfg.model
        if m.mla:  # the latents' norms
            return m.kv_lora_rank + (m.q_lora_rank or 0)
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        extra = (q + 2 * kv) if m.qkv_bias else 0
        return extra + {"none": 0, "head": 2 * m.head_dim, "full": q + kv}[m.qk_norm]

    # ------------------------------------------------------------------ per rank (the planner's inputs)
    def _chunks(self, stage: int) -> list[tuple[range, bool, bool]]:
        """(layers, pre, post) of each model chunk pipeline rank ``stage`` holds, in order."""
        from moetrain.parallel.pipeline import chunk_layers

        p = self.cfg.parallel
        last = p.pp * p.vpp - 1
        if "_stages" not in self.__dict__:  # the balanced split is a small search: once per spec
            self._stages = self.stage_layers()
        return [(ids, c * p.pp + stage == 0, c * p.pp + stage == last)
                for c, ids in enumerate(chunk_layers(self._stages, p.pp, p.vpp, stage))]

    def rank_params(self, rank: RankShape) -> list[ParamInfo]:
        from moetrain.parallel.layers import padded_vocab_size

        m, moe, p = self.cfg.model, self.cfg.moe, self.cfg.parallel
        d, tp = m.d_model, rank.tp
        sp = rank.sp and tp > 1
        vocab = padded_vocab_size(m.vocab_size, tp) // tp * d
        tied = p.pp > 1 and m.tie_embeddings
        out: list[ParamInfo] = []

        def add(name: str, numel: int, **kw) -> None:
            out.append(ParamInfo(name, int(numel), **kw))

        def swiglu(name: str, f: int) -> None:
            add(f"{name}.up.weight", 2 * f // tp * d)
            add(f"{name}.down.weight", d * (f // tp))

        for ids, pre, post in self._chunks(rank.stage):
            if pre or (post and m.tie_embeddings):
                add("embed.weight", vocab, tied=tied)
            for i in ids:
                add(f"layers.{i}.attn_norm.weight", d, tp_partial=sp, ndim=1)
                if m.mla:
                    self._mla_params(i, add, tp)
                else:
                    self._attn_params(i, add, tp)
                add(f"layers.{i}.ffn_norm.weight", d, tp_partial=sp, ndim=1)

                if not moe.is_moe_layer(i):
                    swiglu(f"layers.{i}.ffn", m.d_ffn)
                    continue
                name, E, router = f"layers.{i}.ffn.gate.router", moe.num_experts, tp > 1
                if moe.router == "xmoe":
                    add(f"{name}.weight", E * moe.xmoe_dim, tp_partial=router)
                    add(f"{name}.proj", moe.xmoe_dim * d, tp_partial=router)
                    add(f"{name}.log_temp", 1, tp_partial=router, ndim=0)
                elif moe.router == "softmoe":
                    add(f"{name}.weight", E * moe.slots_per_expert * d, tp_partial=router)
                else:
                    add(f"{name}.weight", E * d, tp_partial=router)
                parts = 2 if moe.activation == "swiglu" else 1
                local, f = E // rank.ep, moe.d_expert // rank.etp
                add(f"layers.{i}.ffn.experts.w_up_EFD", local * parts * f * d, expert=True, ndim=3)
                add(f"layers.{i}.ffn.experts.w_down_EDF", local * d * f, expert=True, ndim=3)
                if moe.shared_experts:
                    swiglu(f"layers.{i}.ffn.shared", moe.d_shared)
                    if moe.shared_expert_gate:
                        add(f"layers.{i}.ffn.shared_gate.weight", d, tp_partial=sp)
            if post:
                add("norm.weight", d, tp_partial=sp, ndim=1)
                if not m.tie_embeddings:
                    add("head.weight", vocab)
        return out

    def _attn_params(self, i: int, add, tp: int) -> None:
        m = self.cfg.model
        d, hd = m.d_model, m.head_dim
        add(f"layers.{i}.attn.qkv.weight", (m.heads + 2 * m.kv_heads) * hd // tp * d)
        if m.qkv_bias:
            add(f"layers.{i}.attn.qkv.bias", (m.heads + 2 * m.kv_heads) * hd // tp, ndim=1)
        if m.qk_norm == "head":
            add(f"layers.{i}.attn.q_norm.weight", hd, tp_partial=tp > 1, ndim=1)
            add(f"layers.{i}.attn.k_norm.weight", hd, tp_partial=tp > 1, ndim=1)
        elif m.qk_norm == "full":
            add(f"layers.{i}.attn.q_norm.weight", m.heads * hd // tp, ndim=1)
            add(f"layers.{i}.attn.k_norm.weight", m.kv_heads * hd // tp, ndim=1)
        add(f"layers.{i}.attn.out.weight", d * (m.heads * hd // tp))

    def _mla_params(self, i: int, add, tp: int) -> None:
        """Multi-head latent attention (parallel/mla.py): replicated down projections and latent norms
        (partial gradients over TP), column-parallel up projections, row-parallel output."""
        m = self.cfg.model
        d, h, qk = m.d_model, m.heads // tp, m.qk_nope_head_dim + m.qk_rope_head_dim
        a = f"layers.{i}.attn"
        if m.q_lora_rank:
            add(f"{a}.q_down.weight", m.q_lora_rank * d, tp_partial=tp > 1)
            add(f"{a}.q_norm.weight", m.q_lora_rank, tp_partial=tp > 1, ndim=1)
            add(f"{a}.q_up.weight", h * qk * m.q_lora_rank)
        else:
            add(f"{a}.q.weight", h * qk * d)
        add(f"{a}.kv_down.weight", (m.kv_lora_rank + m.qk_rope_head_dim) * d, tp_partial=tp > 1)
        add(f"{a}.kv_norm.weight", m.kv_lora_rank, tp_partial=tp > 1, ndim=1)
        add(f"{a}.kv_up.weight", h * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank)
        add(f"{a}.out.weight", d * h * m.v_head_dim)

    def saved_activation_bytes(self, layers: range, *, pre: bool, post: bool, rank: RankShape) -> float:
        """Bytes of the tensors this implementation's autograd keeps for one micro-batch (counted from what
        ``parallel/model.py`` and ``moe/`` save, storages once; see tests/test_plan.py for the measured check).

        Per token of the micro-batch (``e`` bytes per float element, int64 indices 8): an RMSNorm keeps its input,
        output and 1/rms; a linear its input (the gathered sequence under SP); attention the rotated q and k (or,
        with GQA, q and the repeated k, v), the qkv output it views v from (MHA), its output and the log-sum-exp;
        SwiGLU the up output, the gated product and the down input. An MoE block keeps the router's input,
        probabilities and choices, the routed rows (packed, in the experts, combined) and their indices.
        Full recomputation keeps each block's input; selective keeps attention's inputs and output."""
        from moetrain.parallel.layers import padded_vocab_size

        m, moe, cfg = self.cfg.model, self.cfg.moe, self.cfg
        d, hd, tp, e = m.d_model, m.head_dim, rank.tp, rank.act_bytes
        tokens = cfg.model.seq_len * rank.micro_batch
        sp = rank.sp and tp > 1
        norm_tokens = tokens // tp if sp else tokens
        wt = cfg.wtacrs
        sampled = set(wt.layers) if wt.enabled else set()

        def lin_in(width: float, site: str) -> float:  # a linear's saved input (a WTA-CRS sample of it)
            rows = tokens * (wt.keep_ratio if site in sampled else 1.0)
            return rows * width * e

        def norm() -> float:
            return norm_tokens * ((2 * d + 1) * e)

        def swiglu(f: int, up_site: str = "mlp_up", down_site: str = "mlp_down") -> float:
            f //= tp
            return lin_in(d, up_site) + tokens * 2 * f * e + tokens * f * e + lin_in(f, down_site)

        h, kv = m.heads // tp, m.kv_heads // tp
        total = 0.0
        if pre:
            total += tokens * 9  # token ids (int64) and the vocab-range mask
        for i in layers:
            if rank.recompute == "full":
                total += norm_tokens * d * e
                continue
            total += norm() + lin_in(d, "qkv")
            if m.qk_norm != "none":  # each norm keeps its input, output and 1 / rms
                q_kv = (h + kv) * hd
                total += tokens * (2 * q_kv * e + (2 if m.qk_norm == "full" else h + kv) * e)
            total += 2 * m.seq_len * hd * e  # rotary cos / sin tables
            if rank.recompute == "selective":
                total += tokens * ((h + 2 * kv) * hd + h * hd) * e
            else:
                qkv = 2 * h * hd if kv != h else (kv + h + 2 * kv) * hd  # GQA: k, v repeated; MHA: k, qkv storage
                total += tokens * (h * hd + qkv + h * hd) * e + tokens * h * 4
            total += norm()
            if not moe.is_moe_layer(i):
                total += swiglu(m.d_ffn)
                continue
            k = self._experts_per_token()
            moe_tokens = norm_tokens
            rows = moe_tokens * k * rank.expert_rows_factor
            E, f = moe.num_experts, moe.d_expert // rank.etp
            parts = 2 if moe.activation == "swiglu" else 1
            total += moe_tokens * (d * e + E * 4 + 8 * k + 4 + 4 * k)  # router input, probs, top-k, gates
            expert = (parts * f + 2 * f) if moe.activation == "swiglu" else (2 * f)
            total += rows * (8 + d * e + expert * e + 8 + 8 + 4 + d * e)  # order, experts, combine
            total += moe_tokens * 24 + E * 4
            if moe.shared_experts:
                total += swiglu(moe.d_shared)
                if moe.shared_expert_gate:  # the gate's input (the layer input) is kept already; its output
                    total += norm_tokens * 2 * e
        if post:
            total += norm() + tokens * d * e
            total += tokens * padded_vocab_size(m.vocab_size, tp) // tp * e + tokens * 9
        return total

    # ------------------------------------------------------------------ building
    def args(self) -> TransformerArgs:
        """The modules' arguments: the ``model`` section plus the run's seed, recomputation and WTA-CRS."""
        from moetrain.parallel.model import TransformerArgs
        from moetrain.parallel.wtacrs import WTACRSConfig

        cfg = self.cfg
        m, w = cfg.model, cfg.wtacrs
        return TransformerArgs(
            layers=m.layers, d_model=m.d_model, heads=m.heads, kv_heads=m.kv_heads, d_ffn=m.d_ffn,
            head_dim=m.head_dim, qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, clip_qkv=m.clip_qkv,
            kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, rope_interleave=m.rope_interleave,
            rope_scaling=m.rope_scaling.model_dump() if m.rope_scaling is not None else None,
            vocab_size=m.vocab_size, seq_len=m.seq_len, attention=m.attention, tie_embeddings=m.tie_embeddings,
            dropout=m.dropout, norm_eps=m.norm_eps, rope_theta=m.rope_theta, seed=cfg.train.seed,
            wtacrs=WTACRSConfig(keep_ratio=w.keep_ratio, k_min=w.min_rows, seed=cfg.train.seed) if w.enabled else None,
            wtacrs_sites=tuple(w.layers) if w.enabled else (), recompute=cfg.train.recompute,
            deterministic=cfg.train.deterministic)

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
                shared = SwiGLU(m.d_model, moe.d_shared, m.layers, layer, tp_group=tp_group,
                                sp=sp, seed=args.seed, dtype=ctx.dtype, name=f"layers.{layer}.moe.shared",
                                sampler=sampler)
            return MoELayer(moe, layer, groups, d_model=m.d_model, sp=sp, dtype=ctx.dtype, seed=args.seed,
                            num_layers=m.layers, streams=streams, runtime=ctx.moe, shared=shared,
                            wtacrs=args.wtacrs, wtacrs_sites=args.wtacrs_sites)

        return build


class _HFFamilySpec(LlamaSpec):
    """A Hugging Face architecture built from the same modules (its differences are config keys: q/k/v biases,
    q/k norms, clipping, gate normalisation, a gated shared expert). The config rules that keep a job within
    what the architecture can express are in :func:`moetrain.models.hf_config.check_family`; tensor names in
    :mod:`moetrain.models.hf_weights`."""


class MixtralSpec(_HFFamilySpec):
    name = "mixtral"


class Qwen2MoeSpec(_HFFamilySpec):
    name = "qwen2_moe"


class Qwen3MoeSpec(_HFFamilySpec):
    name = "qwen3_moe"


class OlmoeSpec(_HFFamilySpec):
    name = "olmoe"


class DeepseekV3Spec(_HFFamilySpec):
    """DeepSeek-V3: multi-head latent attention (parallel/mla.py), dense first blocks, group-limited sigmoid
    routing with the correction bias and routed_scaling_factor, shared experts (multi-token prediction is not
    built: its layers in an HF checkpoint are skipped on import)."""

    name = "deepseek_v3"
