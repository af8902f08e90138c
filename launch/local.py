"""Simulated ranks on one machine: a pool of gloo processes bound to 127.0.0.1.

Used by ``cluster.launcher=local`` and by the multi-rank tests. One pool is started once and then runs
many functions ("cases"): process start-up dominates on small machines, so it is paid once.

Failure handling is the point of this module:
- an exception on any rank fails the call with that rank's traceback;
- ranks still running a moment later (usually blocked in a collective with the failed rank) have
  their Python stacks dumped through ``faulthandler`` and are reported too;
- a call that exceeds its timeout reports every unfinished rank's stack;
- a rank process that dies is reported with its exit code.
After any failure the pool is torn down and restarted on the next call, so one bad case cannot
poison the next.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from moetrain.launch.signals import STOP_SIGNALS, JobStopped, stop_signals_blocked, watch_launcher

__all__ = ["LocalRanks", "RankFailure", "RankReport", "run_ranks"]

_GRACE_AFTER_ERROR_S = 3.0
_NETNS_STORE_PORT = 29500


@dataclass
class RankReport:
    rank: int
    state: str  # ok | error | hung | died
    detail: str = ""
    exc_type: str = ""  # module.qualname of the exception, for state == "error"
    message: str = ""
    user_error: bool = False  # the exception is a moetrain.errors.UserError (a mistake the user can fix)


class RankFailure(RuntimeError):
    """A multi-rank call failed; ``reports`` holds what each rank was doing."""

    def __init__(self, summary: str, reports: list[RankReport]):
        self.summary = summary
        self.reports = reports
        parts = [summary]
        for rep in reports:
            if rep.state == "ok":
                continue
            parts.append(f"--- rank {rep.rank}: {rep.state} ---\n{rep.detail.rstrip()}")
        super().__init__("\n".join(parts))

    @property
    def failed_ranks(self) -> list[int]:
        return [r.rank for r in self.reports if r.state in ("error", "died")]

    def user_errors(self) -> list[RankReport]:
        """The error reports, if every failed rank raised a user mistake (:class:`~moetrain.errors.UserError`)."""
        failed = [r for r in self.reports if r.state in ("error", "died")]
        return failed if failed and all(r.user_error for r in failed) else []

    def errors_of_type(self, qualified_names: set[str]) -> list[RankReport]:
        """The error reports, if every failed rank raised one of ``qualified_names``; else []."""
        failed = [r for r in self.reports if r.state in ("error", "died")]
        if failed and all(r.exc_type in qualified_names for r in failed):
            return failed
        return []


def _describe_exc(exc: BaseException) -> tuple[str, str, str, bool]:
    """(traceback, module.qualname, message, is a user mistake) of ``exc``, picklable for the parent."""
    from moetrain.errors import UserError

    kind = type(exc)
    return traceback.format_exc(), f"{kind.__module__}.{kind.__qualname__}", str(exc), isinstance(exc, UserError)


def _start_forkserver() -> None:
    """Start multiprocessing's forkserver (once per process) with the stop signals blocked.

    It runs in the launcher's process group, so a SIGTERM sent to the group (``kill -TERM -PGID``, systemd,
    Slurm's scancel) would kill it, and the launcher would then read every rank as dead (exit code 255) and
    stop without a checkpoint. The signal mask survives its exec and is inherited by the ranks it forks,
    which unblock the signals first thing (:func:`_rank_main`)."""
    from multiprocessing import forkserver, resource_tracker

    # the forkserver starts the resource tracker first, which unblocks SIGTERM once it runs (it ignores the
    # stop signals itself): start it before blocking them
    resource_tracker.ensure_running()
    with stop_signals_blocked():
        forkserver.ensure_running()


def _rank_main(rank: int, world: int, ranks_per_node: int, port: int, workdir: str, env: dict,
               threads: int, pg_timeout_s: float, device: str, launcher_pid: int, hosts, tasks, results) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked in the forkserver (_start_forkserver)
    node = rank // ranks_per_node
    master, ifname = "127.0.0.1", env.get("GLOO_SOCKET_IFNAME", "lo")
    if hosts is not None:  # this node is a namespaced host: its ranks live there, rank 0's host holds the store
        from moetrain.dist.netns import IFNAME, enter_netns

        names, addrs = hosts
        try:
            enter_netns(names[node])
        except BaseException as exc:
            results.put((0, rank, "error", _describe_exc(exc)))
            return
        master, ifname = addrs[0], IFNAME
    os.environ.update(env)
    os.environ.update({
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank % ranks_per_node),
        "LOCAL_WORLD_SIZE": str(ranks_per_node),
        "NODE_RANK": str(node),
        "NUM_NODES": str(world // ranks_per_node),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": ifname,
        "MOETRAIN_SIMULATED": "1",
        "OMP_NUM_THREADS": str(threads),
    })
    stack_file = open(os.path.join(workdir, f"rank{rank}.stack"), "w+")  # noqa: SIM115 (lives as long as the rank)
    # SIGUSR2 dumps the stacks for failure reports (SIGTERM / SIGUSR1 are the stop signals, launch/signals.py)
    faulthandler.register(signal.SIGUSR2, file=stack_file, all_threads=True)
    # no rank outlives its launcher, even one killed with SIGKILL; the ranks then remove the pool's files
    watch_launcher(launcher_pid, on_lost=lambda: shutil.rmtree(workdir, ignore_errors=True))
    import torch
    import torch.distributed as dist

    from moetrain.dist.env import from_env, init_distributed

    torch.set_num_threads(threads)
    try:
        # the launcher holds the store on loopback; a namespaced job's rank 0 holds it on its host
        store = dist.TCPStore(master, port, world, is_master=hosts is not None and rank == 0,
                              wait_for_workers=False, timeout=timedelta(seconds=pg_timeout_s))
        init_distributed(from_env(launcher="local"), device, timeout_s=pg_timeout_s, store=store)
    except BaseException as exc:
        results.put((0, rank, "error", _describe_exc(exc)))
        return
    results.put((0, rank, "ready", b""))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, payload = task
        stack_file.seek(0)
        stack_file.truncate()
        try:
            fn, args, kwargs = pickle.loads(payload)
            out = pickle.dumps(fn(*args, **kwargs))
            results.put((task_id, rank, "ok", out))
        except BaseException as exc:  # report everything, SystemExit included
            if isinstance(exc, SystemExit) and exc.code not in (None, 0):
                # An injected or real exit: leave like a crashed process would.
                sys.stderr.flush()
                os._exit(int(exc.code) if isinstance(exc.code, int) else 1)
            results.put((task_id, rank, "error", _describe_exc(exc)))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


class LocalRanks:
    """A pool of ``world_size`` gloo ranks on 127.0.0.1, simulated as ``world_size/ranks_per_node`` nodes.

    With ``hosts`` (a created :class:`~moetrain.dist.netns.NetHosts` of one host per node) each node's ranks
    run in that host's network namespace instead, and the rendezvous is on host 0 (``network.isolation``).

    ``run(fn, *args)`` calls ``fn`` on every rank (it must be importable by name) and returns the list
    of per-rank results, or raises :class:`RankFailure` naming the ranks that failed or hung.
    """

    def __init__(self, world_size: int, *, ranks_per_node: Optional[int] = None, timeout: float = 120.0,
                 threads: int = 1, env: Optional[dict] = None, collective_timeout_s: float = 300.0,
                 start_timeout: float = 180.0, device: str = "cpu", hosts=None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        rpn = ranks_per_node or world_size
        if world_size % rpn:
            raise ValueError(f"ranks_per_node={rpn} does not divide world_size={world_size}")
        self.world_size = world_size
        self.ranks_per_node = rpn
        self.timeout = timeout
        self.threads = threads
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.collective_timeout_s = collective_timeout_s
        self.start_timeout = start_timeout
        self.device = device  # the collective backend follows it (gloo on CPU, NCCL on CUDA)
        if hosts is not None and hosts.count != world_size // rpn:
            raise ValueError(f"{hosts.count} namespaced hosts for {world_size // rpn} nodes")
        self.hosts = hosts
        self._procs: list = []
        self._tasks: list = []
        self._results = None
        self._store = None
        self._workdir: Optional[str] = None
        self._task_id = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def started(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        if self.started:
            return
        import torch.distributed as dist

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        hosts = None
        if self.hosts is not None:
            # c10d warns once per connection that a peer's address has no host name (the hosts have no DNS);
            # the level is read when torch loads, in the forkserver started below with this environment
            os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
            hosts, port = (self.hosts.names, self.hosts.addrs), _NETNS_STORE_PORT  # a fresh namespace: port free
        else:
            self._store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True,
                                        wait_for_workers=False, timeout=timedelta(seconds=self.start_timeout))
            port = self._store.port
        _start_forkserver()
        self._workdir = tempfile.mkdtemp(prefix="moetrain-ranks-")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(rank, self.world_size, self.ranks_per_node, port, self._workdir, self.env,
                      self.threads, self.collective_timeout_s, self.device, os.getpid(), hosts, self._tasks[rank],
                      self._results),
                name=f"moetrain-rank{rank}",
                daemon=True,
            )
            p.start()
            self._procs.append(p)
        self._collect(0, self.start_timeout, "start-up (init_process_group)")

    def close(self) -> None:
        if not self._procs:
            return
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                with contextlib.suppress(Exception):
                    q.put(None)
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        self._kill()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        for q in [*self._tasks, self._results]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._procs, self._tasks, self._results, self._store = [], [], None, None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def signal_ranks(self, signum: int) -> None:
        """Send ``signum`` to every live rank process (a launcher forwarding SIGTERM / SIGUSR1)."""
        for p in self._procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    def __enter__(self) -> LocalRanks:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and (not issubclass(exc_type, Exception) or issubclass(exc_type, JobStopped)):
            self._kill()  # Ctrl-C / SIGTERM in this process: the ranks' work is abandoned, do not wait on it
        else:
            self.close()

    # ------------------------------------------------------------------ running
    def run(self, fn: Callable, *args: Any, timeout: Optional[float] = -1.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; returns results in rank order.

        ``timeout`` defaults to the pool's; ``None`` waits without limit (collective timeouts and dead
        processes still end the call).
        """
        timeout = self.timeout if timeout == -1.0 else timeout
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"cannot send {getattr(fn, '__qualname__', fn)!r} to the ranks: {exc}") from None
        self.start()
        self._task_id += 1
        for q in self._tasks:
            q.put((self._task_id, payload))
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(self._task_id, timeout, name)

    def _collect(self, task_id: int, timeout: Optional[float], what: str) -> list[Any]:
        want = "ready" if task_id == 0 else "ok"
        done: dict[int, Any] = {}
        errors: dict[int, str] = {}
        start = time.monotonic()
        first_error_at: Optional[float] = None
        while len(done) + len(errors) < self.world_size:
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                self._fail(f"{what}: timed out after {timeout:.0f}s", done, errors)
            if first_error_at is not None and now - first_error_at > _GRACE_AFTER_ERROR_S:
                self._fail(f"{what}: failed on rank(s) {sorted(errors)}", done, errors)
            try:
                tid, rank, state, data = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(self._procs)
                        if not p.is_alive() and r not in done and r not in errors}
                if dead:
                    for r, code in dead.items():
                        errors[r] = (f"process exited with code {code}", "", "", False)
                    self._fail(f"{what}: rank(s) {sorted(dead)} died", done, errors, died=set(dead))
                continue
            if tid != task_id:
                continue
            if state == want:
                done[rank] = pickle.loads(data) if task_id else None
            else:
                errors[rank] = data
                first_error_at = first_error_at or time.monotonic()
        if errors:
            self._fail(f"{what}: failed on rank(s) {sorted(errors)}", done, errors)
        return [done[r] for r in range(self.world_size)]

    def _fail(self, summary: str, done: dict, errors: dict, died: frozenset = frozenset()) -> None:
        pending = [r for r in range(self.world_size) if r not in done and r not in errors]
        for r in pending:
            if self._procs[r].is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._procs[r].pid, signal.SIGUSR2)
        time.sleep(0.5 if pending else 0)
        reports = []
        for r in range(self.world_size):
            if r in done:
                reports.append(RankReport(r, "ok"))
            elif r in errors:
                tb, kind, message, user = errors[r]
                reports.append(RankReport(r, "died" if r in died else "error", tb, kind, message, user))
            else:
                stack = ""
                if self._workdir:
                    try:
                        with open(os.path.join(self._workdir, f"rank{r}.stack")) as f:
                            stack = f.read()
                    except OSError:
                        pass
                alive = self._procs[r].is_alive()
                reports.append(RankReport(r, "hung" if alive else "died",
                                          ("still running; stack:\n" + stack) if alive else
                                          f"process exited with code {self._procs[r].exitcode}"))
        self._kill()
        raise RankFailure(summary, reports)


def run_ranks(fn: Callable, world_size: int, *args: Any, ranks_per_node: Optional[int] = None,
              timeout: Optional[float] = 120.0, **kwargs: Any) -> list[Any]:
    """Start a pool, run one function on every rank, stop the pool."""
    with LocalRanks(world_size, ranks_per_node=ranks_per_node, timeout=timeout) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
