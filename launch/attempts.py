"""Attempts of one job: which start this process belongs to, and restarting failed attempts.

A local or Ray job that fails (a rank raises, dies or hangs past its collective timeout) is started
again up to ``fault.max_restarts`` times and resumes from the newest complete checkpoint. Under
torchrun / Slurm the launcher restarts the job and :func:`attempt_number` reads its count.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from moetrain.config import JobConfig
from moetrain.errors import UserError
from moetrain.launch.local import RankFailure

__all__ = ["attempt_number", "with_restarts"]


def attempt_number() -> int:
    """Which start of the job this process belongs to: 0 first, k after k restarts (ours or torchrun's)."""
    return int(os.environ.get("MOETRAIN_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError) or (isinstance(exc, RankFailure) and bool(exc.user_errors()))


def with_restarts(cfg: JobConfig, start: Callable[[int], dict[str, Any]], retry_on: tuple) -> dict[str, Any]:
    """Run ``start(attempt)``; when ranks fail (not a user mistake), start again, up to
    ``fault.max_restarts`` times, resuming from the newest complete checkpoint. ``restarts`` in the
    summary counts them."""
    attempt = 0
    failures: list[float] = []
    while True:
        t0 = time.perf_counter()
        try:
            summary = start(attempt)
            summary["restarts"] = attempt
            summary["failures_wall"] = failures  # when each failed attempt was given up (time.time())
            return summary
        except retry_on as exc:
            if _is_user_error(exc) or attempt >= cfg.fault.max_restarts:
                raise
            failures.append(time.time())
            attempt += 1
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            print(f"[moetrain] attempt {attempt} failed after {time.perf_counter() - t0:.1f}s ({first}); "
                  f"restart {attempt}/{cfg.fault.max_restarts} from the newest checkpoint in {cfg.checkpoint.dir}",
                  file=sys.stderr, flush=True)
