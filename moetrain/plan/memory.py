"""Per-rank memory of a layout, from the config alone: parameters, gradients and optimizer state exactly as
the trainer allocates them, activations from the model spec and the pipeline schedule, and buffers.

Exact parts (tests/test_plan.py checks them byte for byte against ``memory.per_rank`` of real runs): the
rank's parameters (``ModelSpec.rank_params``); gradients (ZeRO 0 and 1: one per parameter; ZeRO 2: this
rank's slice of each gradient bucket, built exactly as ``parallel.data_parallel.GradReducer`` builds them);
AdamW state (ZeRO 0: two moments per parameter, of 0-d parameters none counted; ZeRO 1/2: master slice and
two moments of each shard, a shard being ``ceil(numel / group size)`` elements).

Modeled parts: activations (``ModelSpec.saved_activation_bytes`` per micro-batch and chunk, times the
micro-batches each chunk holds at the schedule's peak, read off the schedule's action lists) and buffers
(gradient buckets in flight, the ZeRO all-gather buffer, the MoE all-to-all send/receive buffers, the pipeline
boundary buffers). MoE expert rows: ``capacity_factor`` set gives the exact cap; dropless uses
``imbalance`` x the balanced share (the planner's default 1.5: Megatron-Core's README reports OOMs in the
first few hundred steps of dropless training when routing is still uneven).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from moetrain.config import JobConfig
from moetrain.models.spec import ModelSpec, ParamInfo, RankShape

__all__ = ["StageMemory", "stage_memory", "grad_buckets", "rank_shape", "inflight_microbatches", "param_bytes",
           "expert_rows_factor", "rank_params", "shard_elements"]

DROPLESS_IMBALANCE = 1.5


def param_bytes(cfg: JobConfig) -> int:
    """Bytes per parameter element: float64 runs keep float64 weights, float32 and bfloat16 runs float32."""
    return 8 if cfg.train.dtype == "float64" else 4


def act_bytes(cfg: JobConfig) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2}[cfg.train.dtype]


def expert_rows_factor(cfg: JobConfig, imbalance: float) -> float:
    """Expert rows on the busiest rank relative to the balanced share: the capacity cap when set, else
    ``imbalance`` (dropless), never more than every expert of the rank taking every token."""
    moe = cfg.moe
    if not moe.enabled or moe.router in ("softmoe",):
        return 1.0
    if moe.capacity_factor is not None:
        return moe.capacity_factor
    return min(imbalance, moe.num_experts / max(moe.topk, 1))


def rank_shape(cfg: JobConfig, stage: int, imbalance: float = 1.0) -> RankShape:
    p = cfg.parallel
    return RankShape(stage=stage, tp=p.tp, ep=p.ep, etp=p.etp, sp=p.sp, micro_batch=cfg.train.micro_batch_size,
                     recompute=cfg.train.recompute, act_bytes=act_bytes(cfg),
                     expert_rows_factor=expert_rows_factor(cfg, imbalance))


def grad_buckets(params: list[ParamInfo], cfg: JobConfig) -> list[tuple[int, list[ParamInfo]]]:
    """(group size, params) of every gradient bucket, as ``GradReducer`` builds them for this rank: dense
    parameters over dp, experts over edp; in reverse parameter order, a bucket closed once it reaches
    ``train.bucket_mb``; at ZeRO 2 the TP-partial and tied ones in one late bucket per group."""
    lay = cfg.layout
    zero2 = cfg.train.optimizer.zero_stage == 2
    bucket_bytes = int(cfg.train.bucket_mb * 2**20)
    size = param_bytes(cfg)
    out = []
    for world, group in ((lay.dp, [q for q in params if not q.expert]), (lay.edp, [q for q in params if q.expert])):
        if not group or (world == 1 and not zero2):
            continue
        late = [q for q in group if zero2 and (q.tp_partial or q.tied)]
        held = {id(q) for q in late}
        current, nbytes = [], 0
        for q in reversed([q for q in group if id(q) not in held]):
            current.append(q)
            nbytes += q.numel * size
            if nbytes >= bucket_bytes:
                out.append((world, current))
                current, nbytes = [], 0
        if current:
            out.append((world, current))
        if late:
            out.append((world, late))
    return out


def shard_elements(params: list[ParamInfo], cfg: JobConfig, buckets: list[tuple[int, list[ParamInfo]]]) -> int:
    """Elements of this rank's ZeRO slices: ``ceil(numel / group size)`` of each shard unit, the units being
    dense-over-dp and experts-over-edp at stage 1 and the gradient buckets at stage 2 (``ShardedAdamW``)."""
    lay = cfg.layout
    units = buckets if cfg.train.optimizer.zero_stage == 2 else \
        [(lay.dp, [q for q in params if not q.expert]), (lay.edp, [q for q in params if q.expert])]
    return sum(math.ceil(sum(q.numel for q in g) / w) for w, g in units if g)


def inflight_microbatches(cfg: JobConfig, stage: int) -> list[int]:
    """Peak micro-batches whose activations each of this pipeline rank's chunks holds at once (the schedule's
    action list: a forward adds one to its chunk, the backward that frees it subtracts one)."""
    p = cfg.parallel
    if p.pp == 1:
        return [1]
    return list(_inflight(p.schedule, p.pp, cfg.grad_accum_steps, p.vpp, stage))


@functools.lru_cache(maxsize=4096)
def _inflight(schedule: str, pp: int, m: int, vpp: int, stage: int) -> tuple[int, ...]:
    from moetrain.parallel.schedules import build_schedule

    actions = build_schedule(schedule, pp, m, vpp)[stage]
    held = [0] * vpp
    peak_total, at_peak = 0, [0] * vpp
    for a in actions:
        if a.kind == "F":
            held[a.chunk] += 1
        elif a.kind == "B":
            held[a.chunk] -= 1
        if sum(held) > peak_total:
            peak_total, at_peak = sum(held), list(held)
    return tuple(at_peak)


_PARAMS: dict[tuple, list[ParamInfo]] = {}
_ACTS: dict[tuple, float] = {}


def _activations(cfg: JobConfig, spec: ModelSpec, ids: range, pre: bool, post: bool, shape: RankShape) -> float:
    key = (type(spec), cfg.model.model_dump_json(), cfg.moe.model_dump_json(), cfg.wtacrs.model_dump_json(),
           tuple(cfg.moe.is_moe_layer(i) for i in ids), pre, post, shape)
    if key not in _ACTS:
        _ACTS[key] = spec.saved_activation_bytes(ids, pre=pre, post=post, rank=shape)
    return _ACTS[key]


def rank_params(cfg: JobConfig, spec: ModelSpec, shape: RankShape) -> list[ParamInfo]:
    """``spec.rank_params`` memoised on what decides it (a search asks for the same stage many times)."""
    p = cfg.parallel
    key = (type(spec), cfg.model.model_dump_json(), cfg.moe.model_dump_json(), p.pp, p.vpp,
           tuple(p.pipeline_layers or ()), shape.stage, shape.tp, shape.ep, shape.etp, shape.sp)
    if key not in _PARAMS:
        _PARAMS[key] = spec.rank_params(shape)
    return _PARAMS[key]


@dataclass
class StageMemory:
    """Bytes per rank of one pipeline stage (every rank of a stage holds the same amounts)."""

    params: int
    grads: int
    optimizer: int
    activations: float
    """At the schedule's peak: every chunk's saved activations times the micro-batches it holds then."""
    activation_per_micro_batch: float
    """One micro-batch through this rank's first chunk: what the trainer measures and reports."""
    buffers: float
    optimizer_on_host: bool = False

    @property
    def device_total(self) -> float:
        opt = 0 if self.optimizer_on_host else self.optimizer
        return self.params + self.grads + opt + self.activations + self.buffers


