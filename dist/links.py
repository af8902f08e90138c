"""Communication channels per link class, optional simulated link costs, and a record of what ran when.

A process group is *intra* when all its members share a node and *inter* otherwise. The
:class:`LinkEngine` gives each link class its own channel: a worker thread that runs that class's
collectives one after another, in submission order (so every rank issues each group's collectives in
the same order), while the training thread computes. Work is submitted as a :class:`Job`, a chain of
steps (an uneven all-to-all, an all-reduce, or a local function such as a row permutation); each
collective step runs on the channel of its group's link class and hands the job on to the next step's
channel when done, so the intra-node phase of one chunk and the inter-node phase of another proceed at
once (co-scheduling). Each collective step gets a ticket on its channel when its job is submitted
(or, for steps a job defers, when the training thread releases them), and a channel runs its steps
strictly in ticket order: tickets are taken in program order on the training thread, so every rank
runs each group's collectives in the same order however the timing falls (a step that is ready early
waits for its turn), and every step's prerequisites (the earlier turns on its channel, the earlier
steps of its job) hold earlier tickets, so the earliest-ticketed unfinished step can always progress
(no deadlock). On GPU the same
collectives run on NCCL's internal streams; the channel threads only order and overlap their launch.

Simulated links (``network.simulate``): each collective on a channel also takes ``latency +
bytes / bandwidth`` of its link class; the thread sleeps out whatever the real transfer did not
already take, so the delay costs no CPU and the channel stays busy for it, like a real link. Never on
unless the config asks for it. With ``network.isolation=netns`` inter-node links are real, shaped veths:
only their latency is added here.

Every collective is recorded as a :class:`Span` (link, op, bytes, start, end), and the training thread
records when it waits for a job (``waits``): the profiler's communication, hidden and exposed time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["LinkSpec", "LinkEngine", "Job", "Span", "link_class", "link_engine_for"]


@dataclass(frozen=True)
class LinkSpec:
    latency_s: float
    bytes_per_s: float

    def cost(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass
class Span:
    link: str
    op: str
    nbytes: int
    start: float
    end: float
    tag: str = ""


def link_class(ranks: Sequence[int], node_of: Sequence[int]) -> str:
    """``intra`` when every rank of the group lives on one node, else ``inter``."""
    return "intra" if len({node_of[r] for r in ranks}) <= 1 else "inter"


@dataclass
class _Step:
    kind: str  # "a2a" | "allreduce" | "local"
    group: object = None
    send: list[int] | None = None
    recv: list[int] | None = None
    fn: Callable | None = None
    tag: str = ""
    ticket: int = -1


class _Channel:
    """One link class's worker thread, running queued steps in ticket order."""

    def __init__(self, name: str, engine: LinkEngine):
        self.name, self.engine = name, engine
        self.tickets = itertools.count()
        self.next = 0
        self.pending: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, name=f"moetrain-{name}-link", daemon=True)
        self.thread.start()

    def put(self, ticket: int, job: Job | None) -> None:
        with self.cond:
            self.pending[ticket] = job
            self.cond.notify()

    def _serve(self) -> None:
        while True:
            with self.cond:
                while self.next not in self.pending and not self.closed:
                    self.cond.wait()
                if self.closed and self.next not in self.pending:
                    return
                job = self.pending.pop(self.next)
                self.next += 1
            if job is None:  # a step of a failed job: skip its turn
                continue
            step = job.steps[job.pos]
            try:
                job.x = self.engine._run(step, job.x)
                job.pos += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                job.error = exc
            self.engine._advance(job)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=5)


class Job:
    """A chain of steps on one buffer; ``wait()`` returns the final buffer (re-raising a step's error)."""

    def __init__(self, engine: LinkEngine, x: torch.Tensor, steps: list[_Step], ticketed: int):
        self.engine, self.x, self.steps = engine, x, steps
        self.pos = 0
        self.ticketed = ticketed  # steps [0, ticketed) have their channel turns; the rest wait for release()
        self.parked = False  # reached an un-ticketed step: release() queues it
        self.skipped = 0  # turns before this index were given up (failed job)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> torch.Tensor:
        if not self.done.is_set():
            t0 = time.perf_counter()
            self.done.wait()
            self.engine.waits.append((t0, time.perf_counter()))
        if self.error is not None:
            raise RuntimeError(f"communication step failed: {self.error}") from self.error
        return self.x


