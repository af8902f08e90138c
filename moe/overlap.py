"""FSMoE-style chunk pipelining of dispatch -> experts -> combine, with independent backward degree.

The expert-sorted rows are cut into ``G = lcm(r_fwd, r_bwd)`` micro-chunks: micro-chunk g holds rows
``[floor(g*c/G), floor((g+1)*c/G))`` of every (source member, expert) segment of ``c`` rows, so chunks
stay uneven and dropless exactly as the unchunked layer (no padding), and every member computes
every other member's piece sizes from the count matrix it already has. Forward chunk i is the
consecutive micro-chunks ``[i*G/r_fwd, (i+1)*G/r_fwd)``; backward chunk j likewise with ``r_bwd``.

Forward: every chunk's dispatch starts at once on the link channels (:mod:`dist.links`; hier2d's
intra and inter phases of different chunks overlap; a chunk's second phase takes its turn on its link
just before the previous chunk's experts, so the combine of chunk i is not queued behind the second
phase of every later dispatch); as chunk i arrives its experts run, one autograd sub-graph per
micro-chunk, and its combine starts while chunk i+1 computes. Backward (same
structure, degree ``r_bwd``): the output gradients of every backward chunk travel out like a
dispatch; as chunk j arrives, ``torch.autograd.backward`` runs its micro-chunks' sub-graphs (so the
expert gradients, activation derivative included, come from autograd: nothing is hand-derived) and
the input gradients travel back like a combine. While the expert backward of a chunk computes, the
inter-node channel is idle: the layer hands the data-parallel reducer that window
(``release_grads``) so ready dense-gradient buckets are reduced in it.

Every stage is timed (expert compute per chunk here, link transfers by the engine) for the online
α-β model in :mod:`moe.perf_model`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moetrain.moe.dispatch import Plan, inverse_permutation

__all__ = ["ChunkLayout", "pipelined_experts", "SectionTimes"]


class ChunkLayout:
    """Piece sizes and row indices of micro-chunks, from the count matrix ``C[src, e]``."""

    def __init__(self, counts: torch.Tensor, me: int, local_experts: int, micro: int):
        self.C = counts.tolist()
        self.n, self.E = counts.shape
        self.me, self.L, self.G = me, local_experts, micro
        self.my_starts = [0]
        for c in self.C[me]:
            self.my_starts.append(self.my_starts[-1] + c)

    def _b(self, c: int, g: int) -> int:
        return (g * c) // self.G

    def counts(self, micros: range) -> torch.Tensor:
        lo, hi = micros.start, micros.stop
        return torch.tensor([[self._b(c, hi) - self._b(c, lo) for c in row] for row in self.C], dtype=torch.long)

    def send_index(self, micros: range) -> torch.Tensor:
        """Rows of this member's expert-sorted buffer that belong to ``micros`` (in sorted order)."""
        lo, hi = micros.start, micros.stop
        parts = [torch.arange(s + self._b(c, lo), s + self._b(c, hi))
                 for s, c in zip(self.my_starts, self.C[self.me])]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def recv_pieces(self, micros: range) -> tuple[list[torch.Tensor], list[list[list[int]]]]:
        """For the received buffer of ``micros`` (ordered by source, local expert): per micro-chunk, the
        row index into that buffer and its ``[source][local expert]`` counts."""
        lo = micros.start
        index: list[list[torch.Tensor]] = [[] for _ in micros]
        counts = [[[0] * self.L for _ in range(self.n)] for _ in micros]
        off = 0
        for s in range(self.n):
            for le in range(self.L):
                c = self.C[s][self.me * self.L + le]
                base = self._b(c, lo)
                for k, g in enumerate(micros):
                    a, b = self._b(c, g), self._b(c, g + 1)
                    index[k].append(torch.arange(off + a - base, off + b - base))
                    counts[k][s][le] = b - a
                off += self._b(c, micros.stop) - base
        return [torch.cat(ix) if ix else torch.zeros(0, dtype=torch.long) for ix in index], counts


@dataclass
class SectionTimes:
    """Measured expert compute: (phase, rows, seconds, start, expert calls) per chunk; whole calls:
    (phase, start, end, degree, micro-chunks)."""

    compute: list[tuple[str, int, float, float, int]] = field(default_factory=list)
    sections: list[tuple[str, float, float, int, int]] = field(default_factory=list)
    shape: object = None  # moe.perf_model.SectionShape of the latest call


