"""moetrain: distributed training for Mixture-of-Experts and large transformers on PyTorch.

The repository's top-level folders install as subpackages of this one import name:
``moetrain.dist`` (runtime), ``moetrain.moe`` (MoE layer), ``moetrain.parallel`` (model parallelism),
``moetrain.launch`` (CLI and launchers) and ``moetrain.models`` (model families).

What a script uses::

    import moetrain

    cfg = moetrain.load_config("cluster_configs/sim_cpu_8rank.yaml", ["train.steps=20"])
    moetrain.model_facts(cfg).flops_per_token      # parameters and FLOPs, no torch needed
    summary = moetrain.train(cfg)                  # the job, with cfg.cluster.launcher
    one = moetrain.load_config(None, ["moe.num_experts=4"])
    model = moetrain.build_model(one)              # the whole model in this process (a one-rank layout)
    loss = model(tokens_BS, targets_BS)

Pluggable parts (model families, routers, dispatch algorithms) are named in :mod:`moetrain.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetrain.config import ConfigError, JobConfig, load_config
from moetrain.errors import UserError
from moetrain.registry import DISPATCHERS, MODEL_FAMILIES, ROUTERS

if TYPE_CHECKING:
    from torch import nn

    from moetrain.dist.groups import ParallelGroups
    from moetrain.models.spec import ModelFacts

__all__ = ["load_config", "JobConfig", "ConfigError", "UserError", "model_facts", "build_model", "train",
           "MODEL_FAMILIES", "ROUTERS", "DISPATCHERS", "__version__"]
__version__ = "0.1.0"


def model_facts(cfg: JobConfig) -> ModelFacts:
    """Total / active parameters and training FLOPs per token of the model ``cfg`` describes."""
    from moetrain.models.spec import get_model_spec

    return get_model_spec(cfg).facts()


def build_model(cfg: JobConfig, groups: ParallelGroups | None = None, device: str = "cpu") -> nn.Module:
    """This rank's part of the model: its pipeline chunk (a module per virtual stage, wrapped in one module
    when there are several). ``groups``: this rank's process groups (``moetrain.launch.rank.setup_groups``
    after ``init_process_group``); None builds the whole model in this process (a layout of one rank)."""
    import torch

    from moetrain.dist.groups import single_rank_groups
    from moetrain.models.spec import BuildContext, get_model_spec
    from moetrain.moe.runtime import MoERuntime
    from moetrain.parallel.pipeline import ModelChunks

    if groups is None:
        if cfg.layout.world_size != 1:
            raise ValueError(f"without process groups the layout must be one rank, got tp*pp*dp = "
                             f"{cfg.layout.world_size}: pass groups, or set parallel and cluster sizes to 1")
        groups = single_rank_groups()
    spec = get_model_spec(cfg)
    stages = spec.stage_layers()
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    chunks = spec.build(BuildContext(groups, torch.device(device), dtype, tuple(stages),
                                     MoERuntime(aux_scale=1.0 / cfg.grad_accum_steps)))
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)


def train(cfg: JobConfig, summary_path: str | None = None) -> dict[str, Any]:
    """Run the job with ``cfg.cluster.launcher`` and return rank 0's summary (also written to ``summary_path``)."""
    from moetrain.launch.job import run_job

    return run_job(cfg, summary_path)
