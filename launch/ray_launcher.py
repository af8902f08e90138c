"""``cluster.launcher=ray``: one Ray actor per rank, node-contiguous, on a running cluster or a local one.

    run_ray(cfg) -> pre-flight (address reachable, nodes x slots available)
                 -> placement group: one bundle of ``ranks_per_node`` slots per node (STRICT_SPREAD on a
                    cluster: one real node per bundle; PACK on a local instance: simulated nodes)
                 -> rank r = node·ranks_per_node + local runs in bundle ``node``: the ranks of a node
                    are contiguous and NODE_RANK is the bundle's real node
                 -> rendezvous at rank 0's node IP (a TCPStore there), gloo / NCCL groups as usual
                 -> rank_main on every actor; stdout / stderr lines prefixed ``[rank r]``
                 -> rank 0's summary back to the driver
A rank that raises, or whose actor dies (process exit, node lost), fails the attempt with a
:class:`~moetrain.launch.local.RankFailure` naming it; :func:`~moetrain.launch.attempts.with_restarts`
then starts again from the newest checkpoint, up to ``fault.max_restarts`` times.

Why actors and not Ray Train's TorchTrainer (Ray 2.60, measured on this 2-core machine): a trivial
4-worker TorchTrainer run took 30 s beyond ``ray.init`` (its controller, placement-group cleaner and
worker-group set-up), ranks 39 s in all vs about 8 s for actors; it sets MASTER_ADDR from its own
node-IP lookup and orders ranks by its own rules, both of which moetrain must control (node-contiguous
ranks, its own process groups); and ``Result.metrics`` only carries metrics reported with a
checkpoint, so the summary would need a side channel anyway. Ray's placement groups, actors, failure
detection and log streaming are used as they are.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Optional

from moetrain.config import JobConfig
from moetrain.errors import first_line
from moetrain.launch.attempts import with_restarts
from moetrain.launch.local import RankFailure, RankReport, _describe_exc
from moetrain.launch.rank import JobError, nothing_to_save, rank_main
from moetrain.launch.signals import forward_signals, stop_signals_blocked

__all__ = ["run_ray", "preflight"]

_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # a local instance binds 127.0.0.1 only
# never phone home from a training job; rank output reaches the driver as the ranks print it ("[rank r] ..."),
# without Ray's "(actor pid=..., ip=...)" prefix, its colour codes or its merging of repeated lines
_ALWAYS_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_WORKER_LOG_PREFIX": "1", "RAY_COLOR_PREFIX": "0",
               "RAY_DEDUP_LOGS": "0"}


class _Prefixed:
    """A text stream that starts every line with a rank prefix (Ray streams it to the driver)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_start:
                out.append(self.prefix)
            out.append(piece)
            self.at_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((_node_ip(), 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _interface_of(addr: str) -> Optional[str]:
    """The network interface holding address ``addr`` on this host (psutil comes with Ray), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return None


class _Rank:
    """One rank's process (a Ray actor)."""

    def __init__(self, rank: int, world: int, node: int, local: int, rpn: int, nodes: int, env: dict[str, str]):
        os.environ.update(env)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "NODE_RANK": str(node),
                           "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(rpn), "NUM_NODES": str(nodes)})
        self.rank = rank
        sys.stdout = _Prefixed(sys.stdout, f"[rank {rank}] ")
        sys.stderr = _Prefixed(sys.stderr, f"[rank {rank}] ")

    def where(self) -> dict[str, Any]:
        import ray

        return {"ip": _node_ip(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def rendezvous(self) -> tuple[str, int]:
        return _node_ip(), _free_port()

    def stop(self, signum: int) -> None:
        """The driver got SIGTERM / SIGUSR1: stop after the current step (runs beside ``run``)."""
        from moetrain.launch.signals import request_stop

        request_stop(signum)

    def run(self, data: dict, profile_dir: Optional[str], addr: str, port: int, timeout_s: float):
        """rank_main on this rank; exceptions come back as (traceback, type, message, user mistake), not
        raised, so the driver can tell user mistakes from failures."""
        import torch.distributed as dist

        from moetrain.dist.env import from_env, init_distributed

        try:
            os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port)})
            if "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo would look up the host name: use Ray's node IP
                ifname = _interface_of(_node_ip())
                if ifname:
                    os.environ["GLOO_SOCKET_IFNAME"] = ifname
            init_distributed(from_env(launcher="ray"), data["cluster"]["device"], timeout_s=timeout_s)
            try:
                return "ok", rank_main(data, profile_dir)
            finally:
                dist.destroy_process_group()
        except SystemExit as exc:
            if exc.code not in (None, 0):
                sys.stderr.flush()
                os._exit(int(exc.code) if isinstance(exc.code, int) else 1)
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the driver
            return "error", _describe_exc(exc)


# ------------------------------------------------------------------ pre-flight
def _reachable(address: str, timeout_s: float = 3.0) -> Optional[str]:
    """None if ``host:port`` accepts a TCP connection within the timeout, else why not."""
    if address.startswith("ray://"):
        address = address[len("ray://"):]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"'{address}' is not host:port"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{exc.__class__.__name__}: {exc.strerror or exc}"


def _connect(cfg: JobConfig) -> bool:
    """Connect to cfg.cluster.ray_address, or start a local instance; returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.cluster.ray_address
    if address and address != "auto":
        why = _reachable(address)
        if why:
            raise JobError(f"cluster.ray_address={address} is unreachable ({why}); start the head node with "
                           f"'ray start --head' or fix the address")
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            # something answers on that port, but it is not a Ray head (or a mismatched Ray version)
            raise JobError(f"cluster.ray_address={address} accepts connections but Ray could not join it "
                           f"({first_line(exc)}); is a Ray head of this version running there?") from None
        return True
    if address == "auto":
        try:
            ray.init(address="auto", logging_level="ERROR", log_to_driver=True)
        except ConnectionError:
            raise JobError("cluster.ray_address=auto but no running Ray instance was found on this machine; "
                           "start one with 'ray start --head', or leave cluster.ray_address unset to start "
                           "a local instance for this job") from None
        except RuntimeError as exc:  # Ray found an address (RAY_ADDRESS, or the last 'ray start') but it is dead
            raise JobError(f"cluster.ray_address=auto: Ray could not join the instance it found ({first_line(exc)}); "
                           f"check RAY_ADDRESS and 'ray status'") from None
        return True
    slots = cfg.world_size
    # the local instance's processes (GCS, raylet, workers) run in this process group: started with the stop
    # signals blocked, a SIGTERM sent to the group (systemd, scancel, kill -TERM -PGID) reaches only this driver,
    # which stops the ranks at a step boundary, instead of killing the raylet under them
    with stop_signals_blocked():
        ray.init(num_cpus=slots, num_gpus=None if cfg.cluster.device == "cuda" else 0, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=True)
    return True


def preflight(cfg: JobConfig) -> tuple[str, str]:
    """Check the connected cluster against the layout; returns (placement strategy, slot resource)."""
    import ray

    c = cfg.cluster
    slot = "GPU" if c.device == "cuda" else "CPU"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    per_node = sorted((int(n.get("Resources", {}).get(slot, 0)) for n in alive), reverse=True)
    need = f"{c.nodes} node(s) x {c.ranks_per_node} {slot} slot(s) = {cfg.world_size} ranks (tp·pp·dp = " \
           f"{cfg.parallel.tp}·{cfg.parallel.pp}·{cfg.dp})"
    have = f"the Ray cluster has {len(alive)} node(s) with {slot} {per_node}"
    if len(alive) == 1 and c.nodes > 1 and not c.ray_address:
        # a local instance: nodes are simulated as bundles on this machine
        if per_node[0] < cfg.world_size:
            raise JobError(f"the job needs {need} but {have}")
        return "PACK", slot
    usable = [n for n in per_node if n >= c.ranks_per_node]
    if len(usable) < c.nodes:
        raise JobError(f"the job needs {need} but {have}")
    return ("STRICT_SPREAD" if c.nodes > 1 else "PACK"), slot


# ------------------------------------------------------------------ one attempt
def _attempt(cfg: JobConfig, data: dict, profile_dir: Optional[str], attempt: int) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    c = cfg.cluster
    strategy, slot = preflight(cfg)
    bundle = {slot: float(c.ranks_per_node)}
    if slot == "GPU":
        bundle["CPU"] = float(c.ranks_per_node)
    pg = placement_group([dict(bundle) for _ in range(c.nodes)], strategy=strategy)
    actors: list = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=c.ray_placement_timeout_s)
        if not ready:
            raise JobError(f"Ray could not place {c.nodes} bundle(s) of {bundle} ({strategy}) within "
                           f"{c.ray_placement_timeout_s:.0f}s: too few free resources on the cluster")
        env = {"PYTHONUNBUFFERED": "1", "MOETRAIN_ATTEMPT": str(attempt)}
        if not c.ray_address:
            env.update(_LOCAL_ENV)
            env["GLOO_SOCKET_IFNAME"] = "lo"
        remote = ray.remote(_Rank)
        per_rank = {"num_cpus": 1} if slot == "CPU" else {"num_cpus": 1, "num_gpus": 1}
        for rank in range(cfg.world_size):
            node, local = divmod(rank, c.ranks_per_node)
            strat = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=node)
            # two threads: ``stop`` must run while ``run`` trains
            actors.append(remote.options(scheduling_strategy=strat, max_restarts=0, max_concurrency=2, **per_rank)
                          .remote(rank, cfg.world_size, node, local, c.ranks_per_node, c.nodes, env))
        where = ray.get([a.where.remote() for a in actors], timeout=c.ray_placement_timeout_s)
        _write_placement(cfg, attempt, where)
        addr, port = ray.get(actors[0].rendezvous.remote())
        refs = [a.run.remote(data, profile_dir, addr, port, c.collective_timeout_s) for a in actors]

        def forward(signum: int) -> None:
            for a in actors:
                a.stop.remote(signum)

        with forward_signals(forward, nothing_to_save=nothing_to_save(data)):
            results = _collect(refs, where)
        summary = results[0]
        summary["ray"] = {"nodes": [w["node_id"] for w in where], "ips": [w["ip"] for w in where]}
        return summary
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def _write_placement(cfg: JobConfig, attempt: int, where: list[dict]) -> None:
    """``logging.run_dir/ray_ranks.json``: which node, IP and process runs each rank (this attempt)."""
    import json
    from pathlib import Path

    out = Path(cfg.logging.run_dir) / "ray_ranks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"attempt": attempt, "ranks": where}, indent=1))
    os.replace(tmp, out)


def _collect(refs: list, where: list[dict]) -> list[Any]:
    """Wait for every rank; the first failure (an error result or a dead actor) fails the attempt after
    a short grace period, with a report per rank."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = {ref: r for r, ref in enumerate(refs)}
    done: dict[int, Any] = {}
    reports: dict[int, RankReport] = {}
    first_fail: Optional[float] = None
    while pending:
        if first_fail is not None and time.monotonic() - first_fail > 5.0:
            break
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            r = pending.pop(ref)
            try:
                state, value = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                reports[r] = RankReport(r, "died", f"the rank's process or node died ({where[r]['ip']}, pid "
                                                   f"{where[r]['pid']}): {exc.__class__.__name__}")
                first_fail = first_fail or time.monotonic()
                continue
            if state == "ok":
                done[r] = value
            else:
                tb, kind, message, user = value
                reports[r] = RankReport(r, "error", tb, kind, message, user)
                first_fail = first_fail or time.monotonic()
    if reports:
        for r in pending.values():
            reports[r] = RankReport(r, "hung", "still running when the job was stopped")
        failed = sorted(r for r, rep in reports.items() if rep.state in ("error", "died"))
        allrep = [reports.get(r, RankReport(r, "ok")) for r in range(len(refs))]
        lost = sorted({where[r]["ip"] for r, rep in reports.items() if rep.state == "died"})
        why = f" (node(s) lost or rank processes died: {', '.join(lost)})" if lost else ""
        raise RankFailure(f"ray job: rank(s) {failed} failed{why}", allrep)
    return [done[r] for r in range(len(refs))]


def run_ray(cfg: JobConfig, data: dict, profile_dir: Optional[str] = None) -> dict[str, Any]:
    for k, v in {**_ALWAYS_ENV, **({} if cfg.cluster.ray_address else _LOCAL_ENV)}.items():
        os.environ.setdefault(k, v)  # read by Ray when it is first imported
    import ray

    t0 = time.perf_counter()
    started = _connect(cfg)
    try:
        summary = with_restarts(cfg, lambda attempt: _attempt(cfg, data, profile_dir, attempt), (RankFailure,))
        summary["launcher_s"] = time.perf_counter() - t0
        return summary
    finally:
        if started:
            ray.shutdown()
