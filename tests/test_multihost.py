"""Real multi-host launches on namespaced hosts (each its own network namespace and address, joined by a
bridge): torchrun's c10d rendezvous, mpiexec (Hydra through an ssh stand-in), and a Ray cluster of one
head and two workers; each job's losses equal the local launcher's (float64). On the Ray cluster, drills:
a whole host killed mid-step, and a host's cable pulled mid-collective, with and without a spare host.
Timings of the drills are printed (``-s``) and recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moetrain.dist import netns
from moetrain.dist.netns import NetHosts

ROOT = Path(__file__).resolve().parents[1]
WHY = netns.unavailable_reason()
pytestmark = [pytest.mark.launcher, pytest.mark.skipif(WHY is not None, reason=WHY or ""),
              pytest.mark.timeout(420)]

CONFIG = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
SMALL = ["parallel.tp=2", "parallel.ep=2", "moe.num_experts=4", "parallel.sp=false", "model.layers=2",
         "model.d_model=32", "model.d_ffn=64", "model.seq_len=16", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.dtype=float64", "logging.every=1", "cluster.nodes=2",
         "cluster.ranks_per_node=2", "train.warmup_steps=1", "train.steps=4"]
# the hosts have no DNS: c10d's reverse lookups of peers only warn; Ray's token auth off on every host alike
ENV = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
PY = sys.executable
RAY = str(Path(PY).with_name("ray"))
MPIEXEC = str(Path(PY).with_name("mpiexec"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the local launcher's run of the same job on loopback."""
    from moetrain.config import load_config
    from moetrain.launch.job import run_job

    tmp = tmp_path_factory.mktemp("local")
    return run_job(load_config(CONFIG, SMALL + [f"logging.run_dir={tmp}"]))


@pytest.fixture(scope="module")
def hosts():
    with NetHosts(3) as h:
        yield h


def _run(hosts: NetHosts, host: int, argv: list[str], timeout: float, env=None) -> subprocess.Popen:
    return subprocess.Popen(hosts.exec_argv(host, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env or ENV)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0] + "\n<timed out>")
    for p in procs:
        assert p.returncode == 0, "\n=====\n".join(o[-3000:] for o in outs)
    return outs


def _check(summary: dict, local: dict) -> None:
    assert summary["losses"] == pytest.approx(local["losses"], rel=1e-9, abs=0)
    assert summary["grad_norms"] == pytest.approx(local["grad_norms"], rel=1e-9, abs=0)
    # node ids follow the real hosts: ranks share a node id exactly when they ran on one host
    pairs = set(zip(summary["node_of_rank"], summary["host_of_rank"]))
    assert len(pairs) == 2 and len({n for n, _ in pairs}) == 2 and len({h for _, h in pairs}) == 2
    assert all(h.startswith(netns.SUBNET + ".") for h in summary["host_of_rank"])


def test_torchrun_c10d_rendezvous_across_hosts(hosts, local_run, tmp_path):
    # Once in seven runs (in a full CI run), one host's torchrun agent has exited with code 1
    # after training finished and the other agent then waits out its 300 s exit barrier. The cause is not
    # known yet. The job gets one more try on a fresh rendezvous, and the first failure is printed.
    for attempt in (0, 1):
        procs = []
        for k in (0, 1):
            argv = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend",
                    "c10d", "--rdzv-endpoint", f"{hosts.addrs[0]}:{29400 + attempt}", "--rdzv-id", f"mh{attempt}",
                    "--rdzv-conf", f"is_host={int(k == 0)}", "--local-addr", hosts.addrs[k], "-m", "moetrain", "train",
                    CONFIG, *SMALL, "cluster.launcher=env", f"logging.run_dir={tmp_path / f'h{k}'}", "--summary",
                    str(tmp_path / "s.json")]
            procs.append(_run(hosts, k, argv, 300, env={**ENV, "GLOO_SOCKET_IFNAME": netns.IFNAME}))
        try:
            _finish(procs, 120)
            break
        except AssertionError as exc:
            if attempt:
                raise
            print(f"\n[torchrun across hosts] first try failed, trying once more:\n{exc}")
            for k in (0, 1):
                hosts.kill_host(k)
    _check(json.loads((tmp_path / "s.json").read_text()), local_run)


