"""What a model family provides to the rest of moetrain: the model spec contract and the model facts.

A :class:`ModelSpec` is one architecture family applied to one job config. It owns
- its facts (:meth:`ModelSpec.facts`): total and active parameters and training FLOPs per token, per
  layer, from the config alone; the one source used by ``moetrain validate``, the trainer's MFU, the
  pipeline split, benchmarks and the planner;
- building this rank's model chunks for a layout (:meth:`ModelSpec.build`), with every runtime
  collaborator passed in through a :class:`BuildContext`;
- what a checkpoint of it must match (:meth:`ModelSpec.shape_keys`) and the hidden-state shape that
  crosses pipeline stages (:meth:`ModelSpec.boundary_shape`).

Families register in :data:`moetrain.registry.MODEL_FAMILIES` and are chosen by ``model.family``; the
trainer only talks to this contract, so adding a family touches no trainer code.

The chunk contract (what :meth:`ModelSpec.build` returns, one module per virtual pipeline stage this rank
holds, in order): ``forward(inputs, targets)`` returns the micro-batch's mean loss on the last stage
(``post``) and the hidden states elsewhere; attributes ``pre`` / ``post`` (first / last stage), ``dropout``
(the chunk's step streams, with ``set(step, sample_ids)``), ``embed`` (the embedding module or None, for
tied embeddings across stages) and ``full_tensors(grads)`` (logical unsharded tensors by name).

FLOPs convention (PaLM / Megatron, training = forward + backward = 3x forward, no recomputation):
``flops_per_token = 6 * matmul_params + attention_flops_per_token``, where ``matmul_params`` counts the
weights one token is multiplied with (attention projections; the dense MLP, or for an MoE block the
router, the shared experts and the experts the token is expected to visit; the LM head, also when tied;
not the embedding lookup) and attention's QK^T and AV add ``12 * layers * seq_len * d_attn`` (the full
square, not halved for the causal mask). Experts a token visits: ``topk`` for token-choice routers
(capacity drops not subtracted), ``topk * capacity_factor`` for expert choice, ``num_experts *
slots_per_expert / seq_len`` for Soft MoE.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moetrain.registry import MODEL_FAMILIES

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moetrain.config import JobConfig
    from moetrain.dist.groups import ParallelGroups
    from moetrain.moe.runtime import MoERuntime

__all__ = ["LayerFacts", "ModelFacts", "ParamInfo", "RankShape", "BuildContext", "ModelSpec", "get_model_spec"]


@dataclass(frozen=True)
class LayerFacts:
    """One transformer block's counts."""

    kind: str
    """``dense`` or ``moe``."""
    params: int
    """Every parameter of the block (norms included)."""
    active_params: int
    """Parameters one token's forward uses (top-k experts, not all of them)."""
    matmul_params: float
    """Weights one token is multiplied with (fractional for expert choice / Soft MoE expectations)."""
    attention_flops: float
    """Training FLOPs per token of attention's QK^T and AV (12 * seq_len * d_attn)."""


@dataclass(frozen=True)
class ModelFacts:
    """Parameter and FLOP counts of a model, from its config; see the module docstring for the convention."""

    layers: tuple[LayerFacts, ...]
    embedding_params: int
    head_params: int
    """0 with tied embeddings (the head reuses the embedding)."""
    final_norm_params: int
    head_matmul_params: int
    """The LM head's weights every token multiplies with, tied or not."""

    @property
    def total_params(self) -> int:
        return sum(f.params for f in self.layers) + self.embedding_params + self.head_params + \
            self.final_norm_params

    @property
    def active_params(self) -> int:
        return sum(f.active_params for f in self.layers) + self.embedding_params + self.head_params + \
            self.final_norm_params

    @property
    def matmul_params(self) -> float:
        return sum(f.matmul_params for f in self.layers) + self.head_matmul_params

    @property
    def flops_per_token(self) -> float:
        """Training (forward + backward) FLOPs per token."""
        return 6.0 * self.matmul_params + sum(f.attention_flops for f in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"total_params": self.total_params, "active_params": self.active_params,
                "matmul_params": self.matmul_params, "flops_per_token": self.flops_per_token,
                "embedding_params": self.embedding_params, "head_params": self.head_params,
                "layers": [vars(f) for f in self.layers]}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor a rank holds, as the planner needs it (no torch): its local element count and
    how its gradient is reduced."""

    name: str
    numel: int
    expert: bool = False
    """Sharded over ep (and etp), its gradient reduced over edp."""
    tp_partial: bool = False
    """Replicated over TP with a partial gradient on each TP rank (SP norms, routers): summed over TP first."""
    tied: bool = False
    """The tied embedding held by both the first and the last pipeline stage."""
    ndim: int = 2


@dataclass(frozen=True)
class RankShape:
    """What one rank of a layout holds and computes: the inputs of :meth:`ModelSpec.rank_params` and
    :meth:`ModelSpec.saved_activation_bytes`."""

    stage: int
    """Pipeline rank."""
    tp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    micro_batch: int = 1
    recompute: str = "none"
    act_bytes: int = 4
    """Bytes per element of the activations autograd saves (4: float32, 2: bfloat16 autocast, 8: float64)."""
    expert_rows_factor: float = 1.0
    """Expert rows this rank computes relative to the balanced share (> 1: the worst-case imbalance)."""


@dataclass(frozen=True)
class BuildContext:
    """Where and how this rank builds its part of the model."""

    groups: ParallelGroups
    device: torch.device
    dtype: torch.dtype
    """Parameter dtype (float32, or float64 for float64 runs; bfloat16 runs keep float32 weights)."""
    stage_layers: tuple[int, ...]
    """Layers of each of the pp * vpp virtual pipeline stages, in order."""
    moe: MoERuntime
    """The MoE layers' run-level collaborators (aux-loss weight, kernels, link engine, tuners, window)."""


