"""Pipeline schedules as per-stage action lists, and a simulator that times them.

A schedule is, for each pipeline rank, the ordered list of what it computes: ``F`` (forward of one
micro-batch through one of its model chunks), ``B`` (backward; the whole backward, or only the
input-gradient half when the schedule splits it) and ``W`` (the deferred weight-gradient half).
Rank ``r`` holds model chunks ``c = 0..v-1``, which are virtual stages ``c * p + r`` (Megatron's
interleaved placement), so activations flow 0 -> 1 -> ... -> p-1 -> 0 (next chunk) -> ...

- ``gpipe``: every forward, then every backward.
- ``1f1b``: ``p - r - 1`` warm-up forwards, then alternate one forward / one backward, then drain.
- ``interleaved``: 1F1B over ``v`` chunks per rank in groups of ``p`` micro-batches (Megatron-LM's
  order); needs ``m % p == 0``.
- ``zero_bubble``: ZB-H1 (Qi et al., 2024). B and W are separate; 1F1B's order of F and B, with
  rank r running each W ``r`` backward passes late (:func:`_zb_h1`). With equal F, B, W costs the
  makespan is ``3m + p - 1`` against 1F1B's ``3m + 3(p - 1)``, at 1F1B's peak of ``p`` micro-batches
  in flight (checked by the tests with :func:`simulate`).

Every list is checked deadlock-free by :func:`simulate`, which also gives the bubble (idle) fraction
for given action costs: the figure that ``benchmarks/pipeline_bubble.py`` measures for real.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Action", "build_schedule", "simulate", "theoretical_bubble", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


@dataclass(frozen=True)
class Action:
    kind: str  # "F" | "B" | "W"
    mb: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def _gpipe(p: int, m: int, r: int) -> list[Action]:
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def _one_f_one_b(p: int, m: int, r: int) -> list[Action]:
    warm = min(p - r - 1, m)
    out = [Action("F", i) for i in range(warm)]
    for i in range(m - warm):
        out += [Action("F", warm + i), Action("B", i)]
    return out + [Action("B", i) for i in range(m - warm, m)]


def _interleaved(p: int, m: int, r: int, v: int) -> list[Action]:
    total = m * v

    def at(k: int, forward: bool) -> Action:
        c = (k // p) % v
        mb = (k // (p * v)) * p + k % p
        return Action("F" if forward else "B", mb, c if forward else v - 1 - c)

    warm = min((p - r - 1) * 2 + (v - 1) * p, total)
    out = [at(k, True) for k in range(warm)]
    for i in range(total - warm):
        out += [at(warm + i, True), at(i, False)]
    return out + [at(k, False) for k in range(total - warm, total)]


def _deps(a: Action, r: int, p: int, v: int) -> list[tuple[int, Action]]:
    """(rank, action) pairs that must finish before ``a`` on rank ``r`` may start."""
    vs = a.chunk * p + r
    last = p * v - 1
    if a.kind == "F":
        if vs == 0:
            return []
        prev = vs - 1
        return [(prev % p, Action("F", a.mb, prev // p))]
    if a.kind == "B":
        own = [(r, Action("F", a.mb, a.chunk))]
        if vs == last:
            return own
        nxt = vs + 1
        return own + [(nxt % p, Action("B", a.mb, nxt // p))]
    return [(r, Action("B", a.mb, a.chunk))]


def _zb_h1(p: int, m: int, r: int) -> list[Action]:
    """1F1B with B and W split, rank r running each W ``r`` backward passes late: the W work fills the
    waits of the drain, and no rank holds more than ``p`` micro-batches (1F1B's peak on rank 0)."""
    warm = min(p - r - 1, m)
    out = [Action("F", i) for i in range(warm)]
    nb = nw = 0

    def backward(i: int) -> None:
        nonlocal nb, nw
        out.append(Action("B", i))
        nb += 1
        if nb - nw > r:
            out.append(Action("W", nw))
            nw += 1

    for i in range(m - warm):
        out.append(Action("F", warm + i))
        backward(i)
    for i in range(m - warm, m):
        backward(i)
    return out + [Action("W", i) for i in range(nw, m)]


def build_schedule(name: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """The action list of every pipeline rank for ``m`` micro-batches over ``p`` stages (``v`` chunks each)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"a pipeline needs p, m, v >= 1, got p={p}, m={m}, v={v}")
    if name == "interleaved":
        if m % p:
            raise ValueError(f"schedule 'interleaved' needs the micro-batch count ({m}) to be a multiple of pp={p}")
        return [_interleaved(p, m, r, v) for r in range(p)]
    if v != 1:
        raise ValueError(f"schedule {name!r} runs one model chunk per stage (vpp=1), got vpp={v}")
    if name == "zero_bubble":
        return [_zb_h1(p, m, r) for r in range(p)]
    fn = _gpipe if name == "gpipe" else _one_f_one_b
    return [fn(p, m, r) for r in range(p)]


@dataclass(frozen=True)
class Timeline:
    makespan: float
    busy: list[float]
    start: dict[tuple[int, Action], float]

    def bubble(self, r: int | None = None) -> float:
        """Idle fraction of rank ``r`` (mean over ranks when None) over the whole makespan."""
        ranks = range(len(self.busy)) if r is None else [r]
        return sum(1.0 - self.busy[q] / self.makespan for q in ranks) / len(ranks)


def simulate(lists: list[list[Action]], v: int = 1, cost: dict[str, float] | None = None,
             split_backward: bool = False, transfer: float = 0.0) -> Timeline:
    """Run the lists in order with the given action costs; raise on deadlock.

    ``cost`` defaults to F=1, B=2 (a whole backward) or F=B=W=1 when ``split_backward``. ``transfer`` delays
    an action that waits on another rank's (the boundary send) without keeping either rank busy.
    """
    p = len(lists)
    cost = cost or ({"F": 1.0, "B": 1.0, "W": 1.0} if split_backward else {"F": 1.0, "B": 2.0, "W": 0.0})
    finish: dict[tuple[int, Action], float] = {}
    start: dict[tuple[int, Action], float] = {}
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    total = sum(len(x) for x in lists)
    while len(finish) < total:
        progressed = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                deps = _deps(a, r, p, v)
                if not all(d in finish for d in deps):
                    break
                t0 = max([clock[r]] + [finish[d] + (transfer if d[0] != r else 0.0) for d in deps])
                start[(r, a)] = t0
                clock[r] = finish[(r, a)] = t0 + cost[a.kind]
                busy[r] += cost[a.kind]
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: lists[r][pos[r]] for r in range(p) if pos[r] < len(lists[r])}
            raise RuntimeError(f"pipeline schedule deadlocks: ranks wait on {stuck}")
    return Timeline(makespan=max(clock), busy=busy, start=start)


def theoretical_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """The textbook bubble fraction: (p-1)/(m+p-1) for gpipe and 1f1b, (p-1)/(v*m+p-1) interleaved,
    and for ZB-H1 with equal F, B, W costs (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)) = (p-1)/(3m+p-1)."""
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (3 * m + p - 1)
