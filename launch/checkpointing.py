"""The run's checkpoints: the trainer state saved layout-free, and resumed at any layout.

What a checkpoint holds besides the tensors (launch/resharding.py): the resolved config, the model's
shape keys (a checkpoint of another model is refused, naming every difference), the layout it was
saved at, the step, the loss and gradient-norm history and the samples consumed; and each rank's RNG
state, restored only when the layout is unchanged (dropout, routing noise and WTA-CRS draws come from
layout-free streams, so nothing else depends on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moetrain.config import JobConfig
from moetrain.dist.checkpoint import Checkpointer, CheckpointError, CheckpointReader
from moetrain.launch.resharding import load_weights, logical_state, restore_logical
from moetrain.models.spec import ModelSpec

__all__ = ["RunState", "RunCheckpoints"]


@dataclass
class RunState:
    """Where a run stands: its next step and its history."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lr_horizon: int = 0
    """The LR schedule's length: the first run's train.steps, kept when a resumed run asks for more steps
    (so the cosine never climbs back up; past it the LR stays at train.min_lr)."""


class RunCheckpoints:
    """Saves and resumes one rank's part of the run (collective: every rank calls the same methods)."""

    def __init__(self, cfg: JobConfig, spec: ModelSpec, chunks: list[torch.nn.Module], optimizer, *,
                 device: torch.device, rank: int, say: Callable[[str], None]):
        self.cfg, self.spec, self.chunks, self.optimizer = cfg, spec, chunks, optimizer
        self.device, self.rank = device, rank
        self.checkpointer = (Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, log=say)
                             if cfg.checkpoint.dir else None)
        self.say = say
        self.save_s = 0.0  # how long the last save took (the time limit keeps room for one)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return self.checkpointer is not None and bool(every) and step % every == 0

    def layout(self) -> dict[str, int]:
        r = self.cfg.resolved()
        layout = {k: r["parallel"][k] for k in ("tp", "pp", "dp", "ep", "etp", "vpp")}
        layout["zero_stage"] = self.cfg.train.optimizer.zero_stage
        return layout

    def meta(self, state: RunState) -> dict[str, Any]:
        return {"config": self.cfg.resolved(), "shape": self.spec.shape_keys(), "layout": self.layout(),
                "losses": state.losses, "grad_norms": state.grad_norms, "lr_schedule_steps": state.lr_horizon,
                "samples_consumed": state.step * self.cfg.global_batch_size}

    def state_dict(self) -> dict[str, Any]:
        """This rank's checkpoint file (collective): the logical tensors it writes, its RNG states."""
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        return logical_state(self.chunks, self.optimizer, {"rng": rng})

    def save(self, state: RunState) -> None:
        t0 = time.perf_counter()
        self.checkpointer.save(state.step, self.state_dict(), self.meta(state))
        self.save_s = time.perf_counter() - t0

    def latest(self) -> str | None:
        """The newest complete checkpoint in checkpoint.dir (None without one)."""
        found = self.checkpointer.candidates() if self.checkpointer is not None else []
        return str(found[0]) if found else None

    def resume(self) -> tuple[RunState, str] | None:
        """The state of the newest usable checkpoint (``checkpoint.resume``), loaded into the model and the
        optimizer at this layout; None when starting fresh."""
        if self.checkpointer is None:
            return None
        found = self.checkpointer.find(self.cfg.checkpoint.resume)
        if found is None:
            return None
        path, manifest = found
        diffs = self.spec.shape_differences(manifest.get("shape", {}))
        if diffs:
            raise CheckpointError(f"checkpoint {path} was saved for a different model ({'; '.join(diffs)})")
        reader = CheckpointReader(path, manifest)
        restore_logical(self.chunks, self.optimizer, reader)
        horizon = manifest.get("lr_schedule_steps") or manifest.get("config", {}).get("train", {}).get("steps")
        state = RunState(int(manifest["step"]), list(manifest.get("losses", [])),
                         list(manifest.get("grad_norms", [])), int(horizon or self.cfg.train.steps))
        same_layout = manifest.get("layout") == self.layout()
        own = reader.rank_state(self.rank) if same_layout else None
        if own is not None:  # the same ranks: continue their RNG streams exactly
            torch.set_rng_state(own["rng"]["cpu"])
            if own["rng"].get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["rng"]["cuda"], self.device)
        moved = "" if same_layout else f" (saved at {manifest.get('layout')}, resharded)"
        self.say(f"[moetrain] resumed from {path} at step {state.step}{moved}")
        return state, str(path)

    def init_weights(self) -> str | None:
        """``checkpoint.init_from``: this rank's weights from an HF directory or a moetrain checkpoint (the
        optimizer stays fresh, the run starts at step 0); returns the source, or None without one."""
        path = self.cfg.checkpoint.init_from
        if not path:
            return None
        from pathlib import Path

        from moetrain.models.hf_config import read_hf_config, sections_from_hf

        resolved = self.cfg.resolved()
        if (Path(path) / "config.json").is_file():
            from moetrain.models.hf_weights import HFSource

            hf = sections_from_hf(read_hf_config(path), where=f"checkpoint.init_from {path}")

            def same(mine, theirs) -> bool:  # a nested section (rope_scaling) holds defaults beside HF's keys
                if isinstance(theirs, dict) and isinstance(mine, dict):
                    return all(same(mine.get(k), v) for k, v in theirs.items())
                return mine == theirs

            diffs = [f"{sec}.{k}: {v!r} there, {resolved[sec][k]!r} in this config"
                     for sec, values in hf.items() for k, v in values.items() if not same(resolved[sec].get(k), v)]
            if diffs:
                raise CheckpointError(f"checkpoint.init_from {path} holds a different model ({'; '.join(diffs)}); "
                                      f"set model.hf_config={path} to take its architecture")
            source = HFSource(path, resolved)
            source.check_unused()
            get = source.tensor
        else:
            from moetrain.launch.ckpt_tools import open_checkpoint

            reader = open_checkpoint(path)

            def get(key: str):
                return reader.tensor(f"model/{key}")
        n = load_weights(self.chunks, self.optimizer, get, f"checkpoint.init_from {path}")
        self.say(f"[moetrain] initialised {n} weight tensors from {path} (fresh optimizer, step 0)")
        return path

    def load_weights_only(self) -> str | None:
        """The weights alone (no optimizer state, no step) of the newest usable checkpoint in checkpoint.dir
        (``checkpoint.resume``), else of ``checkpoint.init_from``; the source, or None without either."""
        if self.checkpointer is not None and self.cfg.checkpoint.resume != "never":
            found = self.checkpointer.find(self.cfg.checkpoint.resume)
            if found is not None:
                path, manifest = found
                diffs = self.spec.shape_differences(manifest.get("shape", {}))
                if diffs:
                    raise CheckpointError(f"checkpoint {path} was saved for a different model ({'; '.join(diffs)})")
                reader = CheckpointReader(path, manifest)
                load_weights(self.chunks, self.optimizer, lambda k: reader.tensor(f"model/{k}"), str(path))
                return str(path)
        return self.init_weights()