class ModelSpec(ABC):
    """One model family applied to one job config."""

    name: str = ""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    @abstractmethod
    def facts(self) -> ModelFacts:
        """Parameter and FLOP counts (no torch needed)."""

    @abstractmethod
    def build(self, ctx: BuildContext) -> list[nn.Module]:
        """This rank's model chunks (virtual stages ``c * pp + stage`` for ``c < vpp``), on ``ctx.device``."""

    @abstractmethod
    def boundary_shape(self, micro_batch: int, tp: int) -> tuple[int, ...]:
        """The hidden states one pipeline stage sends the next for a micro-batch (this rank's shard)."""

    def stage_layers(self) -> list[int]:
        """Layers of each of the pp * vpp virtual pipeline stages: ``parallel.pipeline_layers``, or balanced
        by each block's parameters (the LM head counted with the last stage)."""
        from moetrain.parallel.pipeline import stage_layers

        p, facts = self.cfg.parallel, self.facts()
        return stage_layers(p.pp, p.vpp, [f.params for f in facts.layers], facts.head_matmul_params,
                            p.pipeline_layers)

    def rank_params(self, rank: RankShape) -> list[ParamInfo]:
        """The parameters a rank of pipeline stage ``rank.stage`` holds, in ``model.parameters()`` order (which
        fixes the gradient buckets, so ZeRO shard sizes follow exactly). Needed by ``moetrain plan``."""
        raise NotImplementedError(f"model family {self.name!r} does not list its parameters per rank "
                                  "(ModelSpec.rank_params), which moetrain plan needs")

    def saved_activation_bytes(self, layers: range, *, pre: bool, post: bool, rank: RankShape) -> float:
        """Bytes autograd saves for backward when one micro-batch runs through a chunk of ``layers`` (with the
        embedding when ``pre``, the final norm, head and loss when ``post``) on one rank."""
        raise NotImplementedError(f"model family {self.name!r} does not model its activations "
                                  "(ModelSpec.saved_activation_bytes), which moetrain plan needs")

    def shape_keys(self) -> dict[str, Any]:
        """Config values that fix parameter shapes: a checkpoint saved with other values cannot load."""
        r = self.cfg.resolved()
        keys = {f"model.{k}": v for k, v in r["model"].items() if k != "hf_config"}  # where from is no shape
        keys.update({f"moe.{k}": r["moe"][k] for k in ("num_experts", "every", "d_expert", "shared_experts",
                                                        "activation", "router", "xmoe_dim", "slots_per_expert",
                                                        "d_shared", "shared_expert_gate", "first_k_dense")})
        return keys

    def shape_differences(self, saved: dict[str, Any]) -> list[str]:
        """How a checkpoint's shape keys differ from this config's (keys added to moetrain after the
        checkpoint was written count as equal while they hold the value that older versions implied)."""
        mine = self.shape_keys()
        m = self.cfg.model
        implied = {"model.head_dim": m.d_model // m.heads, "model.qkv_bias": False, "model.qk_norm": "none",
                   "model.clip_qkv": None, "moe.shared_expert_gate": False, "moe.first_k_dense": 0,
                   **{f"model.{k}": None for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                                                     "qk_rope_head_dim", "v_head_dim")},
                   "model.rope_interleave": False,
                   "moe.d_shared": self.cfg.moe.shared_experts * (self.cfg.moe.d_expert or 0) or None}
        return [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in mine.items()
                if saved.get(k, implied.get(k)) != v]


def get_model_spec(cfg: JobConfig) -> ModelSpec:
    """The spec of ``cfg.model.family`` (a registered family or an import path) for ``cfg``."""
    return MODEL_FAMILIES.get(cfg.model.family)(cfg)
