"""The decisions taken at each step's optimizer update, by every rank together.

Before ``optimizer.step()`` each rank votes: its loss is not finite, it received SIGTERM or SIGUSR1, the
run will not fit another step (and a save) inside ``train.time_limit``. The votes ride on the gradient
norm's all-reduce, which already spans the world, so no collective is added, and every rank sees the same
sums and takes the same decision:
- a non-finite loss or gradient norm: the update is not applied; up to ``train.skip_nonfinite_steps`` such
  steps are skipped (counted in the summary), the next stops the run with an error naming the step (as the
  console counts it), the ranks, the quantity and the last good checkpoint;
- a stop request: the step finishes, the run saves and stops (launch/signals.py).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.config import JobConfig
from moetrain.launch.faults import TrainError
from moetrain.launch.signals import StopRequests

__all__ = ["StepHealth", "Verdict"]

LOSS, SIGTERM, SIGUSR1, OUT_OF_TIME = range(4)


@dataclass
class Verdict:
    finite: bool
    stop: dict | None
    """``{"reason": "signal" | "time_limit", "signal": name or None}`` when the run stops after this step."""


class StepHealth:
    def __init__(self, cfg: JobConfig, stop: StopRequests, *, rank: int, local_grad_sq: Callable[[], torch.Tensor],
                 last_checkpoint: Callable[[], str | None], last_save_s: Callable[[], float],
                 say: Callable[[str], None]):
        self.cfg, self.stop, self.rank = cfg, stop, rank
        self.local_grad_sq, self.last_checkpoint, self.last_save_s, self.say = (
            local_grad_sq, last_checkpoint, last_save_s, say)
        self.limit_s = cfg.train.time_limit_s
        self.job_start = float(os.environ.get("MOETRAIN_JOB_START", time.time()))
        self.skipped: list[int] = []
        self._loss_bad = False

    def votes(self, *, loss: torch.Tensor, step_times: list[float]) -> torch.Tensor:
        """This rank's votes for the step being finished (summed over the world with the gradient norm)."""
        v = torch.zeros(4, dtype=torch.float64)
        self._loss_bad = not bool(torch.isfinite(loss).all())
        v[LOSS] = float(self._loss_bad)
        v[SIGTERM] = float(self.stop.signum == signal.SIGTERM)
        v[SIGUSR1] = float(self.stop.signum == signal.SIGUSR1)
        if self.limit_s is not None and step_times:
            need = 2 * max(step_times[-3:]) + self.last_save_s()  # this step's remainder, one more, a save
            v[OUT_OF_TIME] = float(time.time() - self.job_start + need > self.limit_s)
        return v

    def verdict(self, votes: torch.Tensor, grad_norm: float, step: int) -> Verdict:
        """The world's decision for step ``step`` (0-based) from the summed votes."""
        finite = math.isfinite(grad_norm) and votes[LOSS] == 0
        if not finite:
            self._nonfinite(votes, grad_norm, step)
        stop = None
        if votes[SIGTERM] > 0 or votes[SIGUSR1] > 0:
            stop = {"reason": "signal", "signal": "SIGTERM" if votes[SIGTERM] > 0 else "SIGUSR1"}
        elif votes[OUT_OF_TIME] > 0:
            stop = {"reason": "time_limit", "signal": None}
        return Verdict(finite, stop)

    def _nonfinite(self, votes: torch.Tensor, grad_norm: float, step: int) -> None:
        mine = {"loss": self._loss_bad, "grad": not bool(torch.isfinite(self.local_grad_sq()))}
        every: list = [mine]
        if dist.is_initialized():  # only on this failure path: which ranks saw what
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        what = []
        for key, name in (("loss", "loss"), ("grad", f"gradient norm ({grad_norm})")):
            ranks = [r for r, e in enumerate(every) if e[key]]
            if ranks:
                what.append(f"the {name} on rank(s) {ranks}")
        if not what:
            what.append(f"the gradient norm ({grad_norm})")
        console_step = step + 1
        self.skipped.append(console_step)
        allowed = self.cfg.train.skip_nonfinite_steps
        if len(self.skipped) <= allowed:
            self.say(f"[moetrain] step {console_step}: {' and '.join(what)} not finite; skipped the update "
                     f"({len(self.skipped)} of train.skip_nonfinite_steps={allowed})")
            return
        last = (self.last_checkpoint() or "none saved yet") if self.cfg.checkpoint.dir else \
            "none (checkpoint.dir is not set)"
        raise TrainError(f"step {console_step}: {' and '.join(what)} not finite; the update was not applied "
                         f"({len(self.skipped) - 1} such step(s) skipped before, train.skip_nonfinite_steps="
                         f"{allowed}); last good checkpoint: {last}")