def test_mpiexec_across_hosts(hosts, local_run, tmp_path):
    """Hydra starts one proxy per host through tests/helpers/netns_ssh.py (an ssh into the namespace)."""
    env = {**ENV, "MOETRAIN_NETNS_HOSTS": ",".join(f"{a}={n}" for a, n in zip(hosts.addrs, hosts.names))}
    argv = [MPIEXEC, "-launcher", "ssh", "-launcher-exec", str(ROOT / "tests/helpers/netns_ssh.py"), "-iface",
            netns.IFNAME, "-hosts", ",".join(hosts.addrs[:2]), "-n", "4", "-ppn", "2",
            "-genv", "MASTER_ADDR", hosts.addrs[0], "-genv", "GLOO_SOCKET_IFNAME", netns.IFNAME,
            PY, "-m", "mpi4py", "-m", "moetrain", "train", CONFIG, *SMALL, "cluster.launcher=mpi",
            f"logging.run_dir={tmp_path}", "--summary", str(tmp_path / "s.json")]
    _finish([_run(hosts, 0, argv, 300, env=env)], 300)
    _check(json.loads((tmp_path / "s.json").read_text()), local_run)


# ------------------------------------------------------------------ Ray
# real hosts: Ray's multi-node mode (conftest's 0 keeps test-local instances on 127.0.0.1), fast node-death checks
RAY_ENV = {**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


class RayCluster:
    """A Ray head on host 0 and a raylet on each other host, each with its own temp dir (log streaming)."""

    def __init__(self, hosts: NetHosts, tmp: Path, cpus: int = 2):
        self.hosts, self.tmp, self.cpus = hosts, tmp, cpus
        self.address = f"{hosts.addrs[0]}:6379"

    def start(self, host: int) -> None:
        common = ["--node-ip-address", self.hosts.addrs[host], "--num-cpus", str(self.cpus), "--disable-usage-stats",
                  "--temp-dir", str(self.tmp / f"ray{host}")]
        head = ["--head", "--port", "6379", "--include-dashboard", "false"] if host == 0 else \
            ["--address", self.address]
        out = subprocess.run(self.hosts.exec_argv(host, [RAY, "start", *head, *common]), capture_output=True,
                             text=True, env=RAY_ENV, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]

    def alive(self) -> int:
        code = (f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run(self.hosts.exec_argv(0, [PY, "-c", code]), capture_output=True, text=True,
                             env=RAY_ENV, timeout=120)
        # Ray may print its own warnings on stdout too (seen right after a node died): read the marked line
        counts = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("ALIVE ")]
        return counts[-1] if counts else -1

    def wait_alive(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() != n:
            assert time.monotonic() < deadline, f"the Ray cluster did not reach {n} live nodes"
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_cluster(hosts, tmp_path_factory):
    cluster = RayCluster(hosts, tmp_path_factory.mktemp("ray"))
    try:
        for k in range(hosts.count):
            cluster.start(k)
        cluster.wait_alive(hosts.count)
        yield cluster
    finally:
        for k in range(hosts.count):
            hosts.kill_host(k)


def _ray_job(cluster: RayCluster, run_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [PY, "-m", "moetrain", "train", CONFIG, *SMALL, "cluster.launcher=ray",
            f"cluster.ray_address={cluster.address}", f"logging.run_dir={run_dir}", "--summary",
            str(run_dir / "s.json"), *extra]
    return _run(cluster.hosts, 0, argv, 300, env=RAY_ENV)


def test_ray_cluster_across_hosts(ray_cluster, local_run, tmp_path):
    out = _finish([_ray_job(ray_cluster, tmp_path)], 300)[0]
    summary = json.loads((tmp_path / "s.json").read_text())
    _check(summary, local_run)
    assert summary["ray"]["ips"] == summary["host_of_rank"]  # Ray's node IPs are the hosts the ranks used
    assert out.count("] step     2/4 |") == 1 and out.count("done: 4 steps") == 1  # one log stream per host


def _watch(proc: subprocess.Popen, lines: list[tuple[float, str]]) -> threading.Thread:
    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _victim(run_dir: Path, head: str) -> str:
    ips = [r["ip"] for r in json.loads((run_dir / "ray_ranks.json").read_text())["ranks"]]
    return next(ip for ip in ips if ip != head)


def _drill(cluster: RayCluster, tmp_path: Path, local: dict | None, action: str, restarts: int, timeout_s: int,
           placement_s: int = 20):
    """Run the Ray job, do ``action`` (kill | cut) to a non-head host with ranks once step 2's checkpoint is
    written (rank 0 stalls at step 3 on the first attempt, so the job is mid-step then), and time it."""
    ck = tmp_path / "ck"
    proc = _ray_job(cluster, tmp_path, f"checkpoint.dir={ck}", "checkpoint.every=1",
                    f"fault.max_restarts={restarts}", "fault.inject={rank: 0, step: 3, kind: hang}",
                    f"cluster.collective_timeout_s={timeout_s}", f"cluster.ray_placement_timeout_s={placement_s}")
    lines: list[tuple[float, str]] = []
    reader = _watch(proc, lines)
    deadline = time.monotonic() + 240
    while not (ck / "step_00000002").is_dir():
        assert time.monotonic() < deadline and proc.poll() is None, "".join(x for _, x in lines)[-3000:]
        time.sleep(0.1)
    host = cluster.hosts.host_of(_victim(tmp_path, cluster.hosts.addrs[0]))
    t_action = time.monotonic()
    if action == "kill":
        cluster.hosts.kill_host(host)
    else:
        cluster.hosts.set_link(host, up=False)
    proc.wait(360)
    reader.join(10)
    text = "".join(x for _, x in lines)
    failed_at = next((t for t, x in lines if "[moetrain] attempt 1 failed" in x), None)
    resumed_at = next((t for t, x in lines if failed_at and t > failed_at and "] step     3/4" in x), None)
    times = {"action": action, "detect_s": (failed_at or time.monotonic()) - t_action,
             "first_step_after_s": resumed_at - t_action if resumed_at else None, "exit_s": time.monotonic() - t_action}
    print(f"\n[drill] {action} host {cluster.hosts.addrs[host]} (restarts={restarts}): {times}")
    if action == "cut":
        subprocess.run(["ip", "-n", cluster.hosts.switch, "link", "set", f"h{host}", "up"], check=False)
    cluster.hosts.kill_host(host)  # a cut host's raylet and ranks are gone for good
    return proc.returncode, text, times, host


# a killed host is also the no-spare drill's; the default suite drills the cut link here
@pytest.mark.parametrize("action", [pytest.param("kill", marks=pytest.mark.slow), "cut"])
def test_ray_host_lost_mid_step_resumes_on_the_spare(ray_cluster, local_run, tmp_path, action):
    code, text, times, host = _drill(ray_cluster, tmp_path, local_run, action, restarts=1, timeout_s=20)
    lost = ray_cluster.hosts.addrs[host]
    ray_cluster.start(host)  # the host comes back for the next test
    ray_cluster.wait_alive(ray_cluster.hosts.count)
    assert code == 0, text[-4000:]
    assert f"node(s) lost or rank processes died: {lost})" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from"].endswith("step_00000002")
    assert summary["losses"] == pytest.approx(local_run["losses"], rel=1e-9, abs=0)
    assert lost not in summary["ray"]["ips"]  # the second attempt ran on the head and the spare
    assert times["detect_s"] < 20 + 15


def test_ray_host_lost_without_spare_fails_naming_it(ray_cluster, tmp_path):
    """Two hosts for a two-node job: the lost host cannot be replaced, and the error says which it was."""
    spare = ray_cluster.hosts.count - 1
    ray_cluster.hosts.kill_host(spare)
    ray_cluster.wait_alive(ray_cluster.hosts.count - 1)
    code, text, times, host = _drill(ray_cluster, tmp_path, None, "kill", restarts=1, timeout_s=20, placement_s=8)
    for k in (host, spare):
        ray_cluster.start(k)
    ray_cluster.wait_alive(ray_cluster.hosts.count)
    assert code != 0
    assert f"node(s) lost or rank processes died: {ray_cluster.hosts.addrs[host]})" in text, text[-3000:]
    # the restart finds too few nodes: at pre-flight, or (when Ray still lists the lost node) at placement
    assert ("but the Ray cluster has 1 node(s)" in text or "Ray could not place 2 bundle(s)" in text), text[-3000:]
    assert times["exit_s"] < 20 + 60
