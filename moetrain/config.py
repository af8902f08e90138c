"""Typed job configuration: one YAML file per job, dotted ``KEY=VALUE`` overrides, strict validation.

Every section is a pydantic model that forbids unknown keys and does strict typing (``"3"`` is not an
int, ``true`` is not a number). A section's own rules live in its ``check_rules`` method; the rules
that involve several sections are in :func:`check_consistency`, each stated once and naming the field
it rejects. Every user mistake surfaces as :class:`ConfigError` with a dotted path, which the CLI
prints as one line ``config error: <path>: <reason>``.

Sections are the constructors' arguments: the MoE layer and its routers take :class:`MoEConfig`, the
model spec reads :class:`ModelConfig`. Derived defaults (``model.kv_heads``, ``model.d_ffn``,
``moe.d_expert``) are filled in at validation, so every consumer sees the same resolved value.

This module sits at the bottom of the import graph (no torch) so ``moetrain validate`` stays fast.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moetrain.dist.topology import Layout, LayoutError, build_rank_grid
from moetrain.errors import UserError
from moetrain.registry import DISPATCHERS, MODEL_FAMILIES, ROUTERS

__all__ = [
    "ConfigError",
    "JobConfig",
    "ModelConfig",
    "MoEConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_from_dict",
    "check_consistency",
    "write_resolved",
    "parse_duration",
]


class ConfigError(UserError, ValueError):
    """A user mistake in a job config, located by a dotted path (``parallel.tp``) or a file name."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)

    def check_rules(self, path: str) -> None:
        """Rules among this section's own fields; ``path`` is the section's dotted name."""

    def _fill(self, name: str, value: Any) -> None:
        """Set a derived default without marking the field as given by the user."""
        self.__dict__[name] = value


