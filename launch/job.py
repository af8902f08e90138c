"""Run a job with the launcher named by ``cluster.launcher``; every rank ends up in :func:`rank_main`.

    config -> launcher (local | mpi | env | ray) -> rank environment -> init_distributed
           -> rank grid + process groups -> the rank's work -> summary (from rank 0)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from moetrain.config import JobConfig, write_resolved
from moetrain.launch.attempts import attempt_number, with_restarts
from moetrain.launch.rank import JobError, rank_main, setup_groups

__all__ = ["run_job", "rank_main", "setup_groups", "JobError"]


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
        from moetrain.launch.local import LocalRanks, RankFailure

        def start(attempt: int) -> dict[str, Any]:
            env = {"PYTHONUNBUFFERED": "1", "MOETRAIN_ATTEMPT": str(attempt)}
            with LocalRanks(cfg.world_size, ranks_per_node=cfg.cluster.ranks_per_node, timeout=None,
                            collective_timeout_s=cfg.cluster.collective_timeout_s, env=env,
                            device=cfg.cluster.device) as pool:
                return pool.run(rank_main, data, profile_dir, timeout=None)[0]

        summary = with_restarts(cfg, start, (RankFailure,))
    elif launcher == "ray":
        from moetrain.launch.ray_launcher import run_ray

        summary = run_ray(cfg, data, profile_dir)
    elif launcher in ("mpi", "env"):
        import torch.distributed as dist

        from moetrain.dist.env import detect, init_distributed

        env = detect(launcher)
        init_distributed(env, cfg.cluster.device, timeout_s=cfg.cluster.collective_timeout_s)
        try:
            summary = rank_main(data, profile_dir)
        finally:
            dist.destroy_process_group()
        summary["restarts"] = attempt_number()  # torchrun --max-restarts / the scheduler restarts us
        if env.rank != 0:
            return summary
    _write_summary(summary, summary_path)
    return summary
