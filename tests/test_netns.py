"""Simulated nodes as real hosts (``network.isolation=netns``): namespaces, shaped links, cleanup, and the
local launcher's job on them equal to the loopback run. Skipped, with the reason, where namespaces cannot
be made (not root, no iproute2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moetrain.dist import netns
from moetrain.dist.netns import NetHosts, NetnsError

ROOT = Path(__file__).resolve().parents[1]
WHY = netns.unavailable_reason()
pytestmark = [pytest.mark.skipif(WHY is not None, reason=WHY or ""), pytest.mark.timeout(300)]

SMALL = ["parallel.tp=2", "parallel.ep=2", "moe.num_experts=4", "parallel.sp=false", "model.layers=2",
         "model.d_model=32", "model.d_ffn=64", "model.seq_len=16", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.dtype=float64", "logging.every=1000", "cluster.nodes=2",
         "cluster.ranks_per_node=2", "cluster.collective_timeout_s=30", "train.warmup_steps=1", "train.steps=4"]


def ours() -> list[str]:
    """Namespaces made by this test process (by the name prefix every job namespace carries)."""
    return [n for n in netns.list_netns() if n.startswith(f"{netns.PREFIX}{os.getpid()}x")]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert ours() == []


def _in_ns(name: str, fn, *args):
    """Run ``fn`` in a thread that has entered namespace ``name`` (setns is per thread)."""
    box: dict = {}

    def body():
        try:
            netns.enter_netns(name)
            box["out"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            box["exc"] = exc

    t = threading.Thread(target=body)
    t.start()
    return t, box


def _send(addr: str, port: int, nbytes: int) -> float:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    chunk = b"x" * (1 << 20)
    t0 = time.perf_counter()
    with conn:
        for _ in range(nbytes >> 20):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the receiver closes after it has read everything
    return time.perf_counter() - t0


def _receive(addr: str, port: int) -> int:
    with socket.socket() as s:
        s.bind((addr, port))
        s.listen()
        conn, _ = s.accept()
        got = 0
        with conn:
            while chunk := conn.recv(1 << 20):
                got += len(chunk)
        return got


def test_hosts_are_isolated_addressed_shaped_and_removed():
    with NetHosts(2, bandwidth_gbps=0.05) as hosts:  # 50 MB/s each way
        assert hosts.addrs == ["10.77.0.1", "10.77.0.2"] and sorted(ours()) == sorted([*hosts.names, hosts.switch])
        for name in hosts.names:  # the subnet and loopback only: no route out of the job's hosts
            routes = subprocess.run(["ip", "-n", name, "route", "show", "table", "all"], capture_output=True,
                                    text=True, check=True).stdout
            assert "default" not in routes and "10.77.0.0/24 dev eth0" in routes
            qdisc = subprocess.run(["tc", "-n", name, "qdisc", "show", "dev", "eth0"], capture_output=True,
                                   text=True, check=True).stdout
            assert "tbf" in qdisc and "rate 400Mbit" in qdisc
        # this (root) namespace has none of the job's addresses or links
        assert "10.77.0." not in subprocess.run(["ip", "addr"], capture_output=True, text=True).stdout
        # a 20 MB transfer from host 0 to host 1 takes the shaped time (0.4 s at 50 MB/s), not loopback's
        server, got = _in_ns(hosts.names[1], _receive, hosts.addrs[1], 5001)
        client, took = _in_ns(hosts.names[0], _send, hosts.addrs[1], 5001, 20 << 20)
        client.join(60)
        server.join(60)
        assert "exc" not in got and "exc" not in took, (got, took)
        assert got["out"] == 20 << 20
        rate = (20 << 20) / took["out"] / 1e6
        assert 25 < rate < 55, f"{rate:.1f} MB/s through a 50 MB/s link"
        assert hosts.tx_bytes(0) > 20 << 20  # it crossed host 0's veth
        # the cable pulled at the switch: nothing gets through
        hosts.set_link(1, up=False)
        server, got = _in_ns(hosts.names[1], _receive, hosts.addrs[1], 5002)
        client, took = _in_ns(hosts.names[0], lambda: socket.create_connection((hosts.addrs[1], 5002), timeout=1))
        client.join(10)
        assert isinstance(took.get("exc"), OSError)
        hosts.set_link(1, up=True)
        _in_ns(hosts.names[0], _send, hosts.addrs[1], 5002, 1 << 20)[0].join(30)  # lets the server end
        server.join(30)


def test_leftovers_of_a_killed_launcher_are_removed_at_the_next_start():
    code = ("import os, signal; from moetrain.dist.netns import NetHosts; h = NetHosts(2).create(); "
            "print(' '.join(h.names + [h.switch]), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == -signal.SIGKILL
    left = out.stdout.split()
    assert len(left) == 3 and set(left) <= set(netns.list_netns())
    with NetHosts(1):  # any new job's start cleans up after the dead one
        assert not set(left) & set(netns.list_netns())


def test_not_available_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match=r"^network.isolation=netns needs root \(ip netns, veth, tc\); this "
                                         r"process is not root$"):
        NetHosts(2).create()
    from moetrain.launch.cli import main

    run_dir = tmp_path / "run"  # the job fails before it writes anything
    for cmd in ("validate", "train"):
        assert main([cmd, str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "network.isolation=netns",
                     f"logging.run_dir={run_dir}"]) != 0
        assert capsys.readouterr().err.strip() == ("error: network.isolation=netns needs root (ip netns, veth, "
                                                   "tc); this process is not root")
    assert not run_dir.exists()


def test_config_rules():
    from moetrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="network.isolation: netns makes real hosts of simulated CPU nodes"):
        load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"),
                    ["network.isolation=netns", "cluster.launcher=env"])
    with pytest.raises(ConfigError, match="network.isolation"):
        load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), ["network.isolation=vlan"])


@pytest.mark.launcher
def test_namespaced_job_equals_the_loopback_job(tmp_path):
    """The same job, ranks on loopback vs each node a namespaced host behind a shaped link: equal losses and
    gradient norms (float64), ranks on the hosts the summary says, and nothing left behind."""
    from moetrain.config import load_config
    from moetrain.launch.job import run_job

    def cfg(name, *extra):
        return load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"),
                           SMALL + [f"logging.run_dir={tmp_path / name}", *extra])

    loop = run_job(cfg("loop"))
    hosted = run_job(cfg("netns", "network.isolation=netns", "network.inter.bandwidth_gbps=0.2",
                         "network.simulate=true"))
    assert hosted["losses"] == pytest.approx(loop["losses"], rel=1e-9, abs=0)
    assert hosted["grad_norms"] == pytest.approx(loop["grad_norms"], rel=1e-9, abs=0)
    assert hosted["node_of_rank"] == [0, 0, 1, 1] == loop["node_of_rank"]
    assert hosted["host_of_rank"] == ["10.77.0.1", "10.77.0.1", "10.77.0.2", "10.77.0.2"]
    assert loop["host_of_rank"] == ["127.0.0.1"] * 4
    assert hosted["network"]["hosts"] == ["10.77.0.1", "10.77.0.2"]


@pytest.mark.launcher
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_launcher_leaves_no_host_or_rank(tmp_path, sig):
    """SIGTERM: the ranks save and stop, the launcher removes its hosts. SIGKILL: the ranks follow their
    launcher within seconds and the next start removes the namespaces."""
    cmd = [sys.executable, "-m", "moetrain", "train", str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), *SMALL,
           "train.steps=100000", "logging.every=1", "network.isolation=netns", f"logging.run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step     2/"):
                break
        names = [n for n in netns.list_netns() if n.startswith(f"{netns.PREFIX}{proc.pid}x")]
        assert len(names) == 3
        pids = [int(p) for n in names for p in
                subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()]
        assert len(pids) == 4  # the ranks, in their hosts
        proc.send_signal(sig)
        rest = proc.stdout.read()
        assert "hostname of the client socket" not in rest  # c10d's reverse-DNS noise is kept out
        assert proc.wait(60) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL), rest
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
        if sig == signal.SIGKILL:
            assert set(names) <= set(netns.list_netns())
            netns.remove_leftovers()
        assert not set(names) & set(netns.list_netns())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        netns.remove_leftovers()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False

