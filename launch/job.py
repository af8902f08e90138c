"""Run a job with the launcher named by ``cluster.launcher``; every rank ends up in :func:`rank_main`.

    config -> launcher (local | mpi | env | ray) -> rank environment -> init_process_group
           -> rank grid + process groups -> the rank's work -> summary (from rank 0)
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from launch.config import JobConfig, config_from_dict, write_resolved

__all__ = ["run_job", "rank_main", "JobError", "USER_ERRORS"]


class JobError(RuntimeError):
    """The job could not start or run for a reason the user can act on."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from dist.checkpoint import CheckpointError
    from dist.env import LaunchEnvError
    from launch.data import DataError
    from launch.trainer import TrainError

    return (JobError, LaunchEnvError, CheckpointError, DataError, TrainError)


def _init_distributed(cfg: JobConfig, env) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if cfg.cluster.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=cfg.cluster.collective_timeout_s))


def rank_main(cfg_data: dict[str, Any], profile_dir: Optional[str] = None) -> dict[str, Any]:
    """Everything one rank does, launcher-agnostic. Returns this rank's summary."""
    from launch.trainer import train

    cfg = config_from_dict(cfg_data, check=False)
    return train(cfg, setup_groups(cfg), profile_dir=profile_dir)


def setup_groups(cfg: JobConfig):
    """Rank grid and process groups for ``cfg`` on the running world (collective)."""
    import torch.distributed as dist

    from dist.groups import create_groups
    from dist.topology import Layout, build_rank_grid

    if dist.get_world_size() != cfg.world_size:
        raise JobError(
            f"the launcher started {dist.get_world_size()} ranks but the config needs {cfg.world_size} "
            f"(cluster.nodes={cfg.cluster.nodes} x cluster.ranks_per_node={cfg.cluster.ranks_per_node})"
        )
    layout = Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.dp, ep=cfg.parallel.ep, etp=cfg.parallel.etp)
    node_of = _gather_node_map()
    return create_groups(build_rank_grid(layout, node_of=node_of))


def _gather_node_map() -> list[int]:
    """Each rank's node id, from NODE_RANK (set by every launcher we support) gathered over the world."""
    import torch.distributed as dist

    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    out: list[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, node)
    return [int(n) for n in out]  # type: ignore[arg-type]


def _write_summary(summary: dict, path: Optional[str]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, p)


def run_job(cfg: JobConfig, summary_path: Optional[str] = None, profile_dir: Optional[str] = None) -> dict[str, Any]:
    """Launch ``cfg`` with its launcher and return rank 0's summary (also written to ``summary_path``);
    with ``profile_dir`` every rank records its trace and metrics there (``moetrain profile``)."""
    write_resolved(cfg, cfg.logging.run_dir)
    data = cfg.model_dump(mode="json")
    launcher = cfg.cluster.launcher
    if launcher == "local":
        from launch.local import LocalRanks

        env = {"PYTHONUNBUFFERED": "1"}
        with LocalRanks(cfg.world_size, ranks_per_node=cfg.cluster.ranks_per_node, timeout=None,
                        collective_timeout_s=cfg.cluster.collective_timeout_s, env=env) as pool:
            summary = pool.run(rank_main, data, profile_dir, timeout=None)[0]
    elif launcher in ("mpi", "env"):
        from dist.env import detect

        env = detect(launcher)
        _init_distributed(cfg, env)
        import torch.distributed as dist

        try:
            summary = rank_main(data, profile_dir)
        finally:
            dist.destroy_process_group()
        if env.rank != 0:
            return summary
    else:
        raise JobError("cluster.launcher=ray is not available yet in this build (see the Ray launcher issue)")
    _write_summary(summary, summary_path)
    return summary


USER_ERRORS = _user_errors()