# --------------------------------------------------------------------------------------------- sections
class ClusterConfig(_Section):
    launcher: Literal["local", "ray", "mpi", "env"] = "local"
    """local: simulated ranks spawned on this machine; ray/mpi/env: real ranks started by that launcher."""
    nodes: int = Field(1, ge=1)
    ranks_per_node: int = Field(1, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    ray_address: Optional[str] = None
    """host:port of a running Ray head ('auto': the one on this machine); unset: a local instance."""
    ray_placement_timeout_s: float = Field(60.0, gt=0)
    """How long Ray may take to find resources for the ranks before the job fails."""
    collective_timeout_s: float = Field(300.0, gt=0)
    """A collective that waits longer than this fails with an error instead of hanging."""
    keep_freed_memory: bool = True
    """CPU ranks: glibc malloc keeps freed memory for reuse (as jemalloc / tcmalloc do) instead of faulting
    each step's large temporaries in afresh; 1.25x on a CPU MoE step. false: glibc's defaults."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def check_rules(self, path: str) -> None:
        if self.launcher == "local" and self.ray_address:
            raise ConfigError(f"{path}.ray_address", "only used with cluster.launcher=ray")
        if self.device == "cuda" and self.launcher == "local":
            # Local ranks run on this machine, so its GPUs are what the job gets. Other launchers start
            # ranks elsewhere; each rank checks its own device at start-up.
            import torch

            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have == 0:
                raise ConfigError(f"{path}.device", "cuda requested but this machine has no CUDA device")
            if self.ranks_per_node > have:
                raise ConfigError(f"{path}.ranks_per_node",
                                  f"{self.ranks_per_node} ranks per node but only {have} CUDA devices")


class LinkConfig(_Section):
    latency_us: float = Field(0.0, ge=0)
    bandwidth_gbps: float = Field(100.0, gt=0)
    """Gigabytes per second."""


class NetworkConfig(_Section):
    simulate: bool = False
    """Delay collectives on simulated ranks by latency + bytes/bandwidth of their link class."""
    isolation: Literal["none", "netns"] = "none"
    """none: every simulated rank on this machine's loopback. netns: each simulated node a real host (its own
    network namespace and address, a veth to a shared bridge) whose link the kernel shapes to
    ``inter.bandwidth_gbps``; needs root and iproute2 (dist/netns.py)."""
    intra: LinkConfig = LinkConfig(latency_us=5.0, bandwidth_gbps=100.0)
    inter: LinkConfig = LinkConfig(latency_us=20.0, bandwidth_gbps=12.5)


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    etp: int = Field(1, ge=1)
    """Expert tensor parallelism: expert weights sharded over this many ranks."""
    dp: Optional[int] = Field(None, ge=1)
    """Derived as world / (tp * pp) when omitted."""
    sp: bool = False
    vpp: int = Field(1, ge=1)
    """Virtual pipeline chunks per stage (schedule ``interleaved``)."""
    schedule: Literal["gpipe", "1f1b", "interleaved", "zero_bubble"] = "1f1b"
    pipeline_layers: Optional[list[Annotated[int, Field(ge=1)]]] = None
    """Layers of each of the pp*vpp virtual stages, in order; default: balanced by parameter count."""

    def check_rules(self, path: str) -> None:
        if self.vpp > 1:
            if self.pp == 1:
                raise ConfigError(f"{path}.vpp", "virtual pipeline stages need parallel.pp > 1")
            if self.schedule != "interleaved":
                raise ConfigError(f"{path}.schedule", f"parallel.vpp={self.vpp} needs schedule 'interleaved'")
        if self.schedule == "interleaved" and self.vpp == 1 and self.pp > 1:
            raise ConfigError(f"{path}.vpp", "schedule 'interleaved' needs parallel.vpp > 1")
        if self.pipeline_layers is not None and len(self.pipeline_layers) != self.pp * self.vpp:
            raise ConfigError(f"{path}.pipeline_layers", f"{len(self.pipeline_layers)} entries for pp*vpp = "
                                                         f"{self.pp}*{self.vpp} = {self.pp * self.vpp} pipeline chunks")


class RopeScalingConfig(_Section):
    """Longer contexts for RoPE (parallel/rope.py): Llama 3.1's frequency bands or YaRN."""

    type: Literal["llama3", "yarn"]
    factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(ge=1)
    low_freq_factor: float = Field(1.0, gt=0)
    """llama3"""
    high_freq_factor: float = Field(4.0, gt=0)
    """llama3"""
    beta_fast: float = Field(32.0, gt=0)
    """yarn"""
    beta_slow: float = Field(1.0, gt=0)
    """yarn"""
    mscale: Optional[float] = None
    """yarn: with mscale_all_dim, the attention factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    """yarn: cos / sin multiplier (default from factor and the mscales)."""
    truncate: bool = True
    """yarn: round the correction range to whole dims."""

    def check_rules(self, path: str) -> None:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"{path}.high_freq_factor", f"{self.high_freq_factor} must exceed low_freq_factor="
                                                          f"{self.low_freq_factor}")


class ModelConfig(_Section):
    family: str = "llama"
    """Model family (a registered model spec): ``llama`` is the Llama-style decoder, dense or with MoE blocks
    (Mixtral-style) as the ``moe`` section says."""
    layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: Optional[int] = Field(None, ge=1)
    """Grouped-query attention; defaults to ``heads`` (multi-head attention)."""
    d_ffn: Optional[int] = Field(None, ge=1)
    """Feed-forward hidden size; defaults to 4 * d_model."""
    vocab_size: int = Field(256, ge=2)
    seq_len: int = Field(64, ge=2)
    attention: Literal["sdpa", "fused", "eager"] = "sdpa"
    tie_embeddings: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: Optional[RopeScalingConfig] = None
    """Llama 3.1 / YaRN frequency scaling for long contexts (None: plain RoPE)."""
    head_dim: Optional[int] = Field(None, ge=2)
    """Width of one attention head; defaults to d_model / heads (Qwen3-MoE sets it independently)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2-MoE)."""
    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm on queries and keys before RoPE: ``head`` over each head's width (Qwen3-MoE), ``full`` over all
    heads' query / key projection at once (OLMoE; one extra all-reduce under TP)."""
    clip_qkv: Optional[float] = Field(None, gt=0)
    """Clamp queries, keys and values to [-clip_qkv, clip_qkv] after the projection (OLMoE)."""
    kv_lora_rank: Optional[int] = Field(None, ge=1)
    """Multi-head latent attention (DeepSeek-V2/V3) when set: keys and values are up-projected per head from a
    shared latent of this width (plus one shared RoPE key of qk_rope_head_dim)."""
    q_lora_rank: Optional[int] = Field(None, ge=1)
    """MLA: queries through a latent of this width too (None: one full query projection)."""
    qk_nope_head_dim: Optional[int] = Field(None, ge=1)
    qk_rope_head_dim: Optional[int] = Field(None, ge=2)
    v_head_dim: Optional[int] = Field(None, ge=1)
    rope_interleave: bool = False
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) instead of the two halves."""
    hf_config: Optional[str] = None
    """A Hugging Face model directory (or its config.json): its architecture fills the model and moe sections;
    a key given here as well must agree with it (moetrain/models/hf_config.py)."""

    @model_validator(mode="after")
    def _derived_defaults(self) -> ModelConfig:
        if self.kv_heads is None:
            self._fill("kv_heads", self.heads)
        if self.d_ffn is None:
            self._fill("d_ffn", 4 * self.d_model)
        if self.head_dim is None:
            self._fill("head_dim", self.d_model // self.heads)
        return self

    @property
    def attn_dim(self) -> int:
        """Width of all query heads together (heads * head_dim; d_model unless head_dim is set apart)."""
        return self.heads * self.head_dim

    def check_rules(self, path: str) -> None:
        why = MODEL_FAMILIES.check(self.family)
        if why:
            raise ConfigError(f"{path}.family", why)
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise ConfigError(f"{path}.kv_heads", f"{self.kv_heads} kv heads must divide model.heads={self.heads}")
        if "head_dim" not in self.model_fields_set and self.d_model % self.heads:
            raise ConfigError(f"{path}.d_model", f"{self.d_model} is not divisible by model.heads={self.heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{path}.head_dim", f"head dim {self.head_dim} must be even for rotary embedding")
        if self.rope_scaling is not None:
            self.rope_scaling.check_rules(f"{path}.rope_scaling")
        mla = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.kv_lora_rank is None:
            given = [k for k in mla if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{path}.{given[0]}", "multi-head latent attention needs model.kv_lora_rank")
            return
        for key in mla[1:]:
            if getattr(self, key) is None:
                raise ConfigError(f"{path}.{key}", "needed with model.kv_lora_rank (multi-head latent attention)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{path}.qk_rope_head_dim", f"{self.qk_rope_head_dim} must be even for RoPE")
        for key, bad in (("qk_norm", self.qk_norm != "none"), ("qkv_bias", self.qkv_bias),
                         ("clip_qkv", self.clip_qkv is not None), ("attention", self.attention == "fused")):
            if bad:
                raise ConfigError(f"{path}.{key}", "not available with multi-head latent attention")

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: str | float) -> float:
    """Seconds in ``3h50m`` / ``1d2h`` / ``90m`` / ``45s``, ``[[DD-]HH:]MM:SS`` (Slurm), or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower().replace(" ", "")
    match = _DURATION.match(text)
    if text and match and any(match.groups()):
        d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = ((d * 24 + h) * 60 + m) * 60 + s
    elif re.match(r"^(\d+-)?(\d+:){1,2}\d+$", text):
        days, _, clock = text.rpartition("-")
        parts = [float(p) for p in clock.split(":")]
        seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts))) + float(days or 0) * 86400
    else:
        raise ValueError(f"{value!r} is not a duration (e.g. 3h50m, 90m, 45s, 03:50:00 or a number of seconds)")
    if seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