def _steps(engine, plan: Plan, forward: bool, tag: str) -> list:
    steps = []
    for st in (plan.steps if forward else reversed(plan.steps)):
        if st.kind == "a2a":
            send, recv = (st.send, st.recv) if forward else (st.recv, st.send)
            steps.append(engine.a2a_step(st.group, send, recv, tag=tag))
        else:
            index = st.index if forward else inverse_permutation(st.index)
            steps.append(engine.local_step(lambda x, ix=index: x.index_select(0, ix.to(x.device))))
    return steps


class _Section:
    """State of one pipelined call, shared by its forward and backward."""

    def __init__(self, *, layout: ChunkLayout, plan_for: Callable[[torch.Tensor], Plan], engine,
                 expert_fn: Callable, degrees: tuple[int, int], tag: str, times: SectionTimes,
                 release_grads: Callable[[], None] | None, grad: bool, record_shape: bool = True):
        self.layout, self.plan_for, self.engine = layout, plan_for, engine
        self.record_shape = record_shape  # the section's whole-call shape, for the α-β fit
        self.expert_fn, self.tag, self.times, self.release_grads = expert_fn, tag, times, release_grads
        self.grad = grad  # build expert sub-graphs for a backward
        self.rf, self.rb = degrees
        G = layout.G
        self.fwd = [range(i * G // self.rf, (i + 1) * G // self.rf) for i in range(self.rf)]
        self.bwd = [range(j * G // self.rb, (j + 1) * G // self.rb) for j in range(self.rb)]
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # micro -> (x leaf, y)
        self._plans: dict[tuple[int, int], tuple[Plan, torch.Tensor]] = {}  # chunk -> (plan, rows it sends)

    def _plan(self, micros: range, device) -> tuple[Plan, torch.Tensor]:
        """A chunk's plan and the rows of the sorted buffer it carries; the backward reuses the forward's
        when the degrees are equal (same chunks)."""
        key = (micros.start, micros.stop)
        if key not in self._plans:
            self._plans[key] = (self.plan_for(self.layout.counts(micros)),
                                self.layout.send_index(micros).to(device))
        return self._plans[key]

    def _record_shape(self, rows: torch.Tensor) -> None:
        """The whole section's transfers and rows (degree 1), for the α-β model."""
        import torch.distributed as dist

        from moetrain.moe.perf_model import SectionShape

        full = self.plan_for(self.layout.counts(range(0, self.layout.G)))
        row_bytes = rows[0].numel() * rows.element_size() if rows.dim() > 1 else rows.element_size()
        steps = []
        for st in full.steps:
            if st.kind == "a2a":
                me = dist.get_rank(st.group)
                nb = row_bytes * max(sum(st.send) - st.send[me], sum(st.recv) - st.recv[me])
                steps.append((self.engine.link_of(st.group), float(nb)))
        self.times.shape = SectionShape(tuple(steps), float(full.recv_counts.sum()))

    def _exchange(self, phase: str, chunks: list[range], x: torch.Tensor,
                  compute: Callable[[range, torch.Tensor], torch.Tensor],
                  before_compute: Callable[[], None] | None = None) -> torch.Tensor:
        """The shared skeleton of forward and backward: every chunk's rows of ``x`` go out at once
        (dispatch direction); as each chunk arrives, ``compute(micros, received)`` runs and its result
        goes back (combine direction) while the next chunk computes; results land in ``x``'s order."""
        start = time.perf_counter()
        eng = self.engine
        out_tag, back_tag = ("fd", "fc") if phase == "fwd" else ("bc", "bd")
        # every chunk's first transfer takes its turn now (chunk 0's starts while the later chunks' plans
        # are built); its later ones (a hierarchical plan's second phase) just before the previous chunk's
        # experts, so on that link the combine of chunk i goes ahead of the dispatch of chunk i+2 instead
        # of queueing behind every dispatch
        plans, sends, jobs = [], [], []
        for i, mic in enumerate(chunks):
            plan, ix = self._plan(mic, x.device)
            plans.append(plan)
            sends.append(ix)
            steps = _steps(eng, plan, True, f"{self.tag}/{out_tag}{i}")
            first = next((k for k, st in enumerate(steps) if st.kind != "local"), len(steps))
            jobs.append(eng.submit(x.index_select(0, ix), steps, defer_from=first + 1))
        eng.release(jobs[0])
        if before_compute is not None:
            before_compute()
        back = []
        for i, mic in enumerate(chunks):
            if i + 1 < len(jobs):
                eng.release(jobs[i + 1])
            recv = jobs[i].wait()
            t0 = time.perf_counter()
            result = compute(mic, recv)
            self.times.compute.append((phase, recv.shape[0], time.perf_counter() - t0, t0, len(mic)))
            back.append(eng.submit(result, _steps(eng, plans[i], False, f"{self.tag}/{back_tag}{i}")))
        out = x.new_zeros(x.shape)
        for job, ix in zip(back, sends):
            out.index_copy_(0, ix, job.wait())
        self.times.sections.append((phase, start, time.perf_counter(), len(chunks), self.layout.G))
        return out

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        def experts(mic: range, recv: torch.Tensor) -> torch.Tensor:
            pieces, counts = self.layout.recv_pieces(mic)
            y_chunk = recv.new_empty(recv.shape)
            for g, ix, cnt in zip(mic, pieces, counts):
                ix = ix.to(recv.device)
                with torch.enable_grad():
                    x_g = recv.index_select(0, ix).requires_grad_(self.grad)
                    y_g = self.expert_fn(x_g, cnt)
                self.graphs[g] = (x_g, y_g)
                y_chunk.index_copy_(0, ix, y_g.detach())
            return y_chunk

        # the whole-call shape (for the fit) is built once the first chunks are on their way
        record = (lambda: self._record_shape(rows)) if self.record_shape else None
        return self._exchange("fwd", self.fwd, rows, experts, record)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        def experts_backward(mic: range, recv: torch.Tensor) -> torch.Tensor:
            pieces, _ = self.layout.recv_pieces(mic)
            gx_chunk = recv.new_zeros(recv.shape)
            for g, ix in zip(mic, pieces):
                ix = ix.to(recv.device)
                x_g, y_g = self.graphs.pop(g)
                if y_g.requires_grad and ix.numel():
                    torch.autograd.backward(y_g, recv.index_select(0, ix))
                if x_g.grad is not None:
                    gx_chunk.index_copy_(0, ix, x_g.grad)
            return gx_chunk

        # the inter link idles while the expert backward computes: the reducer's window
        return self._exchange("bwd", self.bwd, grad.contiguous(), experts_backward, self.release_grads)


class _Pipelined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, section: _Section):
        ctx.section = section
        return section.forward(rows.detach())

    @staticmethod
    def backward(ctx, grad):
        section = ctx.section
        ctx.section = None
        return section.backward(grad), None


def pipelined_experts(rows_sorted: torch.Tensor, counts: torch.Tensor, *, me: int, local_experts: int,
                      plan_for: Callable[[torch.Tensor], Plan], engine, expert_fn: Callable,
                      degrees: tuple[int, int], tag: str = "", times: SectionTimes | None = None,
                      release_grads: Callable[[], None] | None = None, record_shape: bool = True) -> torch.Tensor:
    """dispatch -> experts -> combine of expert-sorted rows, chunked ``degrees = (r_fwd, r_bwd)``.

    ``counts[src, e]``: the EP group's count matrix; ``plan_for(C)`` builds the dispatch plan of a
    chunk's count matrix; ``expert_fn(x, recv_counts)`` runs the local experts on rows ordered by
    (source, local expert). Returns the expert outputs in ``rows_sorted``'s order. ``record_shape``:
    store the whole call's transfers and rows in ``times.shape`` (what the degree profiling fits).
    """
    rf, rb = degrees
    if rf < 1 or rb < 1:
        raise ValueError(f"pipeline degrees must be >= 1, got {degrees}")
    layout = ChunkLayout(counts, me, local_experts, math.lcm(rf, rb))
    section = _Section(layout=layout, plan_for=plan_for, engine=engine, expert_fn=expert_fn, degrees=(rf, rb),
                       tag=tag, times=times or SectionTimes(), release_grads=release_grads,
                       grad=torch.is_grad_enabled(), record_shape=record_shape)
    if not section.grad:
        return section.forward(rows_sorted)
    return _Pipelined.apply(rows_sorted, section)
