"""The α-β performance model of a chunk-pipelined MoE section, its fit, and the degree solver.

Every operation costs ``α + β·n`` (n: bytes for a transfer on a link class, rows for expert compute).
With degree r each of the r chunks carries n/r. A section is: the dispatch plan's steps (each on the
intra or inter link), the experts (compute), the combine steps (the plan reversed). :func:`makespan`
plays the r chunks through three FIFO resources (intra link, inter link, compute; one shared link
when intra/inter co-scheduling is off) the way the runtime issues them: all dispatches at once, each
chunk's experts when its rows arrive and the previous chunk's experts are done, its combine after.
It also returns the inter link's idle time, the window the data-parallel gradient buckets can use.

:func:`choose_degree` minimises the modeled makespan over r = 1..max (any integer, not only powers of
two); forward and backward are solved separately because backward compute costs about twice the
forward while the transfers stay the same, so their best degrees differ. Unlike FSMoE's closed-form
regimes, the simulation covers hierarchical plans (several steps per direction) without new cases.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AlphaBeta", "fit_alpha_beta", "makespan", "choose_degree", "SectionShape"]


@dataclass(frozen=True)
class AlphaBeta:
    alpha: float
    beta: float

    def t(self, n: float) -> float:
        return self.alpha + self.beta * n


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> AlphaBeta:
    """Least-squares ``t = α + β n`` with α, β ≥ 0 (one size: all of it is β)."""
    n = len(sizes)
    if n == 0:
        return AlphaBeta(0.0, 0.0)
    mx, mt = sum(sizes) / n, sum(times) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    if sxx <= 1e-12 * max(mx * mx, 1e-30):
        return AlphaBeta(0.0, mt / mx) if mx > 0 else AlphaBeta(mt, 0.0)
    beta = sum((x - mx) * (t - mt) for x, t in zip(sizes, times)) / sxx
    alpha = mt - beta * mx
    if beta < 0:
        return AlphaBeta(mt, 0.0)
    if alpha < 0:
        sxt = sum(x * t for x, t in zip(sizes, times))
        sxx0 = sum(x * x for x in sizes)
        return AlphaBeta(0.0, sxt / sxx0 if sxx0 else 0.0)
    return AlphaBeta(alpha, beta)


@dataclass(frozen=True)
class SectionShape:
    """What one call of a section moves and computes on the slowest rank."""

    steps: tuple[tuple[str, float], ...]
    """The dispatch plan's transfers in order: (link class, bytes)."""
    rows: float
    """Rows the local experts compute."""


def makespan(r: int, shape: SectionShape, links: dict[str, AlphaBeta], compute: AlphaBeta,
             coschedule: bool = True) -> tuple[float, float]:
    """(modeled time, idle time of the inter link) of the section at degree ``r``."""

    def res(link: str) -> str:
        return link if coschedule else "link"

    stages = [(res(link), links[link].t(nbytes / r)) for link, nbytes in shape.steps]
    chain = stages + [("compute", compute.t(shape.rows / r))] + list(reversed(stages))
    n_disp = len(stages)
    free: dict[str, float] = {}
    busy: dict[str, float] = {}
    ready: list[tuple[float, int, int, int]] = []  # (submit time, seq, chunk, stage)
    seq = 0
    for c in range(r):
        heapq.heappush(ready, (0.0, seq, c, 0))
        seq += 1
    computed = -1  # chunks whose experts have been scheduled, in order
    waiting: dict[int, float] = {}  # chunk -> time its rows arrived (compute not yet scheduled)
    end = 0.0
    while ready or waiting:
        if ready:
            # the earliest-starting request on any resource (FIFO by submission within a resource)
            best = None
            for sub, s, c, k in ready:
                name, dur = chain[k]
                start = max(sub, free.get(name, 0.0))
                if best is None or (start, s) < best[0]:
                    best = ((start, s), sub, s, c, k)
            (start, _), sub, s, c, k = best
            ready.remove((sub, s, c, k))
            heapq.heapify(ready)
            name, dur = chain[k]
            finish = start + dur
            free[name] = finish
            busy[name] = busy.get(name, 0.0) + dur
            end = max(end, finish)
            nxt = k + 1
            if nxt == n_disp:  # rows arrived: experts run in chunk order on the compute resource
                waiting[c] = finish
            elif nxt < len(chain):
                heapq.heappush(ready, (finish, seq, c, nxt))
                seq += 1
        while computed + 1 in waiting:
            c = computed + 1
            arrived = waiting.pop(c)
            name, dur = chain[n_disp]
            start = max(arrived, free.get(name, 0.0))
            free[name] = start + dur
            busy[name] = busy.get(name, 0.0) + dur
            end = max(end, start + dur)
            computed = c
            if n_disp + 1 < len(chain):
                heapq.heappush(ready, (start + dur, seq, c, n_disp + 1))
                seq += 1
        if not ready and waiting and computed + 1 not in waiting:
            raise AssertionError("section model stalled")
    inter = "inter" if coschedule else "link"
    return end, max(end - busy.get(inter, 0.0), 0.0)


def choose_degree(shape: SectionShape, links: dict[str, AlphaBeta], compute: AlphaBeta, *, max_degree: int = 8,
                  coschedule: bool = True) -> tuple[int, dict[int, float]]:
    """The degree in 1..max_degree with the smallest modeled time (ties: the smaller degree), and the
    modeled time of every degree."""
    cap = max(1, min(max_degree, int(shape.rows) if shape.rows >= 1 else 1))
    times = {r: makespan(r, shape, links, compute, coschedule)[0] for r in range(1, cap + 1)}
    best = min(times, key=lambda r: (round(times[r], 12), r))
    return best, times