# routers that do not pick k experts per token (so topk is not bounded by num_experts)
_NOT_TOKEN_CHOICE = ("softmoe", "expert_choice")


class MoEConfig(_Section):
    num_experts: int = Field(0, ge=0)
    """0 means a dense model."""
    topk: int = Field(2, ge=1)
    router: str = "topk"
    """A registered router (topk, switch, gshard, sigmoid, xmoe, softmoe, expert_choice) or an import path
    ``package.module:Router`` (moetrain.registry)."""
    capacity_factor: Optional[float] = Field(None, gt=0)
    """None means dropless."""
    drop_policy: Literal["position", "probs"] = "probs"
    every: int = Field(1, ge=1)
    """Every n-th block is an MoE block (the others dense)."""
    dispatch: str = "flat"
    """A registered dispatch algorithm (flat, hier2d, hier1d) or an import path (moetrain.registry)."""
    token_once: Union[Literal["auto"], bool] = "auto"
    """Under EP: send each token once to every rank that holds one of its experts (with its assignments' rows
    and gates, by the ``dispatch`` algorithm), weigh and sum its expert outputs there, and send one row back,
    instead of one row per assignment each way. Top-k of E experts on R ranks reaches
    R * (1 - C(E - E/R, k) / C(E, k)) ranks per token under uniform routing, not k (top-8 of 128 on 2 ranks:
    2 rows instead of 8). Same result up to summation order. ``auto``: on where that is at most 3/4 of k (it
    adds two small exchanges, which top-2 of 8 does not repay). Applies to token routers without the csrc
    kernels, chunk pipelining or WTA-CRS on the experts; elsewhere the assignment rows travel."""
    pipeline_degree: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = 1
    """Forward chunks of the dispatch/experts/combine pipeline: an integer or ``auto`` (chosen by the model)."""
    bwd_pipeline_degree: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = 1
    """Backward chunks, independent of the forward degree."""
    coschedule: bool = True
    """Intra- and inter-node communication on separate channels (off: one channel for both)."""
    partition_grads: bool = True
    """Reduce ready data-parallel gradient buckets in the MoE layers' idle inter-node windows."""
    overlap_wgrad: Union[Literal["auto"], bool] = "auto"
    """Compute the experts' weight gradients while the dispatch all-to-all's backward exchange is in flight
    (they are independent of it). ``auto``: on for CUDA devices, where the exchange runs on its own stream;
    off on CPU, where gloo's thread shares the cores with the GEMMs and the overlap measured no gain
    (benchmarks/RESULTS.md)."""
    profile_steps: int = Field(3, ge=1)
    """``auto`` degrees: steps timed (at degrees 2, 4, 1, ..., after one untimed warm-up step) before the α-β
    model picks the degrees."""
    d_expert: Optional[int] = Field(None, ge=1)
    """Expert hidden size; defaults to model.d_ffn."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    shared_experts: int = Field(0, ge=0)
    """Number of shared experts (always active, run as one dense SwiGLU MLP of shared_experts * d_expert)."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Switch/GShard load-balancing loss weight."""
    seq_aux_loss_coef: float = Field(0.0, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)
    n_groups: int = Field(1, ge=1)
    """sigmoid router: experts split into groups for group-limited top-k."""
    topk_groups: Optional[int] = Field(None, ge=1)
    bias_update_rate: float = Field(0.0, ge=0)
    """sigmoid router: aux-loss-free expert-bias update rate (0 = off)."""
    xmoe_dim: int = Field(16, ge=1)
    slots_per_expert: int = Field(1, ge=1)
    norm_topk_prob: bool = True
    """topk / sigmoid routers: renormalise the chosen experts' gates to sum 1 (Mixtral, Qwen3-MoE, DeepSeek-V3);
    off: the raw probabilities (Qwen2-MoE, OLMoE)."""
    routed_scaling_factor: float = Field(1.0, gt=0)
    """Routed experts' gates are multiplied by this (DeepSeek-V3: 2.5)."""
    first_k_dense: int = Field(0, ge=0)
    """The first k blocks are dense whatever ``every`` says (DeepSeek-V3's first_k_dense_replace)."""
    d_shared: Optional[int] = Field(None, ge=1)
    """Hidden size of the shared-expert MLP; defaults to shared_experts * d_expert."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x w) per token (Qwen2-MoE)."""
    kernels: Literal["auto", "torch", "cuda"] = "auto"
    """Routing / packing / combine ops: ``cuda`` = the csrc kernels (error if they cannot build), ``torch`` =
    torch ops, ``auto`` = the kernels on CUDA devices when they build and pass their self-check, torch ops
    otherwise."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def chunked(self) -> bool:
        """Chunk-pipelined dispatch -> experts -> combine (moe/overlap.py)."""
        return (self.pipeline_degree, self.bwd_pipeline_degree) != (1, 1)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) is an MoE block: every ``every``-th one."""
        return self.enabled and layer >= self.first_k_dense and (layer + 1) % self.every == 0

    def check_rules(self, path: str) -> None:
        for key, registry in (("router", ROUTERS), ("dispatch", DISPATCHERS)):
            why = registry.check(getattr(self, key))
            if why:
                raise ConfigError(f"{path}.{key}", why)
        if not self.enabled:
            return
        E, r = self.num_experts, self.router
        if r not in _NOT_TOKEN_CHOICE and self.topk > E:
            raise ConfigError(f"{path}.topk", f"top-{self.topk} of only {E} experts")
        if r == "switch" and self.topk != 1:
            raise ConfigError(f"{path}.topk", f"router 'switch' is top-1, got topk={self.topk}")
        if r == "gshard" and (self.topk != 2 or E < 2):
            raise ConfigError(f"{path}.topk", f"router 'gshard' is top-2 of >= 2 experts, got topk={self.topk}")
        if r == "softmoe" and self.capacity_factor is not None:
            raise ConfigError(f"{path}.capacity_factor", "router 'softmoe' has fixed slots and takes no capacity")
        if E % self.n_groups:
            raise ConfigError(f"{path}.n_groups", f"{self.n_groups} groups do not split {E} experts")
        if self.n_groups > 1 and r != "sigmoid":
            raise ConfigError(f"{path}.n_groups", "group-limited routing needs router 'sigmoid'")
        if self.topk_groups is not None:
            if self.topk_groups > self.n_groups:
                raise ConfigError(f"{path}.topk_groups", f"{self.topk_groups} exceeds moe.n_groups={self.n_groups}")
            if self.topk > self.topk_groups * (E // self.n_groups):
                raise ConfigError(f"{path}.topk", f"top-{self.topk} does not fit in {self.topk_groups} groups of "
                                                  f"{E // self.n_groups} experts")
        if self.bias_update_rate and r != "sigmoid":
            raise ConfigError(f"{path}.bias_update_rate", "the aux-loss-free expert bias needs router 'sigmoid'")
        if (self.d_shared is not None or self.shared_expert_gate) and not self.shared_experts:
            key = "d_shared" if self.d_shared is not None else "shared_expert_gate"
            raise ConfigError(f"{path}.{key}", "needs moe.shared_experts >= 1")


class OptimizerConfig(_Section):
    zero_stage: Literal[0, 1, 2] = 0
    offload: Literal["none", "cpu"] = "none"
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)

    def check_rules(self, path: str) -> None:
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError(f"{path}.offload", "CPU offload needs train.optimizer.zero_stage >= 1")


