"""What every rank does once its launcher has started it: rank grid, process groups, training.

    rank_main: node map (all_gather of NODE_RANK) -> rank grid -> process groups -> train -> summary
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

from moetrain.config import JobConfig, config_from_dict
from moetrain.dist.groups import ParallelGroups
from moetrain.errors import UserError

__all__ = ["rank_main", "setup_groups", "JobError"]


class JobError(UserError, RuntimeError):
    """The job could not start or run for a reason the user can act on."""


def nothing_to_save(cfg_data: dict[str, Any]) -> Optional[str]:
    """For a launcher's :class:`~moetrain.launch.signals.forward_signals`: what a stop signal interrupts when
    it may end the job at once (an evaluation, which saves nothing), else None."""
    return "during the evaluation" if cfg_data.get("_mode") == "eval" else None


def rank_main(cfg_data: dict[str, Any], profile_dir: Optional[str] = None) -> dict[str, Any]:
    """Everything one rank does, launcher-agnostic. Returns this rank's summary. SIGTERM / SIGUSR1 received
    meanwhile stop the run after the current step (launch/signals.py). ``cfg_data`` is the resolved config;
    its key ``_mode`` (set by :func:`moetrain.launch.job.run_job`) says ``train`` or ``eval``."""
    from moetrain.launch.signals import StopRequests
    from moetrain.launch.trainer import evaluate_run, train

    cfg_data = dict(cfg_data)
    mode = cfg_data.pop("_mode", "train")
    cfg = config_from_dict(cfg_data, check=False, hf=False)
    if cfg.cluster.device == "cpu" and cfg.cluster.keep_freed_memory:
        from moetrain.launch.host_memory import keep_freed_memory

        keep_freed_memory()
    with StopRequests() as stop:
        groups = setup_groups(cfg)
        if mode == "eval":
            summary = evaluate_run(cfg, groups, stop=stop)
        else:
            summary = train(cfg, groups, profile_dir=profile_dir, stop=stop)
    summary["node_of_rank"] = [groups.grid.node_of(r) for r in range(cfg.world_size)]
    summary["host_of_rank"] = _gather_host_addresses()
    return summary


def _gather_host_addresses() -> list[str]:
    """Each rank's address on the route to the rendezvous host: which real host it ran on."""
    import torch.distributed as dist

    out: list[Optional[str]] = [None] * dist.get_world_size()
    from moetrain.dist.env import host_address

    dist.all_gather_object(out, host_address(os.environ.get("MASTER_ADDR", "127.0.0.1")))
    return [str(a) for a in out]


def setup_groups(cfg: JobConfig) -> ParallelGroups:
    """Rank grid and process groups for ``cfg`` on the running world (collective)."""
    import torch.distributed as dist

    from moetrain.dist.groups import create_groups
    from moetrain.dist.topology import build_rank_grid

    if dist.get_world_size() != cfg.world_size:
        raise JobError(
            f"the launcher started {dist.get_world_size()} ranks but the config needs {cfg.world_size} "
            f"(cluster.nodes={cfg.cluster.nodes} x cluster.ranks_per_node={cfg.cluster.ranks_per_node})"
        )
    node_of = _gather_node_map()
    if cfg.cluster.device == "cuda":
        node_of = _nvlink_islands(node_of)
    return create_groups(build_rank_grid(cfg.layout, node_of=node_of),
                         timeout=timedelta(seconds=cfg.cluster.collective_timeout_s))


def _gather_node_map() -> list[int]:
    """Each rank's node id, from NODE_RANK (set by every launcher we support) gathered over the world."""
    import torch.distributed as dist

    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    out: list[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, node)
    return [int(n) for n in out]  # type: ignore[arg-type]


def _nvlink_islands(node_of: list[int]) -> list[int]:
    """On GPU nodes, "intra-node" groups follow NVLink connectivity found through NVML (collective)."""
    import torch
    import torch.distributed as dist

    from moetrain.launch.gpu_monitor import GpuMonitor, nvlink_node_map

    local = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    mon = GpuMonitor.create(torch.device("cuda", local))
    links: list = [None] * dist.get_world_size()
    dist.all_gather_object(links, mon.island() if mon is not None else None)
    return nvlink_node_map(node_of, links)