@dataclass
class LinkEngine:
    """Per-link-class channels (threads) for one rank; see the module docstring."""

    node_of: Sequence[int]
    simulate: dict[str, LinkSpec] | None = None
    coschedule: bool = True
    """False: one channel for both link classes (intra and inter phases serialise)."""
    spans: list[Span] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)
    record: bool = True

    def __post_init__(self):
        self._class_of: dict[int, str] = {}
        self._lock = threading.Lock()  # job.ticketed / job.parked between the training and channel threads
        self._channels = {name: _Channel(name, self) for name in (("intra", "inter") if self.coschedule else ("all",))}

    # ------------------------------------------------------------------ link classes
    def link_of(self, group) -> str:
        key = id(group)
        if key not in self._class_of:
            self._class_of[key] = link_class(dist.get_process_group_ranks(group), self.node_of)
        return self._class_of[key]

    def _channel(self, link: str) -> _Channel:
        return self._channels[link if self.coschedule else "all"]

    # ------------------------------------------------------------------ submitting work
    def a2a_step(self, group, send: list[int], recv: list[int], tag: str = "") -> _Step:
        return _Step("a2a", group, list(send), list(recv), tag=tag)

    def allreduce_step(self, group, tag: str = "") -> _Step:
        return _Step("allreduce", group, tag=tag)

    @staticmethod
    def local_step(fn: Callable[[torch.Tensor], torch.Tensor]) -> _Step:
        return _Step("local", fn=fn)

    def _ticket(self, steps: list[_Step]) -> None:
        for step in steps:  # tickets in program order: the same on every rank
            if step.kind != "local":
                step.ticket = next(self._channel(self.link_of(step.group)).tickets)

    def submit(self, x: torch.Tensor, steps: list[_Step], defer_from: int | None = None) -> Job:
        """Start a job now; its steps run on their channels in order.

        ``defer_from``: steps from that index on take their channel turns only at :meth:`release`, which
        the training thread calls later in program order, so other jobs submitted in between go first on
        those channels (the job runs up to there and waits)."""
        n = len(steps) if defer_from is None else min(defer_from, len(steps))
        with self._lock:
            self._ticket(steps[:n])
        job = Job(self, x, steps, n)
        self._advance(job)
        return job

    def release(self, job: Job) -> None:
        """Give a job's deferred steps their channel turns now (training thread, program order)."""
        with self._lock:
            self._ticket(job.steps[job.ticketed:])
            job.ticketed = len(job.steps)
            parked, job.parked = job.parked, False
        if job.error is not None:
            self._skip_turns(job)
        elif parked:
            self._advance(job)

    def _skip_turns(self, job: Job) -> None:
        """A failed job's later turns, on every channel, are skipped (else the channel would wait for them);
        each turn once, whether the failure or a later release() sees it first."""
        with self._lock:
            first, job.skipped = max(job.pos + 1, job.skipped), job.ticketed
            steps = job.steps[first:job.ticketed]
        for step in steps:
            if step.kind != "local":
                self._channel(self.link_of(step.group)).put(step.ticket, None)

    def _advance(self, job: Job) -> None:
        """Run local steps inline until the next collective, then queue it on its channel (or park the job
        there if that step has no turn yet)."""
        try:
            while job.pos < len(job.steps) and job.steps[job.pos].kind == "local":
                job.x = job.steps[job.pos].fn(job.x)
                job.pos += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            job.error = exc
        if job.error is not None:
            self._skip_turns(job)
            job.done.set()
            return
        if job.pos == len(job.steps):
            job.done.set()
            return
        with self._lock:
            if job.pos >= job.ticketed:
                job.parked = True
                return
        step = job.steps[job.pos]
        self._channel(self.link_of(step.group)).put(step.ticket, job)

    def _run(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        link = self.link_of(step.group)
        t0 = time.perf_counter()
        if step.kind == "a2a":
            out = x.new_empty((sum(step.recv), *x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), output_split_sizes=step.recv, input_split_sizes=step.send,
                                   group=step.group)
            me = dist.get_rank(step.group)
            row = x[0].numel() * x.element_size() if x.dim() > 0 and x.shape[0] else \
                (out[0].numel() * out.element_size() if out.shape[0] else 0)
            nbytes = row * max(sum(step.send) - step.send[me], sum(step.recv) - step.recv[me])
        else:
            out = x
            dist.all_reduce(out, group=step.group)
            n = dist.get_world_size(step.group)
            nbytes = 2 * (n - 1) * x.numel() * x.element_size() // max(n, 1)  # ring all-reduce traffic
        if self.simulate is not None:
            spare = self.simulate[link].cost(nbytes) - (time.perf_counter() - t0)
            if spare > 0:
                time.sleep(spare)
        if self.record:
            self.spans.append(Span(link, step.kind, nbytes, t0, time.perf_counter(), step.tag))
        return out

    def run_sync(self, x: torch.Tensor, steps: list[_Step]) -> torch.Tensor:
        return self.submit(x, steps).wait()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def clear_records(self) -> None:
        self.spans.clear()
        self.waits.clear()


def link_engine_for(cfg, grid, *, profile: bool = False) -> LinkEngine | None:
    """The job's link engine, when MoE chunk pipelining, simulated links or a profile are asked for
    (``cfg`` a :class:`~moetrain.config.JobConfig`, ``grid`` its :class:`~moetrain.dist.topology.RankGrid`)."""
    moe, net = cfg.moe, cfg.network
    if not ((moe.enabled and moe.chunked) or net.simulate or profile):
        return None
    sim = None
    if net.simulate:
        sim = {name: LinkSpec(link.latency_us * 1e-6, link.bandwidth_gbps * 1e9)
               for name, link in (("intra", net.intra), ("inter", net.inter))}
        if net.isolation == "netns":  # the kernel shapes inter-node bandwidth; only its latency is simulated
            sim["inter"] = LinkSpec(net.inter.latency_us * 1e-6, float("inf"))
    return LinkEngine(node_of=[grid.node_of(r) for r in range(grid.world_size)], simulate=sim,
                      coschedule=moe.coschedule)
