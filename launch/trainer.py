"""The per-rank training run: build (model spec) -> parallelize -> optimizer -> data -> loop -> log / checkpoint.

One optimizer step:
    for each micro-batch (all but the last under ``reducer.no_sync()``), or the pipeline schedule:
        forward (TP / EP collectives inside the layers) -> loss / accum -> backward
        (on the last micro-batch, DP buckets all-reduce while backward runs)
    reducer.finish()                      wait for DP buckets, average
    finalize_tp_partial_grads             TP-sum of SP norm-weight and router grads; tied-embedding sync
    clip_grad_norm                        one global norm across all groups
    optimizer step (AdamW or ZeRO), LR schedule; WTA-CRS norm caches; aux-loss-free router bias
    log (console, TensorBoard), checkpoint every ``checkpoint.every`` steps
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moetrain.config import JobConfig
from moetrain.dist.env import rank_device
from moetrain.dist.groups import ParallelGroups
from moetrain.dist.links import link_engine_for
from moetrain.launch.attempts import attempt_number
from moetrain.launch.checkpointing import RunCheckpoints, RunState
from moetrain.launch.data import DataError, TokenBatches
from moetrain.launch.faults import CollectiveFailure, TrainError, collective_failure, inject_fault, is_comm_failure
from moetrain.launch.health import StepHealth
from moetrain.launch.metrics import SavedBytes, peak_flops_per_rank
from moetrain.launch.reporting import Reporter, moe_metrics, stage_moe_metrics
from moetrain.launch.signals import StopRequests
from moetrain.models.spec import BuildContext, get_model_spec
from moetrain.moe import kernels
from moetrain.moe.layer import MoELayer
from moetrain.moe.runtime import GradWindow, MoERuntime, MoESession
from moetrain.parallel.data_parallel import (
    build_reducer,
    clip_grad_norm,
    finalize_tp_partial_grads,
    grad_norm_sq_local,
    grad_replicas,
)
from moetrain.parallel.optimizer import build_optimizer, lr_at
from moetrain.parallel.pipeline import ModelChunks, PipelineRunner, chunk_layers
from moetrain.parallel.wtacrs import norm_caches

__all__ = ["Trainer", "train", "TrainError", "CollectiveFailure"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class Trainer:
    def __init__(self, cfg: JobConfig, groups: ParallelGroups, profile_dir: str | None = None,
                 stop: StopRequests | None = None):
        self.cfg, self.groups, self.profile_dir = cfg, groups, profile_dir
        self.rank = groups.global_rank
        self.step_spans: list[tuple[int, float, float, bool]] = []
        if cfg.logging.collective_check:
            from moetrain.dist import collective_check

            collective_check.enable(timeout_s=min(cfg.cluster.collective_timeout_s, 120.0))
        self.device = rank_device(cfg.cluster.device)
        dtype = _DTYPES[cfg.train.dtype]
        self.param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.autocast = dtype == torch.bfloat16
        torch.manual_seed(cfg.train.seed)
        p, accum = cfg.parallel, cfg.grad_accum_steps

        # build: the model spec makes this rank's chunks; the MoE layers get their run collaborators
        self.spec = get_model_spec(cfg)
        self.facts = self.spec.facts()
        self.flops_per_token = self.facts.flops_per_token
        self.stage_layers = self.spec.stage_layers()
        mine = [i for ids in chunk_layers(self.stage_layers, p.pp, p.vpp, groups.rank("pp")) for i in ids]
        self.engine = link_engine_for(cfg, groups.grid, profile=profile_dir is not None)
        self.zero_stage = cfg.train.optimizer.zero_stage
        hold = (self.engine is not None and cfg.moe.partition_grads and self.zero_stage < 2
                and any(cfg.moe.is_moe_layer(i) for i in mine))
        window = GradWindow() if hold else None
        runtime = MoERuntime(aux_scale=1.0 / accum, fused=kernels.use_fused(cfg.moe.kernels, self.device),
                             engine=self.engine, degrees=(cfg.moe.pipeline_degree, cfg.moe.bwd_pipeline_degree),
                             profile_steps=cfg.moe.profile_steps, window=window)
        self.chunks = self.spec.build(BuildContext(groups, self.device, self.param_dtype, tuple(self.stage_layers),
                                                   runtime))
        self.model = self.chunks[0] if p.pp == 1 else ModelChunks(self.chunks)
        self.moe_layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]
        self.norm_caches = norm_caches(self.model)
        self.reporter = Reporter(cfg, rank=self.rank, device=self.device, flops_per_token=self.flops_per_token,
                                 peak_flops=peak_flops_per_rank(self.device, dtype, self.param_dtype))
        self.moe = MoESession(self.moe_layers, self.engine, keep_records=profile_dir is not None,
                              say=self.reporter.say)

        # parallelize: gradient reduction over dp (dense) / edp (experts), the pipeline runner
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        # tied embeddings across pipeline stages: the first and the last stage each hold the weight
        self.tied = ([c.embed.weight for c in self.chunks if c.embed is not None]
                     if p.pp > 1 and cfg.model.tie_embeddings else [])
        self.replicas = grad_replicas(self.params, tp=groups.size("tp"), dp=groups.size("dp"),
                                      edp=groups.size("edp"), tied=self.tied)
        self.reducer, dp_units = build_reducer(self.params, groups, tied=self.tied, engine=self.engine, hold=hold,
                                               bucket_mb=cfg.train.bucket_mb, zero_stage=self.zero_stage)
        if window is not None:
            window.attach(self.reducer)
        self.runner = None
        if p.pp > 1:
            self.runner = PipelineRunner(group=groups.group("pp"), ranks=groups.members["pp"], stage=groups.rank("pp"),
                                         vpp=p.vpp, schedule=p.schedule, act_dtype=self.param_dtype,
                                         act_shape=self.spec.boundary_shape(cfg.train.micro_batch_size,
                                                                            groups.size("tp")),
                                         device=self.device)

        # optimizer, data, checkpoints
        units = dp_units if self.zero_stage == 1 else [(b.group, b.params, b.size) for b in self.reducer.buckets]
        self.optimizer = build_optimizer(self.params, cfg.train, device=self.device,
                                         zero_units=units if self.zero_stage else None)
        d = cfg.data
        data_kw = dict(seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                       global_batch=cfg.global_batch_size, micro_batch=cfg.train.micro_batch_size,
                       dp_rank=groups.rank("dp"), dp_size=groups.size("dp"), path=d.path, token_dtype=d.token_dtype,
                       blend=d.blend, split=d.split, valid=d.valid)
        self.data = TokenBatches(d.source, **data_kw)
        held_out = d.source == "synthetic" or d.split is not None or d.valid is not None
        self.valid = TokenBatches(d.source, which="valid", **data_kw) if held_out else None
        self.evals: list[dict[str, float]] = []
        self.checkpoints = RunCheckpoints(cfg, self.spec, self.chunks, self.optimizer, device=self.device,
                                          rank=self.rank, say=self.reporter.say)
        self.state = RunState(lr_horizon=cfg.train.steps)
        self.resumed_from: str | None = None
        self.phase = "build"
        self.step_times: list[float] = []

        def local_grad_sq() -> torch.Tensor:
            if self.zero_stage == 2:
                return self.optimizer.grad_norm_sq_local(self.replicas)
            return grad_norm_sq_local(self.params, self.replicas)

        self.health = StepHealth(cfg, stop or StopRequests(), rank=self.rank, local_grad_sq=local_grad_sq,
                                 last_checkpoint=self.checkpoints.latest, last_save_s=lambda: self.checkpoints.save_s,
                                 say=self.reporter.say)

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def _phase(self, name: str):
        """A named part of the step: profiler range, and the phase a failed collective is reported in."""
        self.phase = name
        with record_function(name):
            yield

    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def _local_step(self, step: int, accum: int, moe_stats: list[dict]) -> tuple[torch.Tensor, int]:
        """One step's micro-batches through the whole model (no pipeline); returns (loss sum, activation
        bytes of the first micro-batch). The DP reduction overlaps the last micro-batch's backward."""
        total = torch.zeros((), dtype=torch.float64)
        activation_bytes = 0
        for micro in range(accum):
            tokens, targets, ids = self.data.micro_batch_tensors(step, micro)
            tokens, targets = tokens.to(self.device), targets.to(self.device)
            self.model.dropout.set(step, ids)
            sync = contextlib.nullcontext() if micro == accum - 1 else self.reducer.no_sync()
            saved = SavedBytes(self.params) if micro == 0 else contextlib.nullcontext()
            with sync, self._phase("forward_backward"):
                with self._amp(), saved:
                    loss = self.model(tokens, targets) / accum
                loss.backward()
            if micro == 0:
                activation_bytes = saved.nbytes
            total += loss.detach().to(torch.float64).cpu()
            moe_stats.append({layer.layer: layer.last_stats for layer in self.moe_layers})
        return total, activation_bytes

    def _pipeline_step(self, step: int, accum: int, moe_stats: list[dict]) -> tuple[torch.Tensor, int]:
        """One step's micro-batches through the pipeline schedule; returns (loss sum on the last stage,
        activation bytes of this rank's first forward)."""
        batches = [self.data.micro_batch_tensors(step, i) for i in range(accum)]
        total = torch.zeros((), dtype=torch.float64)
        saved_bytes = [0]

        def before(action) -> None:
            for chunk in self.chunks:
                chunk.dropout.set(step, batches[action.mb][2])

        def forward(c: int, mb: int, inputs: torch.Tensor | None) -> torch.Tensor:
            nonlocal total
            tokens, targets, _ = batches[mb]
            chunk = self.chunks[c]
            first = mb == 0 and c == 0
            saved = SavedBytes(self.params) if first else contextlib.nullcontext()
            with self._amp(), saved:
                out = chunk(tokens.to(self.device) if chunk.pre else inputs,
                            targets.to(self.device) if chunk.post else None)
            if first:
                saved_bytes[0] = saved.nbytes
            moe_stats.append({m.layer: m.last_stats for m in chunk.modules() if isinstance(m, MoELayer)})
            if chunk.post:
                out = out / accum
                total += out.detach().to(torch.float64).cpu()
            return out

        with self.reducer.no_sync(), self._phase("pipeline_schedule"):
            self.runner.run(accum, forward, before)
        return total, saved_bytes[0]

    def train_step(self) -> dict[str, float]:
        cfg, step, g = self.cfg, self.step, self.groups
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.train, self.state.lr_horizon)
        moe_stats: list[dict] = []
        step_fn = self._local_step if self.runner is None else self._pipeline_step
        total, activation_bytes = step_fn(step, self.data.micro_batches, moe_stats)
        with self._phase("dp_grad_reduce"):
            self.reducer.finish()
            finalize_tp_partial_grads(self.params, g.get("tp"))
            if self.tied and self.tied[0].grad is not None:  # keep the two copies of a tied embedding equal
                dist.all_reduce(self.tied[0].grad, group=g.group("embedding"))
            if self.zero_stage == 2:
                self.optimizer.set_grad_slices(self.reducer.finish_late())
        with self._phase("clip_and_step"):
            # the norm's all-reduce also carries each rank's votes: nothing is applied before every rank knows
            votes = self.health.votes(loss=total, step_times=self.step_times)
            if self.zero_stage == 2:
                gnorm = self.optimizer.clip_grad_norm(cfg.train.grad_clip, self.replicas, votes=votes)
            else:
                gnorm = clip_grad_norm(self.params, cfg.train.grad_clip, self.replicas, votes=votes)
            verdict = self.health.verdict(votes, gnorm, step)
            if verdict.finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for cache in self.norm_caches:  # WTA-CRS gradient norms: mean over the whole global batch
                cache.finalize(g.get("dp")) if verdict.finite else cache.discard()
            for layer in self.moe_layers:
                if hasattr(layer.router, "update_bias"):
                    layer.router.update_bias(g.get("dp") if verdict.finite else None, apply=verdict.finite)
        if self.runner is not None:  # the loss lives on the last stage
            dist.all_reduce(total, group=g.group("pp"))
        dist.all_reduce(total, group=g.group("dp"))
        loss_value = float(total.item()) / g.size("dp")
        self.state.step += 1
        self.moe.after_step()
        return {"loss": loss_value, "grad_norm": gnorm, "lr": lr_at(step, cfg.train, self.state.lr_horizon),
                "saved_activation_bytes": activation_bytes, "skipped": not verdict.finite, "stop": verdict.stop,
                **moe_metrics(self.moe_layers, moe_stats)}

    # ------------------------------------------------------------------ the run
    def _guarded_step(self) -> dict[str, float]:
        try:
            return self.train_step()
        except RuntimeError as exc:
            if not is_comm_failure(exc):
                raise
            raise collective_failure(exc, rank=self.rank, step=self.step, phase=self.phase,
                                     timeout_s=self.cfg.cluster.collective_timeout_s) from exc

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.checkpoints.resume()
        if resumed is None:
            self.checkpoints.init_weights()
        else:
            self.state, self.resumed_from = resumed
            if cfg.train.steps > self.state.lr_horizon:
                self.reporter.say(f"[moetrain] train.steps={cfg.train.steps} runs past the LR schedule's "
                                  f"{self.state.lr_horizon} steps (the first run's train.steps): the LR stays at "
                                  f"train.min_lr={cfg.train.min_lr:g} from step {self.state.lr_horizon} on")
        self._predict()
        start_step = self.step
        t_start = time.perf_counter()
        last: dict[str, Any] = {}
        stopped = None
        self.reporter.start(self.step)
        while self.step < cfg.train.steps and stopped is None:
            inject_fault(cfg.fault.inject, rank=self.rank, step=self.step, attempt=attempt_number())
            t0 = time.perf_counter()
            profiling = self.moe.profiling
            last = self._guarded_step()
            dt = time.perf_counter() - t0
            self.step_spans.append((self.step - 1, t0, t0 + dt, profiling))
            self.step_times.append(dt)
            self.state.losses.append(last["loss"])
            self.state.grad_norms.append(last["grad_norm"])
            if self.runner is not None and (self.reporter.logs(self.step) or last["stop"]):
                last.update(stage_moe_metrics(last, self.groups))
            self.reporter.step(self.step, last, dt)
            if self.step == start_step + 1:
                self.first_step_wall = time.time()  # start-up figures: launch -> first step done
                self.memory = self.reporter.memory(self.params, self.optimizer, last["saved_activation_bytes"])
            stopped = last["stop"]
            every = cfg.train.eval_every
            if every and (self.step % every == 0 or self.step == cfg.train.steps or stopped is not None):
                self.evaluate()
            if self.checkpoints.due(self.step) or (stopped and self.checkpoints.checkpointer is not None):
                self.checkpoints.save(self.state)
        if stopped is not None:
            stopped.update(step=self.step, checkpoint=self.checkpoints.latest())
        self.reporter.close()
        elapsed = time.perf_counter() - t_start
        timed = self.step_times[1:] or self.step_times  # the first step pays warm-up
        tps = self.reporter.tokens_per_step * len(timed) / max(sum(timed), 1e-9) if timed else 0.0
        if self.profile_dir:
            from moetrain.launch.profile import write_rank_records

            write_rank_records(self, self.profile_dir)
        if self.engine is not None:
            self.engine.close()
        if cfg.logging.collective_check:
            from moetrain.dist import collective_check

            collective_check.disable()
        summary = self.reporter.summary(
            self.state, last, start_step=start_step, elapsed=elapsed, tokens_per_s=tps, stopped=stopped,
            facts=self.facts, skipped=self.health.skipped, resumed_from=self.resumed_from,
            stage_layers=self.stage_layers, memory=getattr(self, "memory", None),
            first_step_wall=getattr(self, "first_step_wall", None), moe_degrees=self.moe.degrees())
        from moetrain.plan.runtime import compare_run

        summary["valid"] = self.evals
        summary["plan"] = compare_run(self.prediction, summary["memory"], self.step_times,
                                      per_stage=self.groups.size("tp") * self.groups.size("dp"))
        return summary

    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over ``train.eval_iters`` global batches of held-out samples (the same ones at
        every evaluation) and its perplexity; logged, written to TensorBoard and kept for the summary."""
        import math

        from moetrain.launch.inference import forward_loss

        if self.valid is None:
            raise DataError("validation needs held-out data: set data.split or data.valid")
        cfg, g = self.cfg, self.groups
        shape = self.spec.boundary_shape(cfg.train.micro_batch_size, g.size("tp"))
        total, n = 0.0, 0
        with self._phase("evaluate"):
            for it in range(cfg.train.eval_iters):
                for micro in range(self.valid.micro_batches):
                    tokens, targets, ids = self.valid.micro_batch_tensors(it, micro)
                    for chunk in self.chunks:
                        chunk.dropout.set(it, ids)
                    with self._amp():
                        total += forward_loss(self.chunks, g, tokens.to(self.device), targets.to(self.device),
                                              boundary_shape=shape, dtype=self.param_dtype)
                    n += 1
        mean = torch.tensor(total / n, dtype=torch.float64)
        dist.all_reduce(mean, group=g.group("dp"))
        loss = float(mean) / g.size("dp")
        out = {"step": self.step, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
               "tokens": cfg.train.eval_iters * cfg.global_batch_size * cfg.model.seq_len}
        self.evals.append(out)
        self.reporter.evaluation(out)
        return out

    def _predict(self) -> None:
        """The planner's prediction for this run (``moetrain plan``), logged once; a warning when it predicts
        running out of GPU memory."""
        from moetrain.plan.runtime import predict_run

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.prediction = predict_run(self.cfg, name)
        p = self.prediction
        if p.get("error") or self.rank != 0:
            return
        mem = max(m["params"] + m["grads"] + m["optimizer"] for m in p["memory_per_stage"])
        line = f"[moetrain] plan: parameters + gradients + optimizer {mem / 2**20:.1f} MiB per rank"
        if p["step_time_s"] is not None:
            line += f"; step {p['step_time_s'] * 1e3:.1f} ms on {p['hardware']}"
        self.reporter.say(line)
        if self.device.type == "cuda" and p["fits"] is False:
            self.reporter.say(f"[moetrain] warning: the plan predicts {p['memory_total'] / 2**30:.1f} GiB per rank, "
                              f"more than the {p['device_memory'] / 2**30:.1f} GiB usable on {p['hardware']}: "
                              "expect out-of-memory (see moetrain plan for the breakdown)")

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or gradient) of the whole model as its logical unsharded tensor, by name, on
        every rank (collective over TP, EP and the pipeline)."""
        local = self.model.full_tensors(grads)
        if self.cfg.parallel.pp == 1:
            return local
        parts: list = [None] * self.groups.size("pp")
        dist.all_gather_object(parts, local, group=self.groups.group("pp"))
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)  # a tied embedding appears on the first and the last stage
        return out


