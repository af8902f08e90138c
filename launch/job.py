"""Run a job with the launcher named by ``cluster.launcher``; every rank ends up in :func:`rank_main`.

    config -> launcher (local | mpi | env | ray) -> rank environment -> init_distributed
           -> rank grid + process groups -> the rank's work -> summary (from rank 0)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from moetrain.config import JobConfig, write_resolved
from moetrain.dist.checkpoint import CheckpointError, CheckpointLock
from moetrain.launch.attempts import attempt_number, with_restarts
from moetrain.launch.preflight import check_network, check_paths
from moetrain.launch.rank import JobError, nothing_to_save, rank_main, setup_groups
from moetrain.launch.signals import JobStopped, forward_signals, watch_launcher

__all__ = ["run_job", "rank_main", "setup_groups", "JobError"]


def _write_summary(summary: dict, path: Optional[str]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, p)


def _lock(cfg: JobConfig) -> CheckpointLock | None:
    """The checkpoint directory's lock, when this job writes or resumes checkpoints there."""
    ck = cfg.checkpoint
    if not ck.dir or (not ck.every and ck.resume == "never"):
        return None
    return CheckpointLock(ck.dir, log=lambda m: print(m, flush=True))


def _locked_on_rank0(lock: CheckpointLock | None, rank: int):
    """Under torchrun / MPI every rank runs the launcher's code: rank 0 takes the lock, and every rank learns
    whether it did (so none trains, or hangs waiting, when another job holds it)."""
    import torch.distributed as dist

    why = None
    if lock is not None and rank == 0:
        try:
            lock.acquire()
        except CheckpointError as exc:
            why = str(exc)
    box = [why]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    held = contextlib.ExitStack()
    if rank == 0 and lock is not None:
        held.callback(lock.release)  # acquired above: the context only releases it
    return held


def run_job(cfg: JobConfig, summary_path: Optional[str] = None, profile_dir: Optional[str] = None,
            mode: str = "train") -> dict[str, Any]:
    """Launch ``cfg`` with its launcher and return rank 0's summary (also written to ``summary_path``);
    with ``profile_dir`` every rank records its trace and metrics there (``moetrain profile``); ``mode``
    ``eval``: the ranks evaluate the checkpoint instead of training (``moetrain eval``)."""
    check_network(cfg)
    check_paths(cfg, summary_path)
    write_resolved(cfg, cfg.logging.run_dir)
    os.environ.setdefault("MOETRAIN_JOB_START", repr(time.time()))  # train.time_limit counts from here
    data = cfg.model_dump(mode="json")
    data["_mode"] = mode
    launcher = cfg.cluster.launcher
    if launcher in ("local", "ray"):
        lock = _lock(cfg)
        with lock if lock is not None else contextlib.nullcontext():
            summary = _launch(cfg, data, profile_dir)
    else:
        import torch.distributed as dist

        from moetrain.dist.env import detect, init_distributed

        env = detect(launcher)
        os.environ["NODE_RANK"] = str(env.node_rank)  # the node map reads it (MPI finds it only in from_mpi)
        watch_launcher(os.getppid())  # torchrun's agent, mpiexec's proxy, slurmstepd: gone -> this rank ends
        init_distributed(env, cfg.cluster.device, timeout_s=cfg.cluster.collective_timeout_s)
        try:
            with _locked_on_rank0(_lock(cfg), env.rank):
                summary = rank_main(data, profile_dir)
            # every rank past its last collective before any tears gloo down: rank 0 once aborted in CI
            # ("terminate called without an active exception") at the end of a 2-rank torchrun job
            dist.barrier()
        finally:
            dist.destroy_process_group()
        summary["restarts"] = attempt_number()  # torchrun --max-restarts / the scheduler restarts us
        if env.rank != 0:
            return summary
    _write_summary(summary, summary_path)
    return summary


def _launch(cfg: JobConfig, data: dict[str, Any], profile_dir: Optional[str]) -> dict[str, Any]:
    """Start the ranks of a local or Ray job (this process is the launcher, not a rank)."""
    if cfg.cluster.launcher == "local":
        from moetrain.launch.local import LocalRanks, RankFailure

        def start(attempt: int) -> dict[str, Any]:
            env = {"PYTHONUNBUFFERED": "1", "MOETRAIN_ATTEMPT": str(attempt),
                   "MOETRAIN_JOB_START": os.environ["MOETRAIN_JOB_START"]}
            pool = LocalRanks(cfg.world_size, ranks_per_node=cfg.cluster.ranks_per_node, timeout=None,
                              collective_timeout_s=cfg.cluster.collective_timeout_s, env=env,
                              device=cfg.cluster.device, hosts=hosts)
            with pool, forward_signals(pool.signal_ranks, nothing_to_save=nothing_to_save(data)) as stop:
                try:
                    return pool.run(rank_main, data, profile_dir, timeout=None)[0]
                except RankFailure:
                    if stop.signum is not None:  # ranks killed by the signal before they could handle it
                        raise JobStopped(stop.signum, "while the ranks were starting") from None
                    raise

        hosts = None
        if cfg.network.isolation == "netns":  # one namespaced host per node, for the whole job
            from moetrain.dist.netns import NetHosts

            # inter.bandwidth_gbps is per rank (one NIC per GPU, as on rail-optimised nodes): a host's link
            # carries ranks_per_node times that
            hosts = NetHosts(cfg.cluster.nodes, bandwidth_gbps=cfg.network.inter.bandwidth_gbps
                             * cfg.cluster.ranks_per_node)
        if hosts is None:
            return with_restarts(cfg, start, (RankFailure,))
        with hosts:  # made here, removed however the job ends
            summary = with_restarts(cfg, start, (RankFailure,))
        summary["network"] = {"isolation": "netns", "hosts": hosts.addrs, "namespaces": hosts.names}
        return summary
    from moetrain.launch.ray_launcher import run_ray

    return run_ray(cfg, data, profile_dir)
