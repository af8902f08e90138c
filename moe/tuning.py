"""Online profiling of the chunk-pipelined MoE sections and the choice of their degrees.

For ``auto`` degrees a layer runs one warm-up step (cold caches, first allocations, the first backward
of the process: not fitted), then ``moe.profile_steps`` steps at degrees 2, 4, 1, ... (so chunk sizes
vary and α separates from β), timing every transfer (the link engine's spans), every chunk's expert
compute and every whole section call. :func:`fit_and_choose` then fits α-β per link
class, per layer's forward / backward expert call (α per call, β per row), and the per-chunk cost the
model does not otherwise see (section time minus modeled time, against the degree); averages the
fitted numbers over all ranks (one all-reduce, so every member of an EP group picks the same degrees:
the chunk structure is part of the collective sequence); and picks each layer's (forward, backward)
pair jointly with :func:`moe.perf_model.choose_schedule` (the pair decides the micro-chunk count,
lcm(forward, backward), which both directions pay for; for hier2d also which phase goes first).
A layer whose token count changes (another micro-batch or sequence length) profiles again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moetrain.moe.perf_model import (
    AlphaBeta,
    SectionShape,
    choose_schedule,
    fit_alpha_beta,
    fit_per_call_envelope,
    makespan,
)

__all__ = ["DegreeTuner", "fit_and_choose"]

PROFILE_DEGREES = (2, 4, 1, 3, 6, 8)  # the warm-up step runs the first
_LINK_CODE = {"intra": 1.0, "inter": 2.0}
_LINKS = {1: "intra", 2: "inter"}


@dataclass
class DegreeTuner:
    """Degrees of one MoE layer: fixed, or profiled then chosen (``"auto"`` on either side)."""

    fwd: int | str
    bwd: int | str
    profile_steps: int = 3
    """Measured profiling steps, after ``warmup_steps`` whose records are not fitted."""
    warmup_steps: int = 1
    step: int = 0
    fit_from: float = 0.0
    """``time.perf_counter()`` when the warm-up ended: the fit ignores records that started earlier."""
    chosen: tuple[int, int] | None = None
    inter_first: bool = False
    """hier2d: the inter-node phase first in the pipelined dispatch (chosen with the degrees)."""
    shape_key: tuple | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def profiling(self) -> bool:
        return self.chosen is None and "auto" in (self.fwd, self.bwd)

    @property
    def ready(self) -> bool:
        """Profiling and every measured step done: time for :func:`fit_and_choose`."""
        return self.profiling and self.step >= self.warmup_steps + self.profile_steps

    def degrees(self, shape: tuple) -> tuple[int, int]:
        """This step's degrees for a layer input of ``shape`` (tokens, d)."""
        key = tuple(shape)
        if self.shape_key is not None and key != self.shape_key and "auto" in (self.fwd, self.bwd):
            self.chosen, self.step, self.inter_first = None, 0, False  # shapes changed: profile again
        self.shape_key = key
        if self.chosen is not None:
            return self.chosen
        probe = PROFILE_DEGREES[max(self.step - self.warmup_steps, 0) % len(PROFILE_DEGREES)]
        return (probe if self.fwd == "auto" else int(self.fwd), probe if self.bwd == "auto" else int(self.bwd))

    def end_step(self) -> None:
        self.step += 1
        if self.profiling and self.step == self.warmup_steps:
            self.fit_from = time.perf_counter()


def _fit_links(spans) -> dict[str, AlphaBeta]:
    """α-β per link class from the recorded all-to-alls.

    A span also holds whatever delayed it (a late peer, a descheduled thread): noise that only ever
    adds time. So every distinct size contributes its fastest sample, the closest to the link's cost.
    """
    out = {}
    for link in ("intra", "inter"):
        fastest: dict[int, float] = {}
        for s in spans:
            if s.link == link and s.op == "a2a":
                fastest[s.nbytes] = min(fastest.get(s.nbytes, float("inf")), s.end - s.start)
        out[link] = fit_alpha_beta(list(fastest), list(fastest.values()))
    return out


def _overhead(sections, phase: str, shape, links: dict[str, AlphaBeta], compute: AlphaBeta, cos: bool) -> float:
    """Per-chunk cost the model does not see (plans, job hand-offs, autograd): the slope, over the profiled
    degrees, of measured section time minus the modeled one (≥ 0)."""
    degrees, residual = [], []
    for ph, start, end, r, g in sections:
        if ph == phase:
            degrees.append(float(r))
            residual.append(end - start - makespan(r, shape, links, AlphaBeta(compute.alpha * g / r, compute.beta),
                                                   cos)[0])
    if len(set(degrees)) < 2:
        return 0.0
    return fit_alpha_beta(degrees, [x - min(residual) for x in residual]).beta


