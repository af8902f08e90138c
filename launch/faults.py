"""Failures inside a training step: user mistakes, lost peers, and faults injected to prove recovery.

A collective that fails because a peer died or hung is re-raised as :class:`CollectiveFailure` naming
this rank, the step and the phase it was in, so the launcher's report says where the job stopped. It is
recognised by type: torch's :class:`torch.distributed.DistError` family (NCCL, the store, the network),
and gloo's transport errors, which torch raises as plain ``RuntimeError`` s from its gloo sources (their
messages carry the gloo source path, the only mark torch gives them).
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from moetrain.config import FaultInjectConfig
from moetrain.errors import UserError, first_line

__all__ = ["TrainError", "CollectiveFailure", "InjectedFault", "is_comm_failure", "collective_failure",
           "inject_fault"]


class TrainError(UserError, RuntimeError):
    """The job cannot train as configured (reported to the user without a traceback)."""


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out (a peer died or hung); names this rank, the step and the phase."""


class InjectedFault(RuntimeError):
    """Raised by ``fault.inject.kind=exception`` (a testing aid)."""


_GLOO_SOURCES = ("/gloo/", "ProcessGroupGloo")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a dead or hung peer), not a bug or a user mistake; a
    collective that failed on a link-engine channel arrives as the cause of the waiting thread's error."""
    if isinstance(exc, (UserError, InjectedFault, CollectiveFailure)):
        return False
    seen = exc
    while seen is not None:
        if isinstance(seen, dist.DistError):
            return True
        if type(seen) is RuntimeError and any(src in str(seen) for src in _GLOO_SOURCES):
            return True
        seen = seen.__cause__
    return False


def collective_failure(exc: BaseException, *, rank: int, step: int, phase: str, timeout_s: float) -> CollectiveFailure:
    first = first_line(exc)
    return CollectiveFailure(
        f"rank {rank}: a collective in phase '{phase}' of step {step} failed after at most "
        f"cluster.collective_timeout_s={timeout_s:g}s ({first[:300]}); a peer rank died or hung")


def inject_fault(inj: FaultInjectConfig, *, rank: int, step: int, attempt: int) -> None:
    """``fault.inject``: fail this rank at this step, on the job's first attempt only."""
    if inj.kind is None or inj.step != step or inj.rank != rank or attempt > 0:
        return
    print(f"[moetrain] rank {rank}: injected fault '{inj.kind}' at step {step}", file=sys.stderr, flush=True)
    if inj.kind == "exit":
        os._exit(17)
    if inj.kind == "exception":
        raise InjectedFault(f"injected exception on rank {rank} at step {step}")
    while True:  # hang
        time.sleep(1)