def evaluate_run(cfg: JobConfig, groups: ParallelGroups, stop=None) -> dict[str, Any]:
    """``moetrain eval``: the validation loss of the newest checkpoint in checkpoint.dir (``checkpoint.resume``)
    or of ``checkpoint.init_from``, without training."""
    trainer = Trainer(cfg, groups, stop=stop)
    resumed = trainer.checkpoints.resume()
    source = resumed[1] if resumed is not None else trainer.checkpoints.init_weights()
    if source is None:
        raise TrainError("moetrain eval needs weights: a checkpoint in checkpoint.dir (checkpoint.resume) or "
                         "checkpoint.init_from (an HF directory or a moetrain checkpoint)")
    if resumed is not None:
        trainer.state = resumed[0]
    out = trainer.evaluate()
    trainer.reporter.close()
    return {"mode": "eval", "valid": [out], "step": trainer.step, "source": source}


def train(cfg: JobConfig, groups: ParallelGroups, profile_dir: str | None = None,
          stop: StopRequests | None = None) -> dict[str, Any]:
    """Build a Trainer for this rank and run it to ``train.steps`` (recording a profile into
    ``profile_dir`` when given; ``stop``: the stop signals this rank receives)."""
    return Trainer(cfg, groups, profile_dir=profile_dir, stop=stop).fit()
