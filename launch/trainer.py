"""The per-rank training loop: build the sharded model, then step through micro-batches.

One optimizer step:
    for each micro-batch (all but the last under ``reducer.no_sync()``):
        forward (TP collectives inside the layers) -> loss / accum -> backward
        (on the last micro-batch, DP buckets all-reduce while backward runs)
    reducer.finish()                      wait for DP buckets, average
    finalize_tp_partial_grads      TP-sum of SP norm-weight grads
    clip_grad_norm                        one global norm across all groups
    AdamW step, LR schedule (linear warm-up, cosine decay to min_lr)
    log (console, TensorBoard), checkpoint every ``checkpoint.every`` steps
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from moetrain.dist.checkpoint import Checkpointer, CheckpointError, CheckpointReader
from moetrain.dist.groups import ParallelGroups
from moetrain.launch.config import JobConfig
from moetrain.launch.data import TokenBatches
from moetrain.launch.metrics import (
    device_peak_flops,
    flops_per_token,
    matmul_param_count,
    measure_matmul_flops,
    peak_memory_bytes,
)
from moetrain.launch.resharding import logical_state, restore_logical
from moetrain.moe.layer import MoEArgs, MoEGroups, MoELayer
from moetrain.moe.tuning import DegreeTuner, fit_and_choose
from moetrain.parallel.data_parallel import GradReducer, clip_grad_norm, finalize_tp_partial_grads
from moetrain.parallel.model import SwiGLU, Transformer, TransformerArgs
from moetrain.parallel.pipeline import PipelineRunner, partition_layers
from moetrain.parallel.zero import ShardedAdamW

__all__ = ["Trainer", "train", "TrainError", "CollectiveFailure"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside this context (one micro-batch's
    activations): storages counted once, parameters excluded."""

    def __init__(self, params):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[int] = set()
        self.nbytes = 0

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self._seen and ptr not in self._param_ptrs:
            self._seen.add(ptr)
            self.nbytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class ModelChunks(torch.nn.Module):
    """This rank's pipeline model chunks (one per virtual stage it holds)."""

    def __init__(self, chunks: list[Transformer]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            out.update(chunk.full_tensors(grads))
        return out


class TrainError(RuntimeError):
    """The job cannot train as configured (reported to the user without a traceback)."""


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out (a peer died or hung); names this rank, the step and the phase."""


_COMM_ERROR_HINTS = ("gloo", "timed out", "timeout", "connection", "nccl", "socket", "peer")


class InjectedFault(RuntimeError):
    """Raised by ``fault.inject.kind=exception`` (a testing aid)."""


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at train.steps."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: JobConfig, groups: ParallelGroups, profile_dir: str | None = None):
        self.cfg, self.groups = cfg, groups
        self.profile_dir = profile_dir
        self.step_spans: list[tuple[int, float, float, bool]] = []
        self.rank = dist.get_rank()
        if cfg.logging.collective_check:
            from moetrain.dist import collective_check

            collective_check.enable(timeout_s=min(cfg.cluster.collective_timeout_s, 120.0))
        self.is_logger = self.rank == 0
        if cfg.cluster.device == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"cluster.device=cuda but rank {self.rank} sees no CUDA device")
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        dtype = _DTYPES[cfg.train.dtype]
        self.param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.autocast = dtype == torch.bfloat16
        torch.manual_seed(cfg.train.seed)

        tp_size = groups.size("tp")
        m = cfg.model
        self.args = TransformerArgs(
            layers=m.layers, d_model=m.d_model, heads=m.heads, kv_heads=cfg.kv_heads, d_ffn=cfg.d_ffn,
            vocab_size=m.vocab_size, seq_len=m.seq_len, attention=m.attention, tie_embeddings=m.tie_embeddings,
            dropout=m.dropout, norm_eps=m.norm_eps, rope_theta=m.rope_theta, seed=cfg.train.seed,
            wtacrs_keep_ratio=cfg.wtacrs.keep_ratio if cfg.wtacrs.enabled else None,
            wtacrs_layers=tuple(cfg.wtacrs.layers), wtacrs_min_rows=cfg.wtacrs.min_rows,
            recompute=cfg.train.recompute)
        tp_group = groups.tp if tp_size > 1 else None
        self.stage_layers = self._stage_layers()
        self.chunks = self._build_chunks(tp_group)
        self.model = self.chunks[0] if cfg.parallel.pp == 1 else ModelChunks(self.chunks)
        self.moe_layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]
        self.norm_caches = [m.norm_cache for m in self.model.modules() if hasattr(m, "norm_cache")]
        for chunk in self.chunks:
            for layer in chunk.modules():
                if isinstance(layer, MoELayer):
                    layer.router.streams = chunk.dropout  # layout-free per-token random numbers
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        dp, edp = groups.size("dp"), groups.size("edp")
        dense = [p for p in self.params if not getattr(p, "is_expert", False)]
        experts = [p for p in self.params if getattr(p, "is_expert", False)]
        self.replicas = {id(p): dp * (1 if getattr(p, "tp_sharded", False) else tp_size) for p in dense}
        self.replicas.update({id(p): edp for p in experts})
        # tied embeddings across pipeline stages: the first and the last stage each hold the weight
        self.tied = ([c.embed.weight for c in self.chunks if c.embed is not None]
                     if cfg.parallel.pp > 1 and m.tie_embeddings else [])
        for p in self.tied:
            self.replicas[id(p)] *= 2
        self.keep_records = profile_dir is not None  # the profile command keeps every span
        self.runner = None
        if cfg.parallel.pp > 1:
            s_local = m.seq_len // tp_size if (cfg.parallel.sp and tp_size > 1) else m.seq_len
            self.runner = PipelineRunner(group=groups.pp, ranks=groups.members["pp"], stage=groups.index("pp"),
                                         vpp=cfg.parallel.vpp, schedule=cfg.parallel.schedule,
                                         act_shape=(s_local, cfg.train.micro_batch_size, m.d_model),
                                         act_dtype=self.param_dtype, device=self.device)
        # expert gradients already sum the tokens of the dp replicas in their EP group: sum over edp, / dp
        self.engine = self._link_engine()
        self.zero_stage = cfg.train.optimizer.zero_stage
        dp_groups = [(groups.dp, dense), (groups.edp, experts, dp)]
        hold = self.engine is not None and cfg.moe.partition_grads and bool(self.moe_layers) and self.zero_stage < 2
        # ZeRO-2: buckets are reduce-scattered; gradients first summed over another group wait for finish_late
        late = {id(p) for p in self.params if getattr(p, "tp_partial_grad", False)} | {id(p) for p in self.tied}
        self.reducer = GradReducer(dp_groups, engine=self.engine, hold=hold,
                                   bucket_bytes=int(cfg.train.bucket_mb * 2**20),
                                   scatter=self.zero_stage == 2, late=late if self.zero_stage == 2 else None)
        for layer in self.moe_layers:
            if self.engine is not None:
                layer.engine = self.engine
                layer.tuner = DegreeTuner(cfg.moe.pipeline_degree, cfg.moe.bwd_pipeline_degree,
                                          profile_steps=cfg.moe.profile_steps)
                layer.release_grads = self._window(layer) if hold else None
        self.profiling = any(layer.tuner is not None and layer.tuner.profiling for layer in self.moe_layers)
        if self.engine is not None:
            self.engine.record = self.profiling or self.keep_records
        opt_kwargs: dict[str, Any] = dict(lr=cfg.train.lr, betas=(cfg.train.optimizer.beta1, cfg.train.optimizer.beta2),
                                          eps=cfg.train.optimizer.eps, weight_decay=cfg.train.optimizer.weight_decay)
        if self.zero_stage:
            units = dp_groups if self.zero_stage == 1 else [(b.group, b.params, b.size) for b in self.reducer.buckets]
            self.optimizer = ShardedAdamW(units, stage=self.zero_stage, offload=cfg.train.optimizer.offload,
                                          **opt_kwargs)
        else:
            self.optimizer = self._make_optimizer(opt_kwargs)
        self.data = TokenBatches(cfg.data.source, seq_len=m.seq_len, vocab_size=m.vocab_size, seed=cfg.train.seed,
                                 global_batch=cfg.global_batch_size, micro_batch=cfg.train.micro_batch_size,
                                 dp_rank=groups.index("dp"), dp_size=dp, path=cfg.data.path,
                                 token_dtype=cfg.data.token_dtype)
        self.step = 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.checkpointer = (Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, log=self._say)
                             if cfg.checkpoint.dir else None)
        self.resumed_from: str | None = None
        n_matmul = matmul_param_count(m.layers, m.d_model, m.heads, cfg.kv_heads, cfg.d_ffn, m.vocab_size)
        self.flops_per_token = flops_per_token(n_matmul, m.layers, m.seq_len, m.d_model)
        self.peak_flops = self._peak_flops(dtype)
        self.writer = None
        if self.is_logger and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)

    # ------------------------------------------------------------------ set-up helpers
    def _link_engine(self):
        """Link channels when MoE chunk pipelining, simulated links or a profile are asked for (dist/links.py)."""
        cfg = self.cfg
        moe, net = cfg.moe, cfg.network
        pipelined = moe.num_experts > 0 and (moe.pipeline_degree, moe.bwd_pipeline_degree) != (1, 1)
        if not (pipelined or net.simulate or self.profile_dir):
            return None
        from moetrain.dist.links import LinkEngine, LinkSpec

        sim = None
        if net.simulate:
            sim = {name: LinkSpec(link.latency_us * 1e-6, link.bandwidth_gbps * 1e9)
                   for name, link in (("intra", net.intra), ("inter", net.inter))}
        grid = self.groups.grid
        return LinkEngine(node_of=[grid.node_of(r) for r in range(grid.world_size)], simulate=sim,
                          coschedule=moe.coschedule)

    def _window(self, layer):
        """The gradient bytes an MoE layer's backward window can take: its modeled inter-link idle time
        over the inter link's per-byte cost (everything ready until the model exists)."""

        def release() -> None:
            report = getattr(layer, "overlap_report", None)
            budget = None
            if report:
                beta = report["links"]["inter"]["beta"]
                budget = report["bwd_inter_idle_s"] / beta if beta > 0 else None
            self.reducer.release(budget)

        return release

    def _after_step_tuning(self) -> None:
        """Advance the degree tuners; when the profiling steps are done, fit the model and choose."""
        if self.engine is None:
            return
        for layer in self.moe_layers:
            layer.tuner.end_step()
        profiling = [layer for layer in self.moe_layers if layer.tuner.profiling]
        if profiling and all(layer.tuner.ready for layer in profiling):
            reports = fit_and_choose(self.moe_layers, self.engine)
            chosen = {k: v["degrees"] for k, v in reports.items()}
            self._say(f"[moetrain] MoE chunk pipelining: (forward, backward) degrees by layer {chosen}")
        # a layer whose input shape changed profiles again (DegreeTuner.degrees)
        self.profiling = any(layer.tuner.profiling for layer in self.moe_layers)
        self.engine.record = self.profiling or self.keep_records
        if not self.keep_records and not self.profiling:
            self.engine.clear_records()
            for layer in self.moe_layers:
                layer.section_times.compute.clear()
                layer.section_times.sections.clear()

    def _layer_cost(self, layer: int) -> float:
        """Parameters of block ``layer`` (the pipeline balancing weight)."""
        cfg, m, moe = self.cfg, self.cfg.model, self.cfg.moe
        hd = m.d_model // m.heads
        attn = m.d_model * (m.heads + 2 * cfg.kv_heads) * hd + m.heads * hd * m.d_model + 2 * m.d_model
        if moe.num_experts == 0 or (layer + 1) % moe.every:
            return attn + 3 * m.d_model * cfg.d_ffn
        d_expert = moe.d_expert or cfg.d_ffn
        per_expert = (3 if moe.activation == "swiglu" else 2) * m.d_model * d_expert
        return (attn + moe.num_experts * per_expert + m.d_model * moe.num_experts
                + 3 * m.d_model * moe.shared_experts * d_expert)

    def _stage_layers(self) -> list[int]:
        """Layers of each virtual pipeline stage: the configured list, or balanced by parameter count."""
        p = self.cfg.parallel
        if p.pipeline_layers is not None:
            return list(p.pipeline_layers)
        m = self.cfg.model
        costs = [self._layer_cost(i) for i in range(m.layers)]
        return partition_layers(costs, p.pp * p.vpp, last_extra=m.vocab_size * m.d_model)

    def _build_chunks(self, tp_group) -> list[Transformer]:
        """This rank's model chunks: virtual stages ``c * pp + stage`` for ``c < vpp``."""
        p = self.cfg.parallel
        stage = self.groups.index("pp")
        starts = [sum(self.stage_layers[:i]) for i in range(len(self.stage_layers))]
        last = p.pp * p.vpp - 1
        chunks = []
        for c in range(p.vpp):
            vs = c * p.pp + stage
            ids = range(starts[vs], starts[vs] + self.stage_layers[vs])
            chunks.append(Transformer(self.args, tp_group=tp_group, sp=p.sp, dtype=self.param_dtype,
                                      ffn_factory=self._ffn_factory(tp_group), layer_ids=ids, pre=vs == 0,
                                      post=vs == last).to(self.device))
        return chunks

    def _ffn_factory(self, tp_group):
        cfg = self.cfg
        moe = cfg.moe
        if moe.num_experts == 0:
            return None
        m = cfg.model
        groups = MoEGroups.from_parallel(self.groups)
        d_expert = moe.d_expert or cfg.d_ffn
        margs = MoEArgs(num_experts=moe.num_experts, topk=moe.topk, d_model=m.d_model, d_expert=d_expert,
                        router=moe.router, capacity_factor=moe.capacity_factor, drop_policy=moe.drop_policy,
                        dispatch=moe.dispatch, activation=moe.activation, shared_experts=moe.shared_experts,
                        aux_loss_coef=moe.aux_loss_coef, seq_aux_loss_coef=moe.seq_aux_loss_coef,
                        z_loss_coef=moe.z_loss_coef, n_groups=moe.n_groups, topk_groups=moe.topk_groups,
                        bias_update_rate=moe.bias_update_rate, xmoe_dim=moe.xmoe_dim,
                        slots_per_expert=moe.slots_per_expert, seed=cfg.train.seed, num_layers=m.layers,
                        kernels=self._moe_kernels(moe.kernels),
                        overlap_wgrad=None if moe.overlap_wgrad == "auto" else moe.overlap_wgrad)

        def build(layer: int):
            if (layer + 1) % moe.every:
                return SwiGLU(m.d_model, cfg.d_ffn, m.layers, layer, tp_group=tp_group, sp=cfg.parallel.sp,
                              seed=cfg.train.seed, dtype=self.param_dtype)

            def shared():
                return SwiGLU(m.d_model, moe.shared_experts * d_expert, m.layers, layer, tp_group=tp_group,
                              sp=cfg.parallel.sp, seed=cfg.train.seed, dtype=self.param_dtype,
                              name=f"layers.{layer}.moe.shared")

            return MoELayer(margs, layer, groups, sp=cfg.parallel.sp, dtype=self.param_dtype, shared_factory=shared)

        return build

    def _moe_kernels(self, choice: str) -> str:
        """``moe.kernels`` -> the layer's ops: the csrc kernels need a CUDA device and a successful build."""
        from moetrain.moe import kernels

        if choice == "torch" or self.device.type != "cuda":
            return "torch"
        if choice == "cuda":
            kernels.require()  # KernelError naming the build failure
            return "fused"
        return "fused" if kernels.load() is not None else "torch"  # auto: a failed build is logged once

    def _make_optimizer(self, kwargs: dict) -> torch.optim.Optimizer:
        import importlib.util

        if self.device.type == "cuda" and importlib.util.find_spec("apex") and \
                importlib.util.find_spec("apex.optimizers"):  # pragma: no cover - needs NVIDIA apex
            from apex.optimizers import FusedAdam

            return FusedAdam(self.params, adam_w_mode=True, **kwargs)
        if self.device.type == "cuda":
            return torch.optim.AdamW(self.params, fused=True, **kwargs)
        return torch.optim.AdamW(self.params, foreach=True, **kwargs)

    def _peak_flops(self, dtype: torch.dtype) -> float:
        known = device_peak_flops(self.device, dtype)
        if known:
            return known
        # All ranks measure at once, so each sees its share of the cores it competes for.
        dist.barrier()
        rate = torch.tensor([measure_matmul_flops(self.param_dtype, n=512, device=str(self.device))],
                            dtype=torch.float64)
        dist.all_reduce(rate)
        return float(rate.item()) / dist.get_world_size()

    def _say(self, msg: str) -> None:
        if self.is_logger:
            print(msg, flush=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's checkpoint file (collective): the logical tensors it writes, its RNG states."""
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        return logical_state(self.chunks, self.optimizer, {"rng": rng})

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        """Restore from a checkpoint saved at this or any other layout."""
        restore_logical(self.chunks, self.optimizer, reader)
        manifest = reader.manifest
        self.step = int(manifest["step"])
        self.losses = list(manifest.get("losses", []))
        self.grad_norms = list(manifest.get("grad_norms", []))
        same_layout = manifest.get("layout") == self._meta()["layout"]
        own = reader.rank_state(self.rank) if same_layout else None
        if own is not None:  # the same ranks: continue their RNG streams exactly
            torch.set_rng_state(own["rng"]["cpu"])
            if own["rng"].get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["rng"]["cuda"], self.device)

    # moe fields that change parameter shapes (the others are runtime choices a resumed job may change)
    _MOE_SHAPE_KEYS = ("num_experts", "every", "d_expert", "shared_experts", "activation", "router", "xmoe_dim",
                       "slots_per_expert")

    def _meta(self) -> dict[str, Any]:
        r = self.cfg.resolved()
        shape = {f"model.{k}": v for k, v in r["model"].items()}
        shape.update({f"moe.{k}": r["moe"][k] for k in self._MOE_SHAPE_KEYS})
        layout = {k: r["parallel"][k] for k in ("tp", "pp", "dp", "ep", "etp", "vpp")}
        layout["zero_stage"] = self.cfg.train.optimizer.zero_stage
        return {"config": r, "shape": shape, "layout": layout, "losses": self.losses,
                "grad_norms": self.grad_norms, "samples_consumed": self.step * self.cfg.global_batch_size}

    def _check_compatible(self, manifest: dict[str, Any], path) -> None:
        mine = self._meta()
        saved = manifest.get("shape", {})
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in mine["shape"].items()
                 if saved.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was saved for a different model ({'; '.join(diffs)})")

    def maybe_resume(self) -> None:
        if self.checkpointer is None:
            return
        found = self.checkpointer.find(self.cfg.checkpoint.resume)
        if found is None:
            return
        path, manifest = found
        self._check_compatible(manifest, path)
        self.load_checkpoint(CheckpointReader(path, manifest))
        self.resumed_from = str(path)
        saved = manifest.get("layout")
        moved = "" if saved == self._meta()["layout"] else f" (saved at {saved}, resharded)"
        self._say(f"[moetrain] resumed from {path} at step {self.step}{moved}")

    # ------------------------------------------------------------------ the loop
    def _inject_fault(self, step: int) -> None:
        inj = self.cfg.fault.inject
        if inj.kind is None or inj.step != step or inj.rank != self.rank:
            return
        from moetrain.launch.job import attempt_number

        if attempt_number() > 0:  # a restarted job runs on: the fault was injected into the first attempt
            return
        print(f"[moetrain] rank {self.rank}: injected fault '{inj.kind}' at step {step}", file=sys.stderr, flush=True)
        if inj.kind == "exit":
            os._exit(17)
        if inj.kind == "exception":
            raise InjectedFault(f"injected exception on rank {self.rank} at step {step}")
        while True:  # hang
            time.sleep(1)

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
            amp = self._amp()
            saved = SavedBytes(self.params) if micro == 0 else contextlib.nullcontext()
            with sync, self._phase("forward_backward"):
                with amp, saved:
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

    def full_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or gradient) of the whole model as its logical unsharded tensor, by name, on
        every rank (collective over TP, EP and the pipeline)."""
        local = self.model.full_tensors(grads)
        if self.cfg.parallel.pp == 1:
            return local
        parts: list = [None] * self.groups.size("pp")
        dist.all_gather_object(parts, local, group=self.groups.pp)
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            for k, v in part.items():
                out.setdefault(k, v)  # a tied embedding appears on the first and the last stage
        return out

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        accum = self.data.micro_batches
        for layer in self.moe_layers:
            layer.aux_scale = 1.0 / accum
        moe_stats: list[dict] = []
        step_fn = self._local_step if self.runner is None else self._pipeline_step
        total, activation_bytes = step_fn(step, accum, moe_stats)
        with self._phase("dp_grad_reduce"):
            self.reducer.finish()
            tp = self.groups.tp if self.groups.size("tp") > 1 else None
            finalize_tp_partial_grads(self.params, tp)
            if self.tied and self.tied[0].grad is not None:  # keep the two copies of a tied embedding equal
                dist.all_reduce(self.tied[0].grad, group=self.groups.embedding)
            if self.zero_stage == 2:
                self.optimizer.set_grad_slices(self.reducer.finish_late())
        with self._phase("clip_and_step"):
            if self.zero_stage == 2:
                gnorm = self.optimizer.clip_grad_norm(cfg.train.grad_clip, self.replicas)
            else:
                gnorm = clip_grad_norm(self.params, cfg.train.grad_clip, self.replicas)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            dp_group = self.groups.dp if self.groups.size("dp") > 1 else None
            for cache in self.norm_caches:  # WTA-CRS gradient norms: mean over the whole global batch
                cache.finalize(dp_group)
            for layer in self.moe_layers:
                if hasattr(layer.router, "update_bias"):
                    layer.router.update_bias(self.groups.dp if self.groups.size("dp") > 1 else None)
        if self.runner is not None:  # the loss lives on the last stage
            dist.all_reduce(total, group=self.groups.pp)
        dist.all_reduce(total, group=self.groups.dp)
        loss_value = float(total.item()) / self.groups.size("dp")
        self.step += 1
        self._after_step_tuning()
        return {"loss": loss_value, "grad_norm": gnorm, "lr": lr_at(step, cfg),
                "saved_activation_bytes": activation_bytes, **self._moe_metrics(moe_stats)}

    def _moe_metrics(self, per_micro: list[dict]) -> dict[str, float]:
        """Expert load per MoE layer over this rank's micro-batches: dropped fraction, load CV, aux losses."""
        out: dict[str, float] = {}
        for layer in self.moe_layers:
            stats = [m[layer.layer] for m in per_micro if layer.layer in m]
            if not stats:
                continue
            load = torch.stack([s["tokens_per_expert"].to(torch.float64).cpu() for s in stats]).sum(0)
            assigned = sum(s["assignments"] for s in stats)
            key = f"moe/layer{layer.layer}"
            out[f"{key}/dropped_frac"] = sum(s["dropped"] for s in stats) / max(assigned, 1)
            out[f"{key}/load_cv"] = float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))
            out[f"{key}/load_max_over_mean"] = float(load.max() / load.mean().clamp_min(1e-9))
            for name in ("aux_loss", "seq_aux_loss", "z_loss"):
                if name in stats[0]:
                    out[f"{key}/{name}"] = sum(s[name] for s in stats) / len(stats)
        return out

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.maybe_resume()
        tokens_per_step = cfg.global_batch_size * cfg.model.seq_len
        start_step = self.step
        t_start = time.perf_counter()
        step_times: list[float] = []
        progress = self._progress_bar()
        while self.step < cfg.train.steps:
            self._inject_fault(self.step)
            t0 = time.perf_counter()
            profiling = self.profiling
            try:
                out = self.train_step()
            except RuntimeError as exc:
                text = str(exc)
                if isinstance(exc, (InjectedFault, TrainError)) or \
                        not any(h in text.lower() for h in _COMM_ERROR_HINTS):
                    raise
                first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
                raise CollectiveFailure(
                    f"rank {self.rank}: a collective in phase '{getattr(self, 'phase', '?')}' of step {self.step} "
                    f"failed after at most cluster.collective_timeout_s={self.cfg.cluster.collective_timeout_s:g}s "
                    f"({first[:300]}); a peer rank died or hung") from exc
            dt = time.perf_counter() - t0
            self.step_spans.append((self.step - 1, t0, t0 + dt, profiling))
            step_times.append(dt)
            self.losses.append(out["loss"])
            self.grad_norms.append(out["grad_norm"])
            self.last_metrics = out
            if not math.isfinite(out["loss"]):
                raise TrainError(f"loss became {out['loss']} at step {self.step - 1}")
            self._log(out, dt, tokens_per_step)
            if self.step == start_step + 1:
                self.first_step_wall = time.time()  # start-up figures: launch -> first step done
                self.memory = self._memory_report(out["saved_activation_bytes"])
            if progress is not None:
                progress.update(progress.task_ids[0], completed=self.step, loss=out["loss"])
            if self.checkpointer and cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.checkpointer.save(self.step, self.state_dict(), self._meta())
        if progress is not None:
            progress.stop()
        elapsed = time.perf_counter() - t_start
        timed = step_times[1:] or step_times  # the first step pays warm-up
        tps = tokens_per_step * len(timed) / max(sum(timed), 1e-9) if timed else 0.0
        achieved = tps * self.flops_per_token / dist.get_world_size()
        if self.writer:
            self.writer.close()
        if self.profile_dir:
            from moetrain.launch.profile import write_rank_records

            write_rank_records(self, self.profile_dir)
        if self.engine is not None:
            self.engine.close()
        if cfg.logging.collective_check:
            from moetrain.dist import collective_check

            collective_check.disable()
        return {
            "steps": self.step,
            "losses": self.losses,
            "final_loss": self.losses[-1] if self.losses else None,
            "tokens_per_s": tps,
            "world_size": dist.get_world_size(),
            "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep, "dp": cfg.dp},
            "pipeline": {"schedule": cfg.parallel.schedule, "vpp": cfg.parallel.vpp,
                         "stage_layers": self.stage_layers} if cfg.parallel.pp > 1 else None,
            "restarts": 0,
            "grad_norms": self.grad_norms,
            "saved_activation_bytes": getattr(self, "last_metrics", {}).get("saved_activation_bytes"),
            "moe": {k: v for k, v in getattr(self, "last_metrics", {}).items() if k.startswith("moe/")},
            "resumed_from": self.resumed_from,
            "steps_run": self.step - start_step,
            "elapsed_s": elapsed,
            "model_flops_per_token": self.flops_per_token,
            "mfu": achieved / self.peak_flops if self.peak_flops else None,
            "peak_flops_per_rank": self.peak_flops,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "memory": getattr(self, "memory", None),
            "first_step_wall": getattr(self, "first_step_wall", None),
            "moe_degrees": {layer.layer: list(layer.tuner.chosen or (layer.tuner.fwd, layer.tuner.bwd))
                            for layer in self.moe_layers if layer.tuner is not None},
        }

    def _memory_report(self, activation_bytes: int) -> dict[str, Any]:
        """Per-rank bytes of parameters, gradients kept between steps, optimizer state and the activations
        saved for backward by one micro-batch; logged once after the first step (collective)."""
        params = sum(p.numel() * p.element_size() for p in self.params)
        if self.zero_stage:
            grads, opt = self.optimizer.grad_bytes(), self.optimizer.state_bytes()
        else:
            grads = params
            opt = sum(t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        mine = {"params": params, "grads": grads, "optimizer": opt, "activations": int(activation_bytes or 0)}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        peak = {k: max(r[k] for r in every) for k in mine}
        where = "host memory" if self.cfg.train.optimizer.offload == "cpu" else str(self.device)
        mib = {k: f"{v / 2**20:.2f}" for k, v in peak.items()}
        self._say(f"[moetrain] memory per rank (max over ranks, MiB): params {mib['params']}, grads {mib['grads']}, "
                  f"optimizer state {mib['optimizer']} (ZeRO stage {self.zero_stage}, on {where}), "
                  f"activations {mib['activations']} per micro-batch")
        return {"per_rank": every, "max": peak, "zero_stage": self.zero_stage,
                "offload": self.cfg.train.optimizer.offload}

    def _progress_bar(self):
        """A live bar on rank 0 when writing to a terminal (plain step lines otherwise, e.g. in CI logs)."""
        if not (self.is_logger and sys.stdout.isatty()):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True)
        bar.add_task("train", total=self.cfg.train.steps, completed=self.step, loss=float("nan"))
        bar.start()
        return bar

    def _log(self, out: dict[str, float], dt: float, tokens_per_step: int) -> None:
        step = self.step
        tps = tokens_per_step / max(dt, 1e-9)
        tflops = tps * self.flops_per_token / dist.get_world_size() / 1e12
        mfu = tflops * 1e12 / self.peak_flops if self.peak_flops else float("nan")
        mem = peak_memory_bytes(self.device)
        if self.device.type == "cuda" and step % self.cfg.logging.every == 0:  # every rank: a collective
            self._log_gpus(step)
        if self.writer:
            for k, v in (("loss", out["loss"]), ("lr", out["lr"]), ("grad_norm", out["grad_norm"]),
                         ("tokens_per_s", tps), ("tflops_per_rank", tflops), ("mfu", mfu),
                         ("peak_memory_mib", mem / 2**20)):
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/saved_activation_mib", out["saved_activation_bytes"] / 2**20, step)
            for k, v in out.items():
                if k.startswith("moe/"):
                    self.writer.add_scalar(k, v, step)
        if self.is_logger and (step % self.cfg.logging.every == 0 or step == self.cfg.train.steps or step == 1):
            print(f"step {step:>5}/{self.cfg.train.steps} | loss {out['loss']:.4f} | lr {out['lr']:.2e} | "
                  f"gnorm {out['grad_norm']:.3f} | {tps:,.0f} tok/s | {tflops * 1e3:.2f} GFLOP/s/rank | "
                  f"MFU {mfu:.1%} | mem {mem / 2**20:.0f} MiB | act {out['saved_activation_bytes'] / 2**20:.1f} MiB",
                  flush=True)


    def _log_gpus(self, step: int) -> None:
        """Every rank's NVML sample (utilisation, memory, power) to TensorBoard as gpu/<metric>/rank<r>."""
        if not hasattr(self, "gpu_monitor"):
            from moetrain.launch.gpu_monitor import GpuMonitor

            self.gpu_monitor = GpuMonitor.create(self.device)
        mine = self.gpu_monitor.sample() if self.gpu_monitor is not None else {}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if self.writer:
            for r, sample in enumerate(every):
                for k, v in (sample or {}).items():
                    self.writer.add_scalar(f"{k}/rank{r}", v, step)


def train(cfg: JobConfig, groups: ParallelGroups, profile_dir: str | None = None) -> dict[str, Any]:
    """Build a Trainer for this rank and run it to ``train.steps`` (recording a profile into
    ``profile_dir`` when given)."""
    return Trainer(cfg, groups, profile_dir=profile_dir).fit()
