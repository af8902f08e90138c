"""Simulated nodes as real network hosts: one Linux network namespace per node, joined by a bridge.

    NetHosts(n).create() -> namespaces mtn<pid>x<seq>-0 .. -<n-1> (the hosts) and mtn<pid>x<seq>-sw (the
                            switch, holding the bridge); host k has eth0 = 10.77.0.<k+1>/24, one veth
                            to the bridge, its own loopback, and no route out of the subnet
                         -> with ``bandwidth_gbps``: a tbf qdisc at that rate on both ends of every
                            host's veth (its upload and its download, a full-duplex NIC)
    close()              -> every process left in the namespaces killed, the namespaces deleted (their
                            veths and the bridge go with them)

Traffic between ranks of one host never touches the veth (an address of one's own is delivered over
loopback), so intra-node collectives run at loopback speed and inter-node ones cross a real, shaped
link. The kernel shapes bandwidth only: netem is not available here, so link latency is not real (the
link layer adds it when ``network.simulate`` is on).

Nothing is made in the caller's own namespace: the bridge lives in the switch namespace and every veth is
created inside a job namespace. A launcher killed with SIGKILL leaves its namespaces behind; the next
:meth:`NetHosts.create` on this machine removes those whose creating process is gone
(:func:`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Optional

from moetrain.errors import UserError

__all__ = ["NetHosts", "NetnsError", "unavailable_reason", "enter_netns", "remove_leftovers", "list_netns", "PREFIX",
           "SUBNET", "IFNAME"]

PREFIX = "mtn"
SUBNET = "10.77.0"  # private, and only inside the job's namespaces
IFNAME = "eth0"
MAX_HOSTS = 250
_CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+-(?:\d+|sw)$")
_seq = itertools.count()


class NetnsError(UserError, RuntimeError):
    """Network namespaces could not be made or used on this machine."""


def unavailable_reason() -> Optional[str]:
    """Why namespaced hosts cannot be made here (one line), or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network.isolation=netns needs root (ip netns, veth, tc); this process is not root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"network.isolation=netns needs `{tool}` ({package}), which is not on PATH"
    return None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check)


def _tc(ns: str, *args: str) -> None:
    _run(["tc", "-n", ns, *args])


def list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids(name: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]


def _kill_all(name: str) -> list[int]:
    """SIGKILL every process in namespace ``name``; returns their pids."""
    pids = _pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _delete(name: str) -> None:
    """Kill what runs in namespace ``name``, then delete it."""
    for _ in range(3):
        if not _kill_all(name):
            break
        time.sleep(0.2)
    _ip("netns", "del", name, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of moetrain jobs whose creating process is gone; returns their names."""
    gone = []
    for name in list_netns():
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _delete(name)
            gone.append(name)
    return gone


def enter_netns(name: str) -> None:
    """Move the calling thread (and the threads and sockets it makes from now on) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot enter network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _rate_args(bandwidth_gbps: float) -> list[str]:
    """tbf arguments for ``bandwidth_gbps`` gigabytes per second: a burst of 1 ms at that rate (at least
    256 KiB, above a GSO segment) and a queue deep enough that TCP sees no drops from a single link."""
    bytes_per_s = bandwidth_gbps * 1e9
    burst = max(int(bytes_per_s * 1e-3), 256 * 1024)
    limit = max(int(bytes_per_s * 0.05), 32 * 1024 * 1024)
    return ["tbf", "rate", f"{int(bytes_per_s * 8)}bit", "burst", str(burst), "limit", str(limit)]


class NetHosts:
    """``count`` namespaced hosts on one bridge (see the module docstring); a context manager."""

    def __init__(self, count: int, *, bandwidth_gbps: Optional[float] = None):
        if not 1 <= count <= MAX_HOSTS:
            raise NetnsError(f"{count} namespaced hosts asked for; between 1 and {MAX_HOSTS} are possible")
        self.count = count
        self.bandwidth_gbps = bandwidth_gbps
        tag = f"{PREFIX}{os.getpid()}x{next(_seq)}"
        self.names = [f"{tag}-{k}" for k in range(count)]
        self.switch = f"{tag}-sw"
        self.addrs = [f"{SUBNET}.{k + 1}" for k in range(count)]
        self._made: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def create(self) -> NetHosts:
        why = unavailable_reason()
        if why:
            raise NetnsError(why)
        remove_leftovers()
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for k, (name, addr) in enumerate(zip(self.names, self.addrs)):
                self._add(name)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "add", IFNAME, "type", "veth", "peer", "name", f"h{k}", "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"h{k}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"h{k}", "up")
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", IFNAME)
                _ip("-n", name, "link", "set", IFNAME, "up")
                if self.bandwidth_gbps is not None:
                    _tc(name, "qdisc", "add", "dev", IFNAME, "root", *_rate_args(self.bandwidth_gbps))
                    _tc(self.switch, "qdisc", "add", "dev", f"h{k}", "root", *_rate_args(self.bandwidth_gbps))
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def close(self) -> None:
        """Kill every process in the hosts and delete the namespaces (idempotent)."""
        for name in reversed(self._made):
            _delete(name)
        self._made.clear()

    def __enter__(self) -> NetHosts:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ use
    def exec_argv(self, host: int, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` on ``host``."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def host_of(self, addr: str) -> int:
        return self.addrs.index(addr)

    def pids(self, host: int) -> list[int]:
        return _pids(self.names[host])

    def kill_host(self, host: int) -> list[int]:
        """SIGKILL every process on ``host`` (a machine that lost power); returns their pids."""
        return _kill_all(self.names[host])

    def set_link(self, host: int, up: bool) -> None:
        """Take ``host``'s cable out (``up=False``) or put it back, at the switch."""
        _ip("-n", self.switch, "link", "set", f"h{host}", "up" if up else "down")

    def tx_bytes(self, host: int) -> int:
        """Bytes ``host`` has sent over its link."""
        out = _ip("-n", self.names[host], "-s", "link", "show", IFNAME).stdout.split("\n")
        for i, line in enumerate(out):
            if line.strip().startswith("TX:"):
                return int(out[i + 1].split()[0])
        raise NetnsError(f"no TX counters for {IFNAME} on {self.names[host]}")
