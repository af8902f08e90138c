"""Step time of a layout: compute, communication, pipeline bubbles and what overlaps.

Per micro-batch and model chunk, on one rank of a stage:
- GEMMs: ``launch + max(2mnk / (peak x gemm_efficiency), bytes / hbm)`` per call (a roofline with a per-call
  cost); backward runs two GEMMs of each forward shape (input and weight gradients).
- attention: the causal half of ``4 b s^2 h hd`` at ``attention_efficiency`` of the peak; backward 2.5x.
- memory-bound ops (norms, rotary, activations, routing, packing): the saved-activation bytes read and
  written once more each way at HBM bandwidth.
- TP/SP: two all-reduces (or all-gather + reduce-scatter) of ``s b d`` per block and direction, ring cost.
- MoE: the dispatch and combine all-to-all of the routed rows (intra- and inter-node shares of the EP group at
  once, the slower one bounding), the experts' grouped GEMMs; with chunk pipelining
  (``moe.pipeline_degree``) FSMoE's makespan model (:mod:`moetrain.moe.perf_model`) at the set degrees (``auto``:
  the degrees it would choose).
- pipeline: the chunk costs played through the schedule's action lists (``parallel.schedules.simulate``),
  the boundary sends delaying the receiving action (asynchronous: they keep neither rank busy).
- data parallel: each gradient bucket's all-reduce (ZeRO: reduce-scatter + all-gather of the same volume)
  hidden behind the last micro-batch's backward except the last bucket; then the optimizer (memory-bound
  AdamW; with offload the PCIe copies and a host AdamW).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from moetrain.config import JobConfig
from moetrain.models.spec import ModelSpec
from moetrain.plan.hardware import Hardware, Link
from moetrain.plan.memory import act_bytes, grad_buckets, param_bytes, rank_params, rank_shape, shard_elements

__all__ = ["ChunkCost", "StepTime", "step_time", "moe_layer_time", "gemm_time"]


def gemm_time(hw: Hardware, dtype: str, m: float, n: float, k: float, calls: int = 1) -> float:
    """Seconds for ``calls`` GEMMs of [m, k] x [k, n] (each call its share of m)."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    e = {"bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    flops = 2.0 * m * n * k
    compute = flops / (hw.peak_flops(dtype) * hw.gemm_efficiency)
    operands = (m * k + k * n * calls + m * n) * e
    if hw.gemm_bytes_gbps:  # calibrated CPU: the operand traffic adds to the arithmetic
        return calls * hw.gemm_launch_us * 1e-6 + compute + operands / (hw.gemm_bytes_gbps * 1e9)
    return calls * hw.gemm_launch_us * 1e-6 + max(compute, operands / (hw.hbm_gbps * 1e9))


def ring(link: Link, nbytes: float, world: int, phases: int = 2) -> float:
    """A ring all-reduce (phases=2) or all-gather / reduce-scatter (phases=1) of ``nbytes`` over ``world``."""
    if world <= 1 or nbytes <= 0:
        return 0.0
    return link.time(phases * (world - 1) / world * nbytes, steps=phases * (world - 1))


def group_link(hw: Hardware, cfg: JobConfig, span: int) -> Link:
    """The link a group of consecutive-rank span ``span`` crosses: inside a node when it fits in one."""
    per_node = min(cfg.cluster.ranks_per_node, hw.devices_per_node)
    return hw.intra if span <= per_node else hw.inter


@dataclass
class ChunkCost:
    """Seconds of one micro-batch through one chunk, by direction and component."""

    forward: float = 0.0
    backward_input: float = 0.0
    backward_weight: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    by_part: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    recomputed: float = 0.0
    """Forward work repeated inside the backward (recomputation), already in ``backward_input``."""

    def add(self, part: str, fwd: float, bwd_in: float, bwd_w: float = 0.0) -> None:
        self.forward += fwd
        self.backward_input += bwd_in
        self.backward_weight += bwd_w
        self.parts[part] = self.parts.get(part, 0.0) + fwd + bwd_in + bwd_w
        f, bi, bw = self.by_part.get(part, (0.0, 0.0, 0.0))
        self.by_part[part] = (f + fwd, bi + bwd_in, bw + bwd_w)

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight


