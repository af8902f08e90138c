"""What an MoE layer takes from the run, given at construction: how to weigh its auxiliary loss, which
ops to run, and for the chunk-pipelined path the link engine, a degree tuner and the data-parallel
gradient window. :class:`MoESession` then advances the tuners after each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MoERuntime", "GradWindow", "MoESession"]


class GradWindow:
    """Hands ready data-parallel gradient buckets to the reducer inside an MoE layer's backward window:
    as many bytes as the layer's modeled inter-link idle time carries (everything ready until the model
    exists). The reducer needs the model's parameters, so it is attached after the model is built."""

    def __init__(self):
        self.reducer = None

    def attach(self, reducer) -> None:
        self.reducer = reducer

    def __call__(self, report: dict[str, Any] | None) -> None:
        assert self.reducer is not None, "GradWindow used before a reducer was attached"
        budget = None
        if report:
            beta = report["links"]["inter"]["beta"]
            budget = report["bwd_inter_idle_s"] / beta if beta > 0 else None
        self.reducer.release(budget)


@dataclass
class MoERuntime:
    """Run-level collaborators of every MoE layer of a model."""

    aux_scale: float = 1.0
    """Weight of the auxiliary losses in backward: 1 / micro-batches per step, like the main loss."""
    fused: bool = False
    """The csrc routing / packing / combine kernels (``moe.kernels`` resolved for the device)."""
    engine: Any = None
    """A :class:`~moetrain.dist.links.LinkEngine`: dispatch -> experts -> combine chunk-pipelined on it."""
    degrees: tuple[int | str, int | str] = (1, 1)
    """(forward, backward) chunk degrees of the pipelined path, integers or ``auto``."""
    profile_steps: int = 3
    inter_first: bool = False
    """hier2d's inter-node phase first on the pipelined path (``auto`` degrees choose it themselves)."""
    window: Callable[[dict[str, Any] | None], None] | None = None
    """Reduce ready DP buckets in the layer's backward window (:class:`GradWindow`); None: at the end."""

    def tuner(self):
        """A fresh degree tuner for one layer (None off the pipelined path)."""
        if self.engine is None:
            return None
        from moetrain.moe.tuning import DegreeTuner

        return DegreeTuner(*self.degrees, profile_steps=self.profile_steps, inter_first=self.inter_first)


class MoESession:
    """The MoE layers of this rank over a run: degree profiling, then the chosen degrees."""

    def __init__(self, layers: list, engine, *, keep_records: bool, say: Callable[[str], None]):
        self.layers, self.engine, self.keep_records, self.say = layers, engine, keep_records, say
        if engine is not None:
            engine.record = self.profiling or keep_records

    @property
    def profiling(self) -> bool:
        return any(layer.tuner is not None and layer.tuner.profiling for layer in self.layers)

    def after_step(self) -> None:
        """Advance the degree tuners; when the profiling steps are done, fit the model and choose
        (collective over the world). Records are dropped once nothing needs them."""
        if self.engine is None:
            return
        from moetrain.moe.tuning import fit_and_choose

        for layer in self.layers:
            layer.tuner.end_step()
        profiling = [layer for layer in self.layers if layer.tuner.profiling]
        if profiling and all(layer.tuner.ready for layer in profiling):
            reports = fit_and_choose(self.layers, self.engine)
            chosen = {k: v["degrees"] for k, v in reports.items()}
            self.say(f"[moetrain] MoE chunk pipelining: (forward, backward) degrees by layer {chosen}")
        # a layer whose input shape changed profiles again (DegreeTuner.degrees)
        profiling = self.profiling
        self.engine.record = profiling or self.keep_records
        if not self.keep_records and not profiling:
            self.engine.clear_records()
            for layer in self.layers:
                layer.section_times.compute.clear()
                layer.section_times.sections.clear()

    def degrees(self) -> dict[int, list[int | str]]:
        return {layer.layer: list(layer.tuner.chosen or (layer.tuner.fwd, layer.tuner.bwd))
                for layer in self.layers if layer.tuner is not None}
