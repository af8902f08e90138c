"""Pipeline parallelism: layer partitioning and the runtime that executes a schedule on one rank.

The model is cut into ``pp * vpp`` contiguous virtual stages; rank ``r`` of the pipeline group holds
virtual stages ``c * pp + r`` for ``c < vpp`` as separate model chunks. :class:`PipelineRunner` walks
this rank's action list from :mod:`parallel.schedules`: ``F`` receives the chunk input from the
previous virtual stage (or starts from tokens), runs the chunk, and sends the output on; ``B``
receives the output gradient (or starts from the loss), backpropagates, and sends the input gradient
back; ``W`` runs the weight gradients that ``B`` deferred (zero-bubble schedules only).

Transfers are point-to-point ``isend``/``irecv`` over the pipeline process group, tagged by
(micro-batch, boundary, direction). Sends never block the schedule (their handles are waited at the
end of the step), so a rank only ever waits for data it needs, and any schedule that
:func:`parallel.schedules.simulate` runs without deadlock runs here without deadlock. Everything
inside a stage (TP and EP collectives, MoE auxiliary losses, which reach their router through the
stage's own backward, WTA-CRS) is untouched by pipelining.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from moetrain.parallel.schedules import Action, build_schedule
from moetrain.parallel.weight_grad import DeferredGrads, defer_weight_grads, run_deferred

__all__ = ["partition_layers", "stage_layers", "chunk_layers", "ModelChunks", "PipelineRunner"]


def partition_layers(costs: Sequence[float], parts: int, last_extra: float = 0.0) -> list[int]:
    """Layers per part: contiguous, at least one each, minimising the largest part's total cost
    (``last_extra``, e.g. the LM head, is added to the last part)."""
    return list(_partition(tuple(float(c) for c in costs), parts, float(last_extra)))


@functools.lru_cache(maxsize=4096)
def _partition(costs: tuple[float, ...], parts: int, last_extra: float) -> tuple[int, ...]:
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} pipeline chunks of at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: the smallest max-cost of splitting the first i layers into k parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            extra = last_extra if k == parts else 0.0
            for j in range(k - 1, i):
                cand = max(best[k - 1][j], prefix[i] - prefix[j] + extra)
                if cand < best[k][i] - 1e-9:
                    best[k][i], cut[k][i] = cand, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return tuple(sizes[::-1])


def stage_layers(pp: int, vpp: int, layer_costs: Sequence[float], head_cost: float,
                 configured: Sequence[int] | None = None) -> list[int]:
    """Layers of each of the ``pp * vpp`` virtual stages: ``configured`` (``parallel.pipeline_layers``), or
    balanced by cost (a block's parameter count; the LM head's added to the last stage)."""
    if configured is not None:
        return list(configured)
    return partition_layers(layer_costs, pp * vpp, last_extra=head_cost)


def chunk_layers(stages: Sequence[int], pp: int, vpp: int, stage: int) -> list[range]:
    """The global layer ids of each chunk pipeline rank ``stage`` holds (virtual stages ``c * pp + stage``)."""
    starts = [sum(stages[:i]) for i in range(len(stages))]
    return [range(starts[c * pp + stage], starts[c * pp + stage] + stages[c * pp + stage]) for c in range(vpp)]


class ModelChunks(torch.nn.Module):
    """This rank's pipeline model chunks (one per virtual stage it holds), as one module."""

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            out.update(chunk.full_tensors(grads))
        return out


class PipelineRunner:
    """Executes one pipeline rank's schedule for one optimizer step (see the module docstring)."""

    def __init__(self, *, group, ranks: Sequence[int], stage: int, vpp: int, schedule: str,
                 act_shape: Sequence[int], act_dtype: torch.dtype, device: torch.device):
        self.group, self.ranks, self.stage = group, tuple(ranks), stage
        self.p, self.v, self.schedule = len(ranks), vpp, schedule
        self.split = schedule == "zero_bubble"
        self.act_shape, self.act_dtype, self.device = tuple(act_shape), act_dtype, device
        self._lists: dict[int, list[Action]] = {}

    def actions(self, m: int) -> list[Action]:
        if m not in self._lists:
            self._lists[m] = build_schedule(self.schedule, self.p, m, self.v)[self.stage]
        return self._lists[m]

    def _tag(self, mb: int, boundary: int, backward: bool) -> int:
        return 2 * (mb * self.p * self.v + boundary) + int(backward)

    def _recv(self, vs_from: int, tag: int) -> torch.Tensor:
        buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.device)
        dist.irecv(buf, src=self.ranks[vs_from % self.p], group=self.group, tag=tag).wait()
        return buf

    def _send(self, t: torch.Tensor, vs_to: int, tag: int) -> None:
        t = t.detach().to(self.act_dtype).contiguous()
        if tuple(t.shape) != self.act_shape:
            raise RuntimeError(f"pipeline stage output has shape {tuple(t.shape)}, expected {self.act_shape}")
        self._sends.append((dist.isend(t, dst=self.ranks[vs_to % self.p], group=self.group, tag=tag), t))

    def run(self, m: int, forward: Callable[[int, int, torch.Tensor | None], torch.Tensor],
            before: Callable[[Action], None] | None = None) -> None:
        """Run ``m`` micro-batches. ``forward(chunk, mb, inputs)`` runs model chunk ``chunk`` on
        micro-batch ``mb`` (``inputs`` None on the first virtual stage) and returns its output, or the
        loss to backpropagate on the last virtual stage. ``before(action)`` runs ahead of every F and B
        (e.g. to point per-micro-batch random streams at ``action.mb``; B may recompute)."""
        last = self.p * self.v - 1
        inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        deferred: dict[tuple[int, int], DeferredGrads] = {}
        self._sends: list = []
        for a in self.actions(m):
            key = (a.mb, a.chunk)
            vs = a.chunk * self.p + self.stage
            if a.kind == "W":
                run_deferred(deferred.pop(key))
                continue
            if before is not None:
                before(a)
            if a.kind == "F":
                inp = None
                if vs > 0:
                    inp = self._recv(vs - 1, self._tag(a.mb, vs - 1, False)).requires_grad_()
                out = forward(a.chunk, a.mb, inp)
                if vs < last:
                    self._send(out, vs + 1, self._tag(a.mb, vs, False))
                inputs[key], outputs[key] = inp, out
                continue
            out, inp = outputs.pop(key), inputs.pop(key)
            grad = None if vs == last else self._recv(vs + 1, self._tag(a.mb, vs, True))
            if self.split:
                with defer_weight_grads(deferred.setdefault(key, [])):
                    torch.autograd.backward(out, grad)
            else:
                torch.autograd.backward(out, grad)
            if vs > 0:
                assert inp is not None and inp.grad is not None, "stage input received no gradient"
                self._send(inp.grad, vs - 1, self._tag(a.mb, vs - 1, True))
        assert not outputs and not deferred, "schedule left work undone"
        for work, _ in self._sends:  # (on an error the job is failing: never wait on a dead peer)
            work.wait()
        self._sends = []