def _a2a(hw: Hardware, cfg: JobConfig, nbytes: float) -> tuple[float, list[tuple[str, float]]]:
    """One dispatch (or combine) of ``nbytes`` per rank over the EP group, spread evenly over its members:
    (seconds, the plan's transfers in order as (link, bytes on this rank's busiest link)).

    - flat: one all-to-all; the shares to node-local and remote members move at once, the slower bounds it;
    - hier2d: an all-to-all inside the node (everything for other local indices), then one among the
      same-local-index peers of the other nodes (Tutel's 2D);
    - hier1d: gather to the node leader, the leaders' exchange, scatter from the leader (the leader's links
      carry the whole node's rows).
    Other (registered) algorithms are modeled as flat."""
    p = cfg.parallel
    if p.ep <= 1 or nbytes <= 0:
        return 0.0, []
    per_node = min(cfg.cluster.ranks_per_node, hw.devices_per_node)
    local = max(1, min(p.ep, per_node // p.etp))  # EP members on one node
    nodes = max(1, p.ep // local)
    algo = cfg.moe.dispatch if nodes > 1 else "flat"
    if algo == "hier2d":
        steps = [("intra", nbytes * (local - 1) / local), ("inter", nbytes * (nodes - 1) / nodes)]
    elif algo == "hier1d":
        steps = [("intra", nbytes * (local - 1)), ("inter", local * nbytes * (nodes - 1) / nodes),
                 ("intra", nbytes * (local - 1))]
    else:
        intra, inter = nbytes * (local - 1) / p.ep, nbytes * (p.ep - local) / p.ep
        if inter > 0:
            t = max(hw.intra.time(intra) if intra else 0.0, hw.inter.time(inter))
            # one step whose bytes on the inter link take the time of the slower share
            return t, [("inter", max(inter, (t - hw.inter.latency_us * 1e-6) * hw.inter.bandwidth_gbps * 1e9))]
        return hw.intra.time(intra), [("intra", intra)] if intra else []
    steps = [(k, b) for k, b in steps if b > 0]
    link = {"intra": hw.intra, "inter": hw.inter}
    return sum(link[k].time(b) for k, b in steps), steps


def moe_layer_time(cfg: JobConfig, hw: Hardware, tokens: float, dtype: str, *,
                   rows_factor: float = 1.0) -> dict[str, float]:
    """Forward and backward seconds of one MoE layer's routed part on one rank for ``tokens`` tokens: router,
    routing/packing, dispatch, experts, combine (the chunk-pipelined makespan when ``moe.pipeline_degree`` is
    not 1). Keys: fwd, bwd, a2a_fwd, a2a_bwd, experts_fwd, experts_bwd, overlap_degrees."""
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    key = (hw, m.d_model, moe.num_experts, moe.topk, moe.router, moe.d_expert, moe.activation, moe.coschedule,
           moe.dispatch, moe.token_once, str(moe.pipeline_degree), str(moe.bwd_pipeline_degree), p.ep, p.etp,
           cfg.cluster.ranks_per_node, float(tokens), dtype, float(rows_factor))
    if key not in _MOE_CACHE:
        _MOE_CACHE[key] = _moe_layer_time(cfg, hw, tokens, dtype, rows_factor)
    return dict(_MOE_CACHE[key])


_MOE_CACHE: dict[tuple, dict] = {}


def _sent_rows(cfg: JobConfig, tokens: float, k: int, rows: float) -> float:
    """Rows one rank's dispatch all-to-all carries: one per assignment, or with token-once dispatch (not
    chunk-pipelined, a token router, no WTA-CRS) one per (token, rank it visits): under uniform routing a
    token's k experts miss a rank's E/ep experts with probability C(E - E/ep, k) / C(E, k)."""
    from moetrain.moe.token_once import ranks_per_token, token_once_on

    moe, p = cfg.moe, cfg.parallel
    pipelined = (moe.pipeline_degree, moe.bwd_pipeline_degree) != (1, 1)
    if (not token_once_on(moe.token_once, moe.num_experts, k, p.ep) or pipelined or moe.router == "softmoe"
            or cfg.wtacrs.enabled):
        return rows
    return min(rows, tokens * ranks_per_token(moe.num_experts, k, p.ep))


def _moe_layer_time(cfg: JobConfig, hw: Hardware, tokens: float, dtype: str, rows_factor: float) -> dict:
    from moetrain.moe.perf_model import AlphaBeta, SectionShape, choose_degrees, makespan

    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    e = {"bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    d, E = m.d_model, moe.num_experts
    k = moe.topk if moe.router not in ("switch",) else 1
    rows = tokens * k * rows_factor
    local = max(E // p.ep, 1)
    f = moe.d_expert // p.etp
    parts = 2 if moe.activation == "swiglu" else 1
    per_expert = rows / local
    router = gemm_time(hw, "float32" if dtype != "float64" else "float64", tokens, E, d)
    # routing, packing and combining: the routed rows read and written a few times (HBM bound)
    shuffle = 4 * rows * d * e / (hw.hbm_gbps * 1e9)
    route = rows * d * hw.moe_route_ns_per_element * 1e-9  # calibrated: forward + backward
    # expert TP: a rank runs the rows of all its etp peers (gathered over the etp group) on its 1/etp of the
    # hidden width, so its GEMMs have etp x the rows; the rows go out to the peers and partial outputs come back
    etp_rows = per_expert * local * p.etp
    up = gemm_time(hw, dtype, etp_rows, parts * f, d, calls=local)
    down = gemm_time(hw, dtype, etp_rows, d, f, calls=local)
    act = 3 * etp_rows * f * e / (hw.hbm_gbps * 1e9)
    etp_exchange = hw.intra.time(rows * d * e * (p.etp - 1)) if p.etp > 1 else 0.0
    experts_fwd = up + down + act + 2 * etp_exchange
    experts_bwd = 2 * (up + down) + 2 * act + 2 * etp_exchange
    sent = _sent_rows(cfg, tokens, k, rows)
    a2a, steps = _a2a(hw, cfg, sent * d * e)
    # small, latency-bound collectives besides the rows: the forward dispatch's all-gather of per-expert counts;
    # with token-once dispatch also each assignment's row index and gate (forward) and the gates' gradient
    extra_fwd = extra_bwd = 0.0
    if p.ep > 1:
        per_node = min(cfg.cluster.ranks_per_node, hw.devices_per_node)
        count_link = hw.intra if p.ep <= max(1, per_node // p.etp) else hw.inter
        extra_fwd = count_link.time(8 * E * p.ep)
        if sent < rows:  # token-once
            meta = _a2a(hw, cfg, rows * 8)[0]
            extra_fwd += 2 * meta
            extra_bwd += meta
    degrees = (moe.pipeline_degree, moe.bwd_pipeline_degree)
    out = {"a2a_fwd": 2 * a2a + extra_fwd, "a2a_bwd": 2 * a2a + extra_bwd, "experts_fwd": experts_fwd,
           "experts_bwd": experts_bwd, "overlap_degrees": (1, 1)}
    if degrees != (1, 1) and steps:
        links = {"intra": AlphaBeta(hw.intra.latency_us * 1e-6, 1 / (hw.intra.bandwidth_gbps * 1e9)),
                 "inter": AlphaBeta(hw.inter.latency_us * 1e-6, 1 / (hw.inter.bandwidth_gbps * 1e9))}
        shape = SectionShape(tuple(steps), rows)
        launch = hw.gemm_launch_us * 1e-6 * 2 * local
        fwd_ab = AlphaBeta(launch, max(experts_fwd - launch, 0.0) / rows)
        bwd_ab = AlphaBeta(2 * launch, max(experts_bwd - 2 * launch, 0.0) / rows)
        fixed = tuple(None if x == "auto" else int(x) for x in degrees)
        (rf, rb), _ = choose_degrees(shape, links, fwd_ab, bwd_ab, coschedule=moe.coschedule, fixed=fixed)
        g = math.lcm(rf, rb)  # each direction as pair_time plays it, kept apart
        sect_f = makespan(rf, shape, links, AlphaBeta(fwd_ab.alpha * g / rf, fwd_ab.beta), moe.coschedule)[0]
        sect_b = makespan(rb, shape, links, AlphaBeta(bwd_ab.alpha * g / rb, bwd_ab.beta), moe.coschedule)[0]
        out.update(fwd=router + shuffle + route / 3 + sect_f + extra_fwd,
                   bwd=router * 2 + shuffle * 2 + 2 * route / 3 + sect_b + extra_bwd, overlap_degrees=(rf, rb),
                   a2a_fwd=max(sect_f - experts_fwd, 0.0) + extra_fwd,
                   a2a_bwd=max(sect_b - experts_bwd, 0.0) + extra_bwd)
    else:
        out.update(fwd=router + shuffle + route / 3 + experts_fwd + out["a2a_fwd"],
                   bwd=2 * router + 2 * shuffle + 2 * route / 3 + experts_bwd + out["a2a_bwd"])
    return out


_CHUNK_CACHE: dict[tuple, ChunkCost] = {}


def chunk_cost(cfg: JobConfig, spec: ModelSpec, hw: Hardware, layers: range, *, pre: bool, post: bool,
               stage: int) -> ChunkCost:
    """One micro-batch through one chunk on one rank of ``stage`` (memoised: a search meets the same chunk in
    many layouts)."""
    p, t = cfg.parallel, cfg.train
    kinds = tuple(cfg.moe.is_moe_layer(i) for i in layers)
    key = (hw, cfg.model.model_dump_json(), cfg.moe.model_dump_json(), cfg.wtacrs.model_dump_json(), p.tp, p.sp,
           p.ep, p.etp, t.micro_batch_size, t.recompute, t.dtype, cfg.cluster.ranks_per_node, kinds, pre, post)
    if key not in _CHUNK_CACHE:
        _CHUNK_CACHE[key] = _chunk_cost(cfg, spec, hw, layers, pre=pre, post=post, stage=stage)
    return _CHUNK_CACHE[key]


def _chunk_cost(cfg: JobConfig, spec: ModelSpec, hw: Hardware, layers: range, *, pre: bool, post: bool,
                stage: int) -> ChunkCost:
    from moetrain.parallel.layers import padded_vocab_size

    m, moe, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    dtype = t.dtype
    tp = p.tp
    b, s, d, hd = t.micro_batch_size, m.seq_len, m.d_model, m.head_dim
    T = s * b
    h, kv = m.heads // tp, m.kv_heads // tp
    e = act_bytes(cfg)
    hbm = hw.hbm_gbps * 1e9
    tp_link = group_link(hw, cfg, tp)
    shape = rank_shape(cfg, stage)
    recompute = t.recompute
    c = ChunkCost()

    def linear(name: str, n: float, kdim: float) -> None:
        g = gemm_time(hw, dtype, T, n, kdim)
        c.add(name, g, g, g)

    for i in layers:
        fwd0 = c.forward
        linear("gemm", (h + 2 * kv) * hd, d)
        linear("gemm", d, h * hd)
        core = 0.5 * 4 * b * s * s * h * hd / (hw.peak_flops(dtype) * hw.attention_efficiency)
        c.add("attention", core, 2.5 * core)
        one = spec.saved_activation_bytes(range(i, i + 1), pre=False, post=False,
                                          rank=dataclasses.replace(shape, recompute="none"))
        if moe.is_moe_layer(i):
            tokens = T // tp if p.sp and tp > 1 else T
            lay = moe_layer_time(cfg, hw, tokens, dtype)
            c.add("moe_experts", lay["experts_fwd"], lay["experts_bwd"])
            c.add("moe_a2a", lay["a2a_fwd"], lay["a2a_bwd"])
            rest_f = lay["fwd"] - lay["experts_fwd"] - lay["a2a_fwd"]
            rest_b = lay["bwd"] - lay["experts_bwd"] - lay["a2a_bwd"]
            c.add("elementwise", rest_f, rest_b)
            if moe.shared_experts:
                f = moe.shared_experts * moe.d_expert // tp
                linear("gemm", 2 * f, d)
                linear("gemm", d, f)
        else:
            f = m.d_ffn // tp
            linear("gemm", 2 * f, d)
            linear("gemm", d, f)
        passes = hw.elementwise_factor * one / hbm
        c.add("elementwise", 2 * passes, 4 * passes)
        host = hw.overhead("moe_block" if moe.is_moe_layer(i) else "dense_block")
        c.add("host_overhead", host / 3, 2 * host / 3)
        if tp > 1:
            comm = 2 * ring(tp_link, T * d * e, tp)
            c.add("tp_comm", comm, comm)
        extra = c.forward - fwd0 if recompute == "full" else core if recompute == "selective" else 0.0
        if extra:  # the block's forward (or its attention core) again inside its backward
            c.backward_input += extra
            c.recomputed += extra
            c.parts["recompute"] = c.parts.get("recompute", 0.0) + extra
    if post:
        vocab = padded_vocab_size(m.vocab_size, tp) // tp
        linear("gemm", vocab, d)
        ce = 3 * T * vocab * 4 / hbm
        c.add("elementwise", ce, ce)
    if pre:
        c.add("elementwise", T * d * e / hbm, T * d * e / hbm)
    if pre or post:  # the embedding / head / loss host time, split between the first and the last chunk
        host = hw.overhead("model") / (1 if pre and post else 2)
        c.add("host_overhead", host / 3, 2 * host / 3)
    slow, slow_mem = _slowdown(cfg, hw), _slowdown(cfg, hw, memory=True)
    if slow != 1.0 or slow_mem != 1.0:  # the node's ranks share it: everything but the transfers runs slower
        out = ChunkCost()
        for part, (f, bi, bw) in c.by_part.items():
            k = 1.0 if part in ("tp_comm", "moe_a2a") else slow_mem if part == "elementwise" else slow
            out.add(part, f * k, bi * k, bw * k)
        for part in ("recompute",):
            if part in c.parts:
                out.parts[part] = c.parts[part] * slow
        out.backward_input += c.recomputed * slow
        out.recomputed = c.recomputed * slow
        return out
    return c


def _slowdown(cfg: JobConfig, hw: Hardware, memory: bool = False) -> float:
    """Compute (or, with ``memory``, memory-bound work's) slowdown when the node runs several ranks (calibrated
    CPUs; 1 on GPUs)."""
    if cfg.cluster.ranks_per_node <= 1:
        return 1.0
    return hw.shared_node_memory_slowdown if memory else hw.shared_node_slowdown


@functools.lru_cache(maxsize=65536)
def _pipeline(schedule: str, pp: int, m: int, vpp: int, f: float, b: float, w: float, transfer: float
              ) -> tuple[float, float]:
    """(makespan, mean bubble fraction) of the schedule with these action costs (memoised for the search)."""
    from moetrain.parallel.schedules import build_schedule, simulate

    timeline = simulate(build_schedule(schedule, pp, m, vpp), vpp, {"F": f, "B": b, "W": w},
                        split_backward=schedule == "zero_bubble", transfer=transfer)
    return timeline.makespan, timeline.bubble()


@dataclass
class StepTime:
    step_s: float
    breakdown: dict[str, float]
    stage_costs: list[ChunkCost]
    bubble_fraction: float


def step_time(cfg: JobConfig, spec: ModelSpec, hw: Hardware) -> StepTime:
    """The modeled seconds of one optimizer step (the slowest pipeline stage's view)."""
    p, t = cfg.parallel, cfg.train
    accum = cfg.grad_accum_steps
    stages = []
    for stage in range(p.pp):
        chunks = spec._chunks(stage)
        stages.append([chunk_cost(cfg, spec, hw, ids, pre=pre, post=post, stage=stage) for ids, pre, post in chunks])
    # the pipeline: every F / B / W of the slowest stage's chunks, plus the boundary transfer each way
    e = act_bytes(cfg)
    p2p = 0.0
    if p.pp > 1:
        elems = math.prod(spec.boundary_shape(t.micro_batch_size, p.tp))
        p2p = group_link(hw, cfg, p.tp * cfg.dp * 2).time(elems * e)
    flat = [c for chunks in stages for c in chunks]
    fwd = max(c.forward for c in flat)
    split = p.schedule == "zero_bubble"
    bwd_in = max(c.backward_input if split else c.backward for c in flat)
    bwd_w = max(c.backward_weight for c in flat) if split else 0.0
    if p.pp > 1:
        # sends are asynchronous: a transfer delays the receiver's action, it does not occupy either rank
        pipeline, bubble = _pipeline(p.schedule, p.pp, accum, p.vpp, fwd, bwd_in, bwd_w, p2p)
    else:
        pipeline = accum * (fwd + bwd_in + bwd_w)
        bubble = 0.0
    busy = accum * p.vpp * (fwd + bwd_in + bwd_w)
    breakdown: dict[str, float] = {}
    for chunks in stages[:1] if p.pp == 1 else [max(stages, key=lambda cs: sum(c.forward + c.backward for c in cs))]:
        for c in chunks:
            for k, v in c.parts.items():
                breakdown[k] = breakdown.get(k, 0.0) + v * accum
    breakdown["pipeline_bubble"] = max(pipeline - busy, 0.0)
    # data parallel: buckets reduce behind the last micro-batch's backward, the last bucket exposed
    size = param_bytes(cfg)
    dp_exposed = 0.0
    opt = grad_norm = 0.0
    o = t.optimizer
    for stage in range(p.pp):
        params = rank_params(cfg, spec, rank_shape(cfg, stage))
        buckets = grad_buckets(params, cfg)
        times = []
        for world, group in buckets:
            span = p.tp * world if not group[0].expert else p.etp * p.ep * world
            link = group_link(hw, cfg, span)
            times.append(ring(link, sum(q.numel for q in group) * size, world))
        comm = sum(times)
        window = sum(c.backward for c in stages[stage])  # the last micro-batch's backward through the chunks
        exposed = max(comm - window, times[-1] if times else 0.0)
        dp_exposed = max(dp_exposed, exposed)
        n_local = sum(q.numel for q in params)
        shard = shard_elements(params, cfg, buckets) if o.zero_stage else n_local
        if o.offload == "cpu":
            up_down = (shard + n_local) * size / (hw.host_copy_gbps * 1e9)
            stage_opt = up_down + shard / (hw.host_adam_gparams_per_s * 1e9)
        elif hw.optimizer_ns_per_param:
            stage_opt = shard * hw.optimizer_ns_per_param * 1e-9 * size / 4
        else:
            stage_opt = 7 * shard * size / (hw.hbm_gbps * 1e9) + 4 * hw.gemm_launch_us * 1e-6
        # the global gradient norm reads every gradient this rank holds (ZeRO 2: its slices)
        held = shard if o.zero_stage == 2 else n_local
        norm = held * (hw.grad_norm_ns_per_param * 1e-9 if hw.grad_norm_ns_per_param else size / (hw.hbm_gbps * 1e9))
        grad_norm = max(grad_norm, norm)
        opt = max(opt, stage_opt)
    opt, grad_norm = opt * _slowdown(cfg, hw, memory=True), grad_norm * _slowdown(cfg, hw, memory=True)
    breakdown["dp_comm_exposed"] = dp_exposed
    breakdown["optimizer"] = opt
    breakdown["grad_norm"] = grad_norm
    breakdown["host_overhead"] = breakdown.get("host_overhead", 0.0) + hw.overhead("step")
    total = pipeline + dp_exposed + opt + grad_norm + hw.overhead("step")
    return StepTime(step_s=total, breakdown=breakdown, stage_costs=[c for cs in stages for c in cs],
                    bubble_fraction=bubble)
