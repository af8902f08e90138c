"""Where this process sits in the job: rank, local rank, world size, node and rendezvous address.

Every launcher reduces to the same small contract before ``init_process_group``; one function per
launcher fills a frozen :class:`RankEnv`, and everything after process-group creation only sees that.

- ``from_env``: torchrun / torch.distributed.elastic, our own simulated local ranks, Ray Train
  workers (all set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and
  Slurm ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_NODELIST).
- ``from_mpi``: mpiexec; mpi4py is imported only here, so no other launcher initialises MPI.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moetrain.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["RankEnv", "LaunchEnvError", "from_env", "from_mpi", "detect", "free_port", "backend_for",
           "init_distributed", "rank_device"]


class LaunchEnvError(UserError, RuntimeError):
    """The launcher's environment is missing or inconsistent."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvError(f"rank {self.rank} outside world of size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchEnvError(f"local rank {self.local_rank} outside local world {self.local_world_size}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise LaunchEnvError(f"node rank {self.node_rank} outside {self.num_nodes} nodes")

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_address(peer: str) -> str:
    """This host's address on the route to ``peer`` (no packet is sent); "unknown" without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
            return s.getsockname()[0]
        except OSError:
            return "unknown"


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None:
        raise LaunchEnvError(f"environment variable {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``gpu[01-04,07],cpu1`` (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchEnvError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def from_env(environ: Mapping[str, str] | None = None, launcher: str = "env") -> RankEnv:
    """Read torchrun-style variables, falling back to Slurm's when RANK is absent."""
    e = os.environ if environ is None else environ
    if "RANK" in e:
        world = _int(e, "WORLD_SIZE")
        local_world = int(e.get("LOCAL_WORLD_SIZE", world))
        if local_world < 1 or world % local_world:
            raise LaunchEnvError(f"LOCAL_WORLD_SIZE={local_world} does not divide WORLD_SIZE={world}")
        rank = _int(e, "RANK")
        node_rank = int(e.get("NODE_RANK", e.get("GROUP_RANK", rank // local_world)))
        addr = e.get("MASTER_ADDR")
        if not addr:
            raise LaunchEnvError("environment variable MASTER_ADDR is not set")
        return RankEnv(
            rank=rank,
            world_size=world,
            local_rank=int(e.get("LOCAL_RANK", rank % local_world)),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=int(e.get("NUM_NODES", world // local_world)),
            master_addr=addr,
            master_port=_int(e, "MASTER_PORT"),
            launcher=launcher,
        )
    if "SLURM_PROCID" in e:
        world = _int(e, "SLURM_NTASKS")
        nnodes = int(e.get("SLURM_NNODES", e.get("SLURM_JOB_NUM_NODES", 1)))
        per_node = e.get("SLURM_NTASKS_PER_NODE", str(world // max(nnodes, 1))).split("(")[0]
        addr = e.get("MASTER_ADDR") or _first_slurm_host(e.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(e.get("MASTER_PORT", 29500 + int(e.get("SLURM_JOB_ID", "0")) % 1000))
        return RankEnv(
            rank=_int(e, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(e, "SLURM_LOCALID"),
            local_world_size=int(per_node),
            node_rank=int(e.get("SLURM_NODEID", 0)),
            num_nodes=nnodes,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    raise LaunchEnvError(
        "no launcher environment found: expected torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT "
        "or Slurm's SLURM_PROCID/SLURM_NTASKS (start the job with torchrun or srun, or use "
        "cluster.launcher=local)"
    )


def from_mpi() -> RankEnv:
    """Rank environment from MPI: COMM_WORLD, nodes by host name and address, rank 0's address.

    Must run under ``mpiexec ... python -m mpi4py`` so an exception on one rank aborts the job.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise LaunchEnvError(f"cluster.launcher=mpi needs mpi4py: {exc}") from None
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    # a node is a host name and the address the rank reaches MASTER_ADDR from: namespaced hosts on one
    # machine share the name (and its shared memory) but not the address
    hosts = world.allgather((socket.gethostname(), host_address(os.environ["MASTER_ADDR"])
                             if os.environ.get("MASTER_ADDR") else ""))
    order = list(dict.fromkeys(hosts))  # nodes numbered by their lowest rank
    node = order.index(hosts[rank])
    local = world.Split(color=node, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(os.environ.get("MASTER_PORT") or free_port(addr))
        rendezvous = (addr, port)
    else:
        rendezvous = None
    addr, port = world.bcast(rendezvous, root=0)
    local.Free()
    return RankEnv(
        rank=rank,
        world_size=size,
        local_rank=local_rank,
        local_world_size=local_size,
        node_rank=node,
        num_nodes=len(order),
        master_addr=addr,
        master_port=port,
        launcher="mpi",
    )


def under_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by mpiexec (checked without importing mpi4py)."""
    e = os.environ if environ is None else environ
    return any(k in e for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID"))


def detect(launcher: str) -> RankEnv:
    """The rank environment for ``cluster.launcher`` (mpi, env, or local/ray workers which set env vars)."""
    if launcher == "mpi":
        if not under_mpi():
            raise LaunchEnvError(
                "cluster.launcher=mpi but this process was not started by mpiexec; run "
                "`mpiexec -n N python -m mpi4py -m moetrain train CONFIG`"
            )
        return from_mpi()
    return from_env(launcher=launcher)


def rank_device(device: str) -> torch.device:
    """This rank's device for ``cluster.device``: its GPU by local rank on CUDA, else the CPU."""
    import torch

    if device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchEnvError(f"cluster.device=cuda but rank {os.environ.get('RANK', '?')} sees no CUDA device")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(device: str) -> str:
    """The collective backend for ``cluster.device``: NCCL between GPUs, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def init_distributed(env: RankEnv, device: str, *, timeout_s: float, store=None) -> None:
    """``init_process_group`` for this rank, the one place every launcher goes through: the backend
    follows ``device`` (on CUDA the rank's GPU is selected first, by local rank); the rendezvous is
    ``store`` when the launcher hosts one (simulated local ranks), else the env's ``tcp://`` address."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LaunchEnvError(f"cluster.device=cuda but rank {env.rank} sees no CUDA device")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    where = {"store": store} if store is not None else {"init_method": env.init_method}
    dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), **where)