class TrainConfig(_Section):
    steps: int = Field(10, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: Optional[int] = Field(None, ge=1)
    """Defaults to micro_batch_size * dp (no gradient accumulation)."""
    seed: int = Field(1234, ge=0)
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """After warm-up: cosine or linear decay to min_lr at the last step, constant, or warm-up-stable-decay."""
    lr_decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd: the share of the steps after warm-up spent decaying (linearly) to min_lr."""
    grad_clip: Optional[float] = Field(1.0, gt=0)
    bucket_mb: float = Field(8.0, gt=0)
    """Data-parallel gradient bucket size (MiB)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective = core attention, full = whole transformer blocks."""
    deterministic: bool = False
    """Bit-reproducible gradients: kernels whose sums depend on thread timing (the fused attention's dQ,
    accumulated with atomics) take their ordered paths, at some speed."""
    time_limit: Optional[Union[str, Annotated[float, Field(gt=0)]]] = None
    """Wall-clock budget of the run (``3h50m``, ``90m``, ``1d2h``, ``01:30:00``, or seconds): before a step
    would cross it, every rank stops, the run saves a checkpoint (with ``checkpoint.dir``) and exits."""
    skip_nonfinite_steps: int = Field(0, ge=0)
    """Steps whose loss or gradient norm is not finite may be skipped (no optimizer update) this many times
    in a run; the next one stops the run with an error (0: the first one does)."""
    eval_every: int = Field(0, ge=0)
    """Validation loss every this many steps and after the last (0: off); data from data.valid / data.split."""
    eval_iters: int = Field(1, ge=1)
    """Global batches each validation averages over (the same samples every time)."""
    optimizer: OptimizerConfig = OptimizerConfig()

    @property
    def time_limit_s(self) -> float | None:
        return None if self.time_limit is None else parse_duration(self.time_limit)

    def check_rules(self, path: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr", f"{self.min_lr} exceeds train.lr={self.lr}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"{path}.warmup_steps", f"{self.warmup_steps} warm-up steps exceed train.steps="
                                                      f"{self.steps}")
        if self.time_limit is not None:
            try:
                parse_duration(self.time_limit)
            except ValueError as exc:
                raise ConfigError(f"{path}.time_limit", str(exc)) from None
        self.optimizer.check_rules(f"{path}.optimizer")


class WTACRSConfig(_Section):
    enabled: bool = False
    keep_ratio: float = Field(0.3, gt=0, le=1)
    layers: list[Literal["qkv", "attn_out", "mlp_up", "mlp_down"]] = ["attn_out", "mlp_up", "mlp_down"]
    """mlp_up / mlp_down also cover MoE experts (sampled per expert) and shared experts."""
    min_rows: int = Field(10, ge=1)
    """Keep at least this many rows per estimate (k = max(floor(keep_ratio * n), min_rows), at most n)."""

    @property
    def samples_experts(self) -> bool:
        return self.enabled and bool({"mlp_up", "mlp_down"} & set(self.layers))


Blend = list[list[Union[float, int, str]]]


def _check_blend(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ConfigError(where, "expected a list of [weight, prefix] pairs")
    for i, item in enumerate(value):
        ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (int, float))
              and not isinstance(item[0], bool) and item[0] > 0 and isinstance(item[1], str) and item[1].strip())
        if not ok:
            raise ConfigError(f"{where}[{i}]", f"expected [weight > 0, prefix], got {item!r}")


class DataConfig(_Section):
    source: Literal["synthetic", "text", "tokens", "indexed"] = "synthetic"
    path: Optional[str] = None
    """text: a file or folder of .txt files (default: Python's own stdlib sources); tokens: a .bin file;
    indexed: the prefix of a Megatron indexed dataset (PREFIX.bin + PREFIX.idx, from moetrain data prepare)."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of a ``tokens`` file."""
    blend: Optional[Blend] = None
    """indexed: several datasets, ``[[weight, prefix], ...]``, sampled in proportion to the weights."""
    split: Optional[list[Annotated[float, Field(ge=0)]]] = None
    """``[train, valid]`` shares of each dataset's windows (e.g. ``[99, 1]``): the tail is held out for validation."""
    valid: Optional[Union[str, Blend]] = None
    """indexed: validation data, a prefix or a blend (instead of ``split``)."""
    tokenizer: Optional[str] = None
    """An HF tokenizer directory, a tokenizer.json or a SentencePiece .model: checked against model.vocab_size,
    used by ``moetrain generate --prompt`` and copied beside an HF export."""

    def check_rules(self, path: str) -> None:
        if self.source == "tokens" and not self.path:
            raise ConfigError(f"{path}.path", "data.source=tokens needs a token file path")
        if self.path and self.source == "synthetic":
            raise ConfigError(f"{path}.path", "data.source=synthetic takes no path")
        if self.source == "indexed" and bool(self.path) == (self.blend is not None):
            raise ConfigError(f"{path}.path", "data.source=indexed needs data.path (a prefix) or data.blend, not both")
        if self.blend is not None:
            if self.source != "indexed":
                raise ConfigError(f"{path}.blend", "needs data.source=indexed")
            _check_blend(self.blend, f"{path}.blend")
        if self.valid is not None:
            if self.source != "indexed":
                raise ConfigError(f"{path}.valid", "needs data.source=indexed")
            if self.split is not None:
                raise ConfigError(f"{path}.valid", "give data.valid or data.split, not both")
            if not isinstance(self.valid, str):
                _check_blend(self.valid, f"{path}.valid")
        if self.split is not None:
            if self.source == "synthetic":
                raise ConfigError(f"{path}.split", "synthetic data has no files to split (validation draws its own "
                                                   "samples)")
            if len(self.split) != 2 or self.split[0] <= 0 or self.split[1] <= 0:
                raise ConfigError(f"{path}.split", f"expected [train, valid] with both > 0, got {self.split}")


class CheckpointConfig(_Section):
    dir: Optional[str] = None
    every: int = Field(0, ge=0)
    """0 disables periodic checkpoints."""
    resume: str = "auto"
    """auto | never | a checkpoint path."""
    keep: int = Field(3, ge=1)
    init_from: Optional[str] = None
    """Weights to start from (fine-tuning): a Hugging Face model directory or a moetrain checkpoint. Weights
    only: the optimizer starts fresh at step 0. A checkpoint that ``resume`` finds takes precedence."""

    def check_rules(self, path: str) -> None:
        if self.every > 0 and not self.dir:
            raise ConfigError(f"{path}.dir", "checkpoint.every > 0 needs a checkpoint directory")
        r = self.resume
        if r not in ("auto", "never"):
            if not r.strip():
                raise ConfigError(f"{path}.resume", "must be auto, never or a checkpoint path")
            if "/" not in r and os.sep not in r and not Path(r).exists():  # a word, not a path
                raise ConfigError(f"{path}.resume", f"unknown value {r!r}: expected auto (the newest usable "
                                                    "checkpoint: did you mean auto?), never, or a checkpoint path")


class WandbConfig(_Section):
    project: str
    run_name: Optional[str] = None
    mode: Literal["offline", "online"] = "offline"
    """offline: written under logging.run_dir (``wandb sync`` uploads it later); online: streamed (needs network
    and ``wandb login``)."""


class LoggingConfig(_Section):
    run_dir: str = "runs/latest"
    """Where the resolved config, console log and summary go."""
    tensorboard_dir: Optional[str] = None
    wandb: Optional[WandbConfig] = None
    """Weights & Biases beside TensorBoard (rank 0): the same train/ and valid/ scalars, the resolved config."""
    every: int = Field(1, ge=1)
    collective_check: bool = False
    """Debug: every rank records (op, group, shape) of each collective and fails fast when ranks diverge."""
    plan_hardware: Optional[str] = None
    """Hardware file (a name in cluster_configs/hardware or a path from ``moetrain plan --calibrate``) for the
    step-time prediction the run logs and records beside its measurements; default: the CUDA device's file."""


class FaultInjectConfig(_Section):
    rank: Optional[int] = Field(None, ge=0)
    step: Optional[int] = Field(None, ge=0)
    kind: Optional[Literal["exit", "hang", "exception"]] = None

    def check_rules(self, path: str) -> None:
        given = [v is not None for v in (self.rank, self.step, self.kind)]
        if any(given) and not all(given):
            raise ConfigError(path, "rank, step and kind must be given together")


class FaultConfig(_Section):
    inject: FaultInjectConfig = FaultInjectConfig()
    max_restarts: int = Field(0, ge=0)

    def check_rules(self, path: str) -> None:
        self.inject.check_rules(f"{path}.inject")


class JobConfig(_Section):
    cluster: ClusterConfig = ClusterConfig()
    network: NetworkConfig = NetworkConfig()
    parallel: ParallelConfig = ParallelConfig()
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    train: TrainConfig = TrainConfig()
    wtacrs: WTACRSConfig = WTACRSConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    fault: FaultConfig = FaultConfig()

    @model_validator(mode="after")
    def _derived_defaults(self) -> JobConfig:
        if self.moe.d_expert is None:
            self.moe._fill("d_expert", self.model.d_ffn)
        if self.moe.d_shared is None and self.moe.shared_experts:
            self.moe._fill("d_shared", self.moe.shared_experts * self.moe.d_expert)
        return self

    # ----------------------------------------------------------------------- derived values
    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def dp(self) -> int:
        if self.parallel.dp is not None:
            return self.parallel.dp
        return max(self.world_size // (self.parallel.tp * self.parallel.pp), 1)

    @property
    def layout(self) -> Layout:
        """The parallel degrees (checked by :func:`check_consistency`)."""
        p = self.parallel
        return Layout(tp=p.tp, pp=p.pp, dp=self.dp, ep=p.ep, etp=p.etp)

    @property
    def kv_heads(self) -> int:
        return self.model.kv_heads

    @property
    def d_ffn(self) -> int:
        return self.model.d_ffn

    @property
    def global_batch_size(self) -> int:
        if self.train.global_batch_size is not None:
            return self.train.global_batch_size
        return self.train.micro_batch_size * self.dp

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.train.micro_batch_size * self.dp)

    def resolved(self) -> dict[str, Any]:
        """The config with every derived default filled in, as plain data."""
        data = self.model_dump(mode="json")
        data["parallel"]["dp"] = self.dp
        data["train"]["global_batch_size"] = self.global_batch_size
        return data


_SECTIONS = tuple(JobConfig.model_fields)


# ------------------------------------------------------------------------------- loading
class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """YAML as a Python user writes numbers, and no silently repeated keys.

    PyYAML follows YAML 1.1, where ``3e-3`` and ``1E5`` (no dot) are strings; here every exponent form
    is a number (an int when integral: ``1e5`` steps are 100000 steps), like ``1_000``. A key given twice
    in one mapping is an error naming it and both lines (YAML would keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str):
                if key in seen:
                    raise _DuplicateKey(f"duplicate key {key!r} at lines {seen[key]} and {line}")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _number(loader: yaml.SafeLoader, node) -> int | float:
    value = float(loader.construct_scalar(node).replace("_", ""))
    return int(value) if value.is_integer() else value


_NUMBER_TAG = "tag:moetrain,2026:number"
_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver(_NUMBER_TAG, _EXPONENT, list("-+0123456789."))
for _first in _Loader.yaml_implicit_resolvers.values():  # ahead of YAML 1.1's float, so 1.5e3 == 1.5e+3
    _first.sort(key=lambda entry: entry[0] != _NUMBER_TAG)
_Loader.add_constructor(_NUMBER_TAG, _number)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _model_at(model_cls: type[BaseModel], path: tuple) -> Optional[type[BaseModel]]:
    cls: Any = model_cls
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _dotted_field_path(loc: tuple) -> tuple[str, ...]:
    """Keep the part of a pydantic error location that names real fields (drop union-member tags)."""
    cls: Any = JobConfig
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out[-1] = f"{out[-1]}[{part}]" if out else f"[{part}]"
            continue
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            if fields is not None:  # an unknown key inside a section
                out.append(str(part))
            break
        out.append(part)
        ann = fields[part].annotation
        members = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)] or [ann]  # Optional[Section]
        cls = next((a for a in members if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return tuple(out)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _translate(err: ValidationError) -> ConfigError:
    errors = err.errors()
    first = errors[0]
    path = _dotted_field_path(first["loc"])
    dotted = ".".join(path) or "<root>"
    if first["type"] == "extra_forbidden":
        parent = _model_at(JobConfig, path[:-1]) or JobConfig
        known = sorted(parent.model_fields)
        close = difflib.get_close_matches(path[-1], known, n=1, cutoff=0.6)
        hint = f" (did you mean '{'.'.join(path[:-1] + (close[0],))}'?)" if close else ""
        return ConfigError(dotted, f"unknown key{hint}; known keys here: {', '.join(known)}")
    section = _model_at(JobConfig, path) if first["type"] == "model_type" else None
    if section is not None:  # e.g. `moe: null`, `model: 4`: a section is a mapping of its own keys
        hint = " (a dense model is moe.num_experts: 0)" if path == ("moe",) else ""
        keys = ", ".join(sorted(section.model_fields))
        return ConfigError(dotted, f"a section, expected a mapping of its keys ({keys}), got "
                                   f"{_describe(first.get('input'))}{hint}")
    # Union fields produce one error per member: merge them into one readable reason.
    same_field = [e for e in errors if _dotted_field_path(e["loc"]) == path]
    if len(same_field) > 1:
        reasons = "; or ".join(e["msg"].replace("Input should be ", "") for e in same_field)
        reason = f"expected {reasons}, got {_describe(first.get('input'))}"
    else:
        msg = first["msg"].replace("Input should be", "expected")
        reason = f"{msg}, got {_describe(first.get('input'))}" if "input" in first else msg
    return ConfigError(dotted, reason)


def config_from_dict(data: Any, *, check: bool = True, hf: bool = True) -> JobConfig:
    """Validate plain data (as loaded from YAML) into a JobConfig; raise ConfigError on any mistake.
    ``hf=False``: ``model.hf_config`` is not read again (data already resolved, e.g. on a rank elsewhere)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"a job config must be a mapping of sections, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(str(key), "section names must be strings")
    from moetrain.models.hf_config import merge_hf_config

    data = merge_hf_config(data) if hf else data
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as err:
        raise _translate(err) from None
    if check:
        check_consistency(cfg)
    return cfg


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``a.b=VALUE`` strings; values are YAML scalars or flow collections."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "an override must look like section.key=VALUE")
        if any(not part.isidentifier() for part in key.split(".")):
            raise ConfigError(key, "not a dotted config path")
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
        except _DuplicateKey as exc:
            raise ConfigError(key, str(exc)) from None
        out.append((key, value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Return a copy of ``data`` with each dotted key set (intermediate mappings are created)."""
    data = copy.deepcopy(data) if data else {}
    for key, value in overrides:
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: Union[str, os.PathLike, None], overrides: Optional[list[str]] = None,
                *, check: bool = True) -> JobConfig:
    """Load and validate a job config file with optional ``KEY=VALUE`` overrides."""
    return config_from_dict(load_config_data(path, overrides), check=check)


def load_config_data(path: Union[str, os.PathLike, None], overrides: Optional[list[str]] = None) -> dict:
    """The job config file's data with ``KEY=VALUE`` overrides applied, not validated yet."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(str(p), "file not found")
        if not p.is_file():
            raise ConfigError(str(p), "not a file")
        try:
            data = _yaml(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(str(p), "not a UTF-8 text file") from None
        except _DuplicateKey as exc:
            raise ConfigError(str(p), str(exc)) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc.__class__.__name__
            raise ConfigError(str(p), f"invalid YAML{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(str(p), f"a job config must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, parse_overrides(overrides))
    return data


# ------------------------------------------------------------------------ cross-section rules
def check_consistency(cfg: JobConfig) -> None:
    """Every section's own rules, then the rules that involve several sections; each failure names the
    field to change."""
    for name in _SECTIONS:
        getattr(cfg, name).check_rules(name)
    _check_layout(cfg)
    _check_model_fits_layout(cfg)
    if cfg.moe.enabled:
        _check_moe(cfg)
    _check_training(cfg)


def _check_layout(cfg: JobConfig) -> None:
    p, c = cfg.parallel, cfg.cluster
    if not cfg.moe.enabled:
        for key in ("ep", "etp"):
            if getattr(p, key) > 1:
                raise ConfigError(f"parallel.{key}", f"{key}={getattr(p, key)} needs experts (moe.num_experts > 0)")
    try:
        Layout.from_world(cfg.world_size, tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep, etp=p.etp)
    except LayoutError as exc:
        world = f" (cluster.nodes*cluster.ranks_per_node = {c.nodes}*{c.ranks_per_node})" if exc.world else ""
        raise ConfigError(f"parallel.{exc.field}", exc.reason + world) from None


def _check_model_fits_layout(cfg: JobConfig) -> None:
    p, m = cfg.parallel, cfg.model
    if m.heads % p.tp:
        raise ConfigError("model.heads", f"{m.heads} heads are not divisible by parallel.tp={p.tp}")
    if m.kv_heads % p.tp:
        raise ConfigError("model.kv_heads", f"{m.kv_heads} kv heads are not divisible by parallel.tp={p.tp}")
    if m.d_ffn % p.tp:
        raise ConfigError("model.d_ffn", f"{m.d_ffn} is not divisible by parallel.tp={p.tp}")
    if cfg.moe.shared_experts and cfg.moe.d_shared % p.tp:
        raise ConfigError("moe.d_shared", f"{cfg.moe.d_shared} is not divisible by parallel.tp={p.tp}")
    if m.family != "llama":
        from moetrain.models.hf_config import HF_FAMILIES, check_family

        if m.family in HF_FAMILIES:
            try:
                check_family(cfg.resolved())
            except UserError as exc:
                raise ConfigError("model.family", str(exc).split(": ", 1)[1]) from None
    if p.sp and m.seq_len % p.tp:
        raise ConfigError("model.seq_len", f"{m.seq_len} is not divisible by parallel.tp={p.tp} (parallel.sp=true)")
    if p.pp > m.layers:
        raise ConfigError("parallel.pp", f"{p.pp} pipeline stages but only model.layers={m.layers} layers")
    if p.vpp > 1 and m.layers < p.pp * p.vpp:
        raise ConfigError("model.layers", f"{m.layers} layers cannot fill pp*vpp = {p.pp}*{p.vpp} pipeline chunks "
                                          "of at least one layer each")
    if p.pipeline_layers is not None and sum(p.pipeline_layers) != m.layers:
        raise ConfigError("parallel.pipeline_layers", f"the entries sum to {sum(p.pipeline_layers)} layers "
                                                      f"but model.layers={m.layers}")
    if cfg.data.source == "text" and m.vocab_size < 256:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is too small for byte-level text (needs >= 256)")


def _check_moe(cfg: JobConfig) -> None:
    p, moe = cfg.parallel, cfg.moe
    if moe.num_experts % p.ep:
        raise ConfigError("moe.num_experts", f"{moe.num_experts} experts are not divisible by parallel.ep={p.ep}")
    if moe.d_expert % p.etp:
        raise ConfigError("moe.d_expert", f"{moe.d_expert} is not divisible by parallel.etp={p.etp}")
    if moe.every > cfg.model.layers:
        raise ConfigError("moe.every", f"{moe.every} exceeds model.layers={cfg.model.layers}: no MoE block")
    if moe.dispatch != "flat" and p.ep > 1:
        grid = build_rank_grid(cfg.layout, ranks_per_node=cfg.cluster.ranks_per_node)
        if not grid.ep_is_uniform():
            raise ConfigError("moe.dispatch", f"{moe.dispatch} needs the same number of ranks of every EP group "
                                              "on each node; use dispatch 'flat' for this layout")
    if cfg.wtacrs.samples_experts:
        if p.etp > 1:
            raise ConfigError("wtacrs.layers", "sampling the experts' projections with parallel.etp > 1 is not "
                                               "supported; drop mlp_up/mlp_down or set parallel.etp=1")
        if moe.router == "softmoe":
            raise ConfigError("wtacrs.layers", "router 'softmoe' mixes tokens into slots: drop mlp_up/mlp_down")
        if moe.chunked or cfg.network.simulate:
            raise ConfigError("wtacrs.layers", "sampling the experts' projections is not supported on the chunk-"
                                               "pipelined MoE path (moe.pipeline_degree / network.simulate); drop "
                                               "mlp_up/mlp_down")
    if moe.kernels == "cuda" and cfg.cluster.device != "cuda":
        raise ConfigError("moe.kernels", "cuda kernels need cluster.device=cuda (use auto or torch on CPU)")


def _check_training(cfg: JobConfig) -> None:
    p, t, c = cfg.parallel, cfg.train, cfg.cluster
    dp, gbs = cfg.dp, cfg.global_batch_size
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size",
                          f"{gbs} is not divisible by micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    if p.pp > 1 and p.schedule == "interleaved" and cfg.grad_accum_steps % p.pp:
        raise ConfigError(
            "train.global_batch_size",
            f"schedule 'interleaved' needs the micro-batch count per step (global_batch_size / "
            f"(micro_batch_size*dp) = {cfg.grad_accum_steps}) to be a multiple of parallel.pp={p.pp}",
        )
    if cfg.network.isolation == "netns" and (c.launcher != "local" or c.device != "cpu"):
        raise ConfigError("network.isolation", "netns makes real hosts of simulated CPU nodes: it needs "
                          f"cluster.launcher=local and cluster.device=cpu (got {c.launcher}, {c.device}); "
                          "other launchers already run on real hosts")
    d = cfg.data
    if t.eval_every and d.source != "synthetic" and d.valid is None and d.split is None:
        raise ConfigError("train.eval_every", "validation needs held-out data: set data.split (e.g. [99, 1]) or "
                                              "data.valid")
    f, ck = cfg.fault, cfg.checkpoint
    if f.max_restarts and (not ck.dir or ck.resume == "never" or not ck.every):
        raise ConfigError("fault.max_restarts", "restarts resume from checkpoints: set checkpoint.dir and "
                          "checkpoint.every, and keep checkpoint.resume=auto")
    if f.max_restarts and c.launcher in ("mpi", "env"):
        raise ConfigError("fault.max_restarts", f"with cluster.launcher={c.launcher} the launcher restarts the "
                          "job (torchrun --max-restarts, srun --requeue); set it there, this process is one rank")
    inj = f.inject
    if inj.rank is not None and inj.rank >= cfg.world_size:
        raise ConfigError("fault.inject.rank", f"rank {inj.rank} does not exist in a world of {cfg.world_size}")
    if inj.step is not None and inj.step >= t.steps:
        raise ConfigError("fault.inject.step", f"step {inj.step} is never reached (train.steps={t.steps})")


def write_resolved(cfg: JobConfig, directory: Union[str, os.PathLike]) -> Path:
    """Write the resolved config (derived defaults filled in) as ``config.resolved.yaml`` in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "config.resolved.yaml"
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # every rank of a torchrun / MPI job writes it
    tmp.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False), encoding="utf-8")
    os.replace(tmp, out)
    return out
