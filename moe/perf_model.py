"""The α-β performance model of a chunk-pipelined MoE section, its fit, and the degree solver.

Every operation costs ``α + β·n`` (n: bytes for a transfer on a link class, rows for expert compute).
With degree r each of the r chunks carries n/r. A section is: the dispatch plan's steps (each on the
intra or inter link), the experts (compute), the combine steps (the plan reversed). :func:`makespan`
plays the r chunks through three resources (intra link, inter link, compute; one shared link when
intra/inter co-scheduling is off), each serving its steps in the runtime's turn order: every chunk's
first dispatch transfer at once, a chunk's later dispatch transfers just before the previous chunk's
experts, each chunk's combine after its experts.
It also returns the inter link's idle time, the window the data-parallel gradient buckets can use.

:func:`choose_degree` minimises the modeled makespan over r = 1..max (any integer, not only powers of
two) for one direction; :func:`choose_degrees` picks the (forward, backward) pair jointly, because
backward compute costs about twice the forward while the transfers stay the same (so the best degrees
differ) but the runtime splits rows into lcm(forward, backward) micro-chunks that both directions pay
one expert call each for, plus a fitted per-chunk overhead the links and experts do not show. Unlike FSMoE's closed-form
regimes, the simulation covers hierarchical plans (several steps per direction) without new cases.
:func:`choose_schedule` also tries a two-phase plan's phases in the other order (hier2d inter-node
first): the link a chunk crosses first idles at the start of each direction until the first chunk's
first phase is done, and the one it crosses last at the end, so the slower link should come first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AlphaBeta", "fit_alpha_beta", "fit_per_call", "fit_per_call_envelope", "makespan", "choose_degree",
           "choose_degrees", "choose_schedule", "pair_time", "SectionShape"]


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


def fit_per_call(calls: Sequence[float], rows: Sequence[float], times: Sequence[float]) -> AlphaBeta:
    """Least squares ``t = α·calls + β·rows`` with α, β ≥ 0: α per expert call, β per row.

    A chunk of the pipelined section runs one expert call per micro-chunk it holds (``calls``); when
    every sample has the same number of calls per sample this is :func:`fit_alpha_beta` scaled."""
    n = len(times)
    if n == 0:
        return AlphaBeta(0.0, 0.0)
    saa = sum(a * a for a in calls)
    sab = sum(a * b for a, b in zip(calls, rows))
    sbb = sum(b * b for b in rows)
    sat = sum(a * t for a, t in zip(calls, times))
    sbt = sum(b * t for b, t in zip(rows, times))
    det = saa * sbb - sab * sab
    if det > 1e-12 * max(saa * sbb, 1e-30):
        alpha, beta = (sat * sbb - sbt * sab) / det, (sbt * saa - sat * sab) / det
        if alpha >= 0 and beta >= 0:
            return AlphaBeta(alpha, beta)
    if len(set(calls)) == 1 and calls[0] > 0:  # collinear-free case: fit per call on rows per call
        ab = fit_alpha_beta([b / calls[0] for b in rows], [t / calls[0] for t in times])
        return AlphaBeta(ab.alpha, ab.beta)
    only_rows = sbt / sbb if sbb else 0.0
    only_calls = sat / saa if saa else 0.0
    err_rows = sum((t - only_rows * b) ** 2 for b, t in zip(rows, times))
    err_calls = sum((t - only_calls * a) ** 2 for a, t in zip(calls, times))
    return AlphaBeta(0.0, only_rows) if err_rows <= err_calls else AlphaBeta(only_calls, 0.0)


def fit_per_call_envelope(calls: Sequence[float], rows: Sequence[float], times: Sequence[float],
                          slack: float = 1.5) -> AlphaBeta:
    """:func:`fit_per_call` on the samples near the lower envelope.

    A timed expert call also holds whatever delayed it (a descheduled thread, a cold allocation): noise
    that only ever adds time, sometimes 100x (the first backward of a process). Samples slower than
    ``slack`` x the fit are dropped and the rest refitted, until none is dropped (half are always kept)."""
    keep = list(range(len(times)))
    ab = fit_per_call(calls, rows, times)
    while len(keep) > 2:
        pred = {i: ab.alpha * calls[i] + ab.beta * rows[i] for i in keep}
        fast = [i for i in keep if times[i] <= slack * pred[i]]
        if len(fast) == len(keep) or 2 * len(fast) < len(keep):
            break
        keep = fast
        ab = fit_per_call([calls[i] for i in keep], [rows[i] for i in keep], [times[i] for i in keep])
    return ab


@dataclass(frozen=True)
class SectionShape:
    """What one call of a section moves and computes on the slowest rank."""

    steps: tuple[tuple[str, float], ...]
    """The dispatch plan's transfers in order: (link class, bytes)."""
    rows: float
    """Rows the local experts compute."""