def stage_memory(cfg: JobConfig, spec: ModelSpec, stage: int, imbalance: float = DROPLESS_IMBALANCE) -> StageMemory:
    """The memory of every rank of pipeline stage ``stage``."""
    o = cfg.train.optimizer
    size = param_bytes(cfg)
    shape = rank_shape(cfg, stage, imbalance)
    params = rank_params(cfg, spec, shape)
    nbytes = sum(q.numel for q in params) * size
    buckets = grad_buckets(params, cfg)
    if o.zero_stage == 0:
        grads, opt = nbytes, 2 * sum(q.numel for q in params if q.ndim > 0) * size
    else:
        sliced = shard_elements(params, cfg, buckets)
        grads = nbytes if o.zero_stage == 1 else sliced * size
        opt = 3 * sliced * size
    # activations: each chunk's micro-batch bytes times the micro-batches it holds at the peak
    chunks = spec._chunks(stage) if hasattr(spec, "_chunks") else [(range(cfg.model.layers), True, True)]
    per_chunk = [_activations(cfg, spec, ids, pre, post, shape) for ids, pre, post in chunks]
    held = inflight_microbatches(cfg, stage)
    activations = sum(a * n for a, n in zip(per_chunk, held))
    if cfg.train.recompute != "none":  # backward regenerates one block's (or one attention's) activations at a time
        plain = dataclasses.replace(shape, recompute="none")
        activations += max((_activations(cfg, spec, range(i, i + 1), False, False, plain)
                            - _activations(cfg, spec, range(i, i + 1), False, False, shape)
                            for ids, _, _ in chunks for i in ids), default=0.0)
    buffers = _buffers(cfg, spec, shape, buckets, size)
    return StageMemory(params=nbytes, grads=grads, optimizer=opt, activations=activations,
                       activation_per_micro_batch=per_chunk[0], buffers=buffers,
                       optimizer_on_host=o.offload == "cpu")


def _buffers(cfg: JobConfig, spec: ModelSpec, shape: RankShape, buckets, size: int) -> float:
    """Communication buffers: the flat buffers of two gradient buckets in flight, the ZeRO all-gather chunk,
    the MoE all-to-all send and receive buffers of the busiest rank, and the pipeline boundary buffers."""
    p, m = cfg.parallel, cfg.model
    total = 0.0
    biggest = sorted((sum(q.numel for q in g) * size for _, g in buckets), reverse=True)[:2]
    total += sum(biggest)
    if cfg.train.optimizer.zero_stage:
        total += 8 * 2**20
    if cfg.moe.enabled and cfg.moe.router != "softmoe":
        tokens = m.seq_len * shape.micro_batch // (p.tp if p.sp and p.tp > 1 else 1)
        rows = tokens * cfg.moe.topk * shape.expert_rows_factor
        total += 2 * rows * m.d_model * shape.act_bytes
    if p.pp > 1:
        elems = math.prod(spec.boundary_shape(shape.micro_batch, p.tp))
        total += 4 * elems * shape.act_bytes  # send and receive, forward and backward
    return total
