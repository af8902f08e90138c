"""Stopping a run the way clusters do: SIGTERM (``timeout``, Slurm, Kubernetes, Ray) and SIGUSR1 (Slurm's
``--signal``) ask every rank to finish its step, save a checkpoint and exit; no rank outlives its launcher.

On a rank, :class:`StopRequests` records the signal; the trainer votes it in the step's one all-reduce (the
gradient norm's), so every rank stops after the same step. The launcher of simulated ranks forwards the
signal it gets to its ranks and waits for them; each rank also watches its launcher's process and exits
within about a second of it vanishing (``kill -9`` of the launcher included). SIGINT stays a plain,
immediate stop (KeyboardInterrupt).

Exit codes: 128 + the signal's number after a signal stop (143 SIGTERM, 138 SIGUSR1), 124 after a stop at
``train.time_limit``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["StopRequests", "STOP_SIGNALS", "EXIT_TIME_LIMIT", "exit_code", "watch_launcher", "forward_signals",
           "request_stop", "JobStopped", "stop_signals_blocked"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_SAME_STOP_S = 1.0
"""A second stop signal this soon after the first is the same request arriving twice, not "stop at once"."""
EXIT_TIME_LIMIT = 124


def exit_code(stopped: dict | None) -> int:
    """The process exit code for a run's ``summary["stopped"]`` (0 when it ran to train.steps)."""
    if not stopped:
        return 0
    if stopped.get("signal"):
        return 128 + int(signal.Signals[stopped["signal"]])
    return EXIT_TIME_LIMIT


class JobStopped(Exception):
    """A stop signal arrived before the ranks could train (nothing to save): exit 128 + the signal."""

    def __init__(self, signum: int, when: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}; nothing was saved")


_current: StopRequests | None = None


def request_stop(signum: int) -> None:
    """Ask the run in this process to stop after its current step (a launcher's message, e.g. to a Ray
    actor, whose method runs off the main thread where signal handlers cannot be installed)."""
    if _current is not None:
        _current.request(signum)


class StopRequests:
    """The stop signals this process received (handlers installed on the main thread while in use)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def request(self, signum: int) -> None:
        if self.signum is None or signum == signal.SIGTERM:
            self.signum = signum

    def _handle(self, signum, frame) -> None:
        self.request(signum)

    def __enter__(self) -> StopRequests:
        global _current
        _current = self
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = None
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()


def watch_launcher(pid: int, *, period_s: float = 0.5, on_lost: Callable[[], None] | None = None) -> threading.Thread:
    """A daemon thread that ends this process when process ``pid`` (its launcher) is gone: exited, or dead
    and not yet reaped by its own parent (a zombie)."""

    def watch() -> None:
        while True:
            time.sleep(period_s)
            try:
                os.kill(pid, 0)
                gone = _is_zombie(pid)
            except ProcessLookupError:
                gone = True
            except PermissionError:  # another user's process took the pid: ours is gone
                os._exit(143)
            if gone:
                if on_lost is not None:
                    on_lost()
                os._exit(143)

    thread = threading.Thread(target=watch, name="moetrain-launcher-watch", daemon=True)
    thread.start()
    return thread


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1] in ("Z", "X")
    except OSError:  # no /proc (not Linux), or the process is already gone
        return False


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread meanwhile: helper processes started here (multiprocessing's
    forkserver, a local Ray instance) inherit the mask through fork and exec, so a stop signal sent to the whole
    process group reaches the launcher (which stops the ranks at a step boundary) instead of killing them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class forward_signals:  # noqa: N801 - used as a context manager
    """In a launcher: the first SIGTERM / SIGUSR1 is handed to ``forward(signum)`` (the ranks then stop at a
    step boundary and save); a second one a second or more later, or SIGINT, stops at once (KeyboardInterrupt).
    With ``nothing_to_save`` (an evaluation) the first one stops at once: :class:`JobStopped`."""

    def __init__(self, forward: Callable[[int], None], *, nothing_to_save: str | None = None):
        self.forward = forward
        self.nothing_to_save = nothing_to_save  # e.g. "during the evaluation": the first signal stops at once
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < _SAME_STOP_S:
                return  # the same stop twice: sent to the process group and forwarded by a parent (make, a shell)
            raise KeyboardInterrupt
        self.signum = signum
        self._first_at = time.monotonic()
        if self.nothing_to_save is not None:  # no step boundary to reach, no checkpoint to write
            raise JobStopped(signum, self.nothing_to_save)
        name = signal.Signals(signum).name
        print(f"[moetrain] {name}: every rank finishes its step, saves a checkpoint when checkpoint.dir is set, "
              "and stops (send it again to stop at once)", flush=True)
        self.forward(signum)

    def __enter__(self) -> forward_signals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None and self._previous:
            # stopped: a late copy of the same signal (a parent forwarding it) must not kill the launcher while it
            # writes the summary; later signals go to the previous handlers as before
            for sig in self._previous:
                signal.signal(sig, self._late)
            return
        self._restore()

    def _late(self, signum, frame) -> None:
        if time.monotonic() - self._first_at < _SAME_STOP_S:
            return
        self._restore()
        os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