def makespan(r: int, shape: SectionShape, links: dict[str, AlphaBeta], compute: AlphaBeta,
             coschedule: bool = True) -> tuple[float, float]:
    """(modeled time, idle time of the inter link) of the section at degree ``r``.

    Each link resource serves its steps strictly in the runtime's turn order (moe/overlap.py): every
    chunk's first dispatch transfer at once, chunk 0's later dispatch transfers, then per chunk i: chunk
    i+1's later dispatch transfers, chunk i's experts, chunk i's combine transfers. A step starts when
    its turn has come, its resource is free and the step before it in its chunk is done."""

    def res(link: str) -> str:
        return link if coschedule else "link"

    disp = [(res(link), links[link].t(nbytes / r)) for link, nbytes in shape.steps]
    comb = list(reversed(disp))
    t_exp = compute.t(shape.rows / r)
    # every step as (chunk, index in the chunk's chain); chain: dispatch steps, experts, combine steps
    n_d = len(disp)
    chain = disp + [("compute", t_exp)] + comb
    queues: dict[str, list[tuple[int, int]]] = {}

    def turn(c: int, k: int) -> None:
        queues.setdefault(chain[k][0], []).append((c, k))

    for c in range(r):
        if n_d:
            turn(c, 0)
    for k in range(1, n_d):
        turn(0, k)
    for i in range(r):
        if i + 1 < r:
            for k in range(1, n_d):
                turn(i + 1, k)
        turn(i, n_d)
        for k in range(n_d + 1, len(chain)):
            turn(i, k)
    finish: dict[tuple[int, int], float] = {}
    free = {name: 0.0 for name in queues}
    busy = {name: 0.0 for name in queues}
    pos = {name: 0 for name in queues}
    left = sum(len(q) for q in queues.values())
    while left:
        progressed = False
        for name, q in queues.items():
            while pos[name] < len(q):
                c, k = q[pos[name]]
                if k > 0 and (c, k - 1) not in finish:
                    break
                start = max(free[name], finish[(c, k - 1)] if k > 0 else 0.0)
                dur = chain[k][1]
                finish[(c, k)] = free[name] = start + dur
                busy[name] += dur
                pos[name] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise AssertionError("section model stalled")
    end = max(finish.values(), default=0.0)
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


def pair_time(rf: int, rb: int, shape: SectionShape, links: dict[str, AlphaBeta], fwd: AlphaBeta, bwd: AlphaBeta,
              overhead: tuple[float, float] = (0.0, 0.0), coschedule: bool = True) -> float:
    """Modeled forward + backward time of a section at degrees (rf, rb).

    The runtime splits the rows into lcm(rf, rb) micro-chunks so both directions can regroup them;
    a chunk of degree r holds lcm/r of them and runs one expert call per micro-chunk, so each chunk's
    compute is ``α·lcm/r + β·rows/r`` with α, β per call and per row. ``overhead`` is the fitted
    per-chunk cost outside links and experts (plans, job hand-offs, autograd), per direction."""
    g = math.lcm(rf, rb)
    t_f = makespan(rf, shape, links, AlphaBeta(fwd.alpha * g / rf, fwd.beta), coschedule)[0]
    t_b = makespan(rb, shape, links, AlphaBeta(bwd.alpha * g / rb, bwd.beta), coschedule)[0]
    return t_f + t_b + overhead[0] * rf + overhead[1] * rb


def choose_degrees(shape: SectionShape, links: dict[str, AlphaBeta], fwd: AlphaBeta, bwd: AlphaBeta, *,
                   overhead: tuple[float, float] = (0.0, 0.0), max_degree: int = 8, coschedule: bool = True,
                   fixed: tuple[int | None, int | None] = (None, None)) -> tuple[tuple[int, int], dict]:
    """The (forward, backward) degrees with the smallest :func:`pair_time` (ties: smaller degrees), and
    the modeled time of every pair tried. ``fixed`` pins a direction the user set."""
    cap = max(1, min(max_degree, int(shape.rows) if shape.rows >= 1 else 1))
    fs = [fixed[0]] if fixed[0] else range(1, cap + 1)
    bs = [fixed[1]] if fixed[1] else range(1, cap + 1)
    times = {(rf, rb): pair_time(rf, rb, shape, links, fwd, bwd, overhead, coschedule) for rf in fs for rb in bs}
    best = min(times, key=lambda k: (round(times[k], 12), k[0] + k[1], k))
    return best, times


def choose_schedule(shape: SectionShape, links: dict[str, AlphaBeta], fwd: AlphaBeta, bwd: AlphaBeta, *,
                    reorder: bool, **kwargs) -> tuple[tuple[int, int], bool, dict]:
    """:func:`choose_degrees` for the plan's transfer order and, with ``reorder`` (a two-phase plan that
    can run its phases the other way round), for the reversed order. Returns (degrees, reversed, times
    of the winning order); ties keep the recorded order."""
    best = None
    for rev in ((False, True) if reorder and len(shape.steps) == 2 else (False,)):
        s = SectionShape(tuple(reversed(shape.steps)), shape.rows) if rev else shape
        degrees, table = choose_degrees(s, links, fwd, bwd, **kwargs)
        if best is None or table[degrees] < best[0] - 1e-12:
            best = (table[degrees], degrees, rev, table)
    return best[1], best[2], best[3]