def fit_and_choose(layers: list, engine, group=None, max_degree: int = 8) -> dict[int, dict[str, Any]]:
    """Fit the model from what was recorded, agree over ``group`` (all ranks), choose every layer's degrees.

    Collective: every rank calls it at the same step with its MoE layers in the same order.
    """
    # records from before the warm-up ended are not fitted (shared spans: the earliest layer's warm-up end)
    t_from = min((layer.tuner.fit_from for layer in layers if getattr(layer, "tuner", None) is not None),
                 default=0.0)
    spans = [s for s in engine.spans if s.start >= t_from]
    links = _fit_links(spans)
    grads = [s for s in spans if s.op == "allreduce"]
    local: list[float] = [links["intra"].alpha, links["intra"].beta, links["inter"].alpha, links["inter"].beta]
    shapes = []
    cos = engine.coschedule
    for layer in layers:
        st = layer.section_times
        since = 0.0 if getattr(layer, "tuner", None) is None else layer.tuner.fit_from
        compute = [e for e in st.compute if e[3] >= since]
        sections = [e for e in st.sections if e[1] >= since]
        fw, bw = (fit_per_call_envelope([e[4] for e in compute if e[0] == ph], [e[1] for e in compute if e[0] == ph],
                                        [e[2] for e in compute if e[0] == ph]) for ph in ("fwd", "bwd"))
        over = [0.0, 0.0] if st.shape is None else [
            _overhead(sections, ph, st.shape, links, ab, cos) for ph, ab in (("fwd", fw), ("bwd", bw))]
        local += [fw.alpha, fw.beta, bw.alpha, bw.beta, *over]
        shapes.append(st.shape)
    coeffs = torch.tensor(local, dtype=torch.float64)
    # The section's transfers as the slowest rank sees them, the same on every rank: ranks of one EP group may
    # plan different step lists (hier1d: a node leader's gather / exchange / scatter against a member's
    # gather / scatter), so the step count is agreed first (MAX), then each step's link (1 intra, 2 inter)
    # and volume are the elementwise MAX; every rank then models, and chooses for, the same shape.
    n_steps = torch.tensor([max((len(s.steps) for s in shapes if s is not None), default=0)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n_steps, op=dist.ReduceOp.MAX, group=group)
    n = int(n_steps.item())
    vol = torch.zeros(len(layers), 2 * n + 1, dtype=torch.float64)  # rows, n volumes, n link codes
    for i, s in enumerate(shapes):
        if s is not None:
            vol[i, 0] = s.rows
            for k, (link, nb) in enumerate(s.steps):
                vol[i, 1 + k], vol[i, 1 + n + k] = nb, _LINK_CODE[link]
    if dist.is_initialized():
        dist.all_reduce(coeffs, group=group)
        coeffs /= dist.get_world_size(group)
        dist.all_reduce(vol, op=dist.ReduceOp.MAX, group=group)
    c = coeffs.tolist()
    link_ab = {"intra": AlphaBeta(c[0], c[1]), "inter": AlphaBeta(c[2], c[3])}
    out = {}
    for i, layer in enumerate(layers):
        base = 4 + 6 * i
        fw, bw = AlphaBeta(*c[base: base + 2]), AlphaBeta(*c[base + 2: base + 4])
        over = (c[base + 4], c[base + 5])
        s = shapes[i]
        if s is None:
            continue
        shape = SectionShape(tuple((_LINKS[int(vol[i, 1 + n + k])], float(vol[i, 1 + k])) for k in range(n)
                                   if vol[i, 1 + n + k] > 0), float(vol[i, 0]))
        tuner = layer.tuner
        fixed = (None, None) if tuner is None else (None if tuner.fwd == "auto" else int(tuner.fwd),
                                                     None if tuner.bwd == "auto" else int(tuner.bwd))
        # hier2d's two phases may run inter-node first (moe/dispatch.py); the recorded order is intra first
        reorder = (getattr(getattr(layer, "dispatch", None), "algo", None) == "hier2d"
                   and [link for link, _ in shape.steps] == ["intra", "inter"])
        (rf, rb), rev, table = choose_schedule(shape, link_ab, fw, bw, reorder=reorder, overhead=over,
                                               max_degree=max_degree, coschedule=cos, fixed=fixed)
        if rev:
            shape = SectionShape(tuple(reversed(shape.steps)), shape.rows)
        g = math.lcm(rf, rb)
        t_f = makespan(rf, shape, link_ab, AlphaBeta(fw.alpha * g / rf, fw.beta), cos)[0] + over[0] * rf
        t_b, idle = makespan(rb, shape, link_ab, AlphaBeta(bw.alpha * g / rb, bw.beta), cos)
        report = {"links": {k: vars(v) for k, v in link_ab.items()}, "compute_fwd": vars(fw),
                  "compute_bwd": vars(bw), "chunk_overhead_s": list(over),
                  "shape": {"steps": [list(x) for x in shape.steps], "rows": shape.rows},
                  "degrees": [rf, rb], "dispatch_order": "inter_first" if rev else "intra_first",
                  "modeled_fwd_s": t_f, "modeled_bwd_s": t_b + over[1] * rb,
                  "modeled_by_degrees": {f"{a},{b}": t for (a, b), t in table.items()}, "bwd_inter_idle_s": idle,
                  "grad_allreduce_samples": len(grads)}
        if tuner is not None:
            tuner.chosen = (rf, rb)
            tuner.inter_first = rev
            tuner.report = report
        layer.overlap_report = report
        out[layer.layer] = report
    return out
