"""Run a job with the launcher named by ``cluster.launcher``; every rank ends up in :func:`rank_main`.

    config -> launcher (local | mpi | env | ray) -> rank environment -> init_process_group
           -> rank grid + process groups -> the rank's work -> summary (from rank 0)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from moetrain.launch.config import JobConfig, config_from_dict, write_resolved

__all__ = ["run_job", "rank_main", "JobError", "USER_ERRORS", "attempt_number"]


class JobError(RuntimeError):
    """The job could not start or run for a reason the user can act on."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from moetrain.dist.checkpoint import CheckpointError
    from moetrain.dist.env import LaunchEnvError
    from moetrain.launch.data import DataError
    from moetrain.launch.trainer import TrainError
    from moetrain.moe.kernels import KernelError

    return (JobError, LaunchEnvError, CheckpointError, DataError, TrainError, KernelError)


def _init_distributed(cfg: JobConfig, env) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if cfg.cluster.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=cfg.cluster.collective_timeout_s))


def rank_main(cfg_data: dict[str, Any], profile_dir: Optional[str] = None) -> dict[str, Any]:
    """Everything one rank does, launcher-agnostic. Returns this rank's summary."""
    from moetrain.launch.trainer import train

    cfg = config_from_dict(cfg_data, check=False)
    groups = setup_groups(cfg)
    summary = train(cfg, groups, profile_dir=profile_dir)
    summary["node_of_rank"] = [groups.grid.node_of(r) for r in range(cfg.world_size)]
    return summary


def setup_groups(cfg: JobConfig):
    """Rank grid and process groups for ``cfg`` on the running world (collective)."""
    import torch.distributed as dist

    from moetrain.dist.groups import create_groups
    from moetrain.dist.topology import Layout, build_rank_grid

    if dist.get_world_size() != cfg.world_size:
        raise JobError(
            f"the launcher started {dist.get_world_size()} ranks but the config needs {cfg.world_size} "
            f"(cluster.nodes={cfg.cluster.nodes} x cluster.ranks_per_node={cfg.cluster.ranks_per_node})"
        )
    layout = Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.dp, ep=cfg.parallel.ep, etp=cfg.parallel.etp)
    node_of = _gather_node_map()
    if cfg.cluster.device == "cuda":
        node_of = _nvlink_islands(node_of)
    return create_groups(build_rank_grid(layout, node_of=node_of),
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


def _write_summary(summary: dict, path: Optional[str]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, p)


def attempt_number() -> int:
    """Which start of the job this process belongs to: 0 first, k after k restarts (ours or torchrun's)."""
    return int(os.environ.get("MOETRAIN_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _is_user_error(exc: BaseException) -> bool:
    from moetrain.launch.local import RankFailure

    if isinstance(exc, USER_ERRORS):
        return True
    names = {f"{e.__module__}.{e.__qualname__}" for e in USER_ERRORS}
    return isinstance(exc, RankFailure) and bool(exc.errors_of_type(names))


def _with_restarts(cfg: JobConfig, start: Callable[[int], dict[str, Any]], retry_on: tuple) -> dict[str, Any]:
    """Run ``start(attempt)``; when ranks fail (not a user mistake), start again, up to
    ``fault.max_restarts`` times, resuming from the newest complete checkpoint. ``restarts`` in the
    summary counts them."""
    attempt = 0
    failures: list[float] = []
    while True:
        t0 = time.perf_counter()
        try:
            summary = start(attempt)
            summary["restarts"] = attempt
            summary["failures_wall"] = failures  # when each failed attempt was given up (time.time())
            return summary
        except retry_on as exc:
            if _is_user_error(exc) or attempt >= cfg.fault.max_restarts:
                raise
            failures.append(time.time())
            attempt += 1
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            print(f"[moetrain] attempt {attempt} failed after {time.perf_counter() - t0:.1f}s ({first}); "
                  f"restart {attempt}/{cfg.fault.max_restarts} from the newest checkpoint in {cfg.checkpoint.dir}",
                  file=sys.stderr, flush=True)


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
                            collective_timeout_s=cfg.cluster.collective_timeout_s, env=env) as pool:
                return pool.run(rank_main, data, profile_dir, timeout=None)[0]

        summary = _with_restarts(cfg, start, (RankFailure,))
    elif launcher == "ray":
        from moetrain.launch.ray_launcher import run_ray

        summary = run_ray(cfg, data, profile_dir)
    elif launcher in ("mpi", "env"):
        from moetrain.dist.env import detect

        env = detect(launcher)
        _init_distributed(cfg, env)
        import torch.distributed as dist

        try:
            summary = rank_main(data, profile_dir)
        finally:
            dist.destroy_process_group()
        summary["restarts"] = attempt_number()  # torchrun --max-restarts / the scheduler restarts us
        if env.rank != 0:
            return summary
    _write_summary(summary, summary_path)
    return summary


USER_ERRORS = _user_errors()
