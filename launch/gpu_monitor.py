"""GPU monitoring through NVML (nvidia-ml-py): utilisation, memory and power per rank, and NVLink
islands for the intra-node groups. A silent no-op where there is no CUDA device or no NVML.

Devices are matched by UUID, not index: Ray and Slurm remap ``CUDA_VISIBLE_DEVICES``, so CUDA device
0 of a rank may be NVML device 5 of its node.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["GpuMonitor", "nvlink_island", "nvlink_node_map"]


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no permission: monitoring is optional
        return None


def _handle_for(nvml, device: torch.device):
    """The NVML handle of the CUDA device ``device`` (matched by UUID), or None."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return None
    want = uuid.replace("GPU-", "").lower()
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        got = nvml.nvmlDeviceGetUUID(h)
        got = got.decode() if isinstance(got, bytes) else got
        if got.replace("GPU-", "").lower() == want:
            return h
    return None


class GpuMonitor:
    """Samples one rank's GPU; :meth:`create` returns None on CPU ranks or without NVML."""

    def __init__(self, nvml, handle):
        self.nvml, self.handle = nvml, handle

    @classmethod
    def create(cls, device: torch.device) -> Optional[GpuMonitor]:
        if device.type != "cuda":
            return None
        nvml = _nvml()
        if nvml is None:
            return None
        handle = _handle_for(nvml, device)
        return None if handle is None else cls(nvml, handle)

    def sample(self) -> dict[str, float]:
        n, h = self.nvml, self.handle
        out: dict[str, float] = {}
        try:
            out["gpu/util_pct"] = float(n.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            out["gpu/mem_used_gib"] = mem.used / 2**30
            out["gpu/power_w"] = n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:  # a counter this GPU / driver does not expose
            pass
        return out

    def island(self) -> Optional[str]:
        return nvlink_island(self.nvml, self.handle)


def nvlink_island(nvml, handle) -> Optional[tuple[str, list[str]]]:
    """(this GPU's PCI bus id, the bus ids at the far end of its active NVLinks: peer GPUs or NVSwitches),
    or None without NVML data or active NVLinks."""
    def bus(pci: Any) -> str:
        b = pci.busId
        return (b.decode() if isinstance(b, bytes) else str(b)).lower()

    try:
        me = bus(nvml.nvmlDeviceGetPciInfo(handle))
    except Exception:
        return None
    peers = set()
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != getattr(nvml, "NVML_FEATURE_ENABLED", 1):
                continue
            peers.add(bus(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)))
        except Exception:
            continue
    return (me, sorted(peers)) if peers else None


def nvlink_node_map(node_of: list[int], links: list[Optional[tuple[str, list[str]]]]) -> list[int]:
    """Refine the node map so that "intra-node" means "connected by NVLink": within a node, ranks whose
    GPUs are linked directly or through a shared NVSwitch form one island; ranks without NVLink data
    keep their node. Returns new node ids (dense, in rank order of first appearance)."""
    parent = list(range(len(node_of)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(node_of)):
        for b in range(a + 1, len(node_of)):
            if node_of[a] != node_of[b]:
                continue
            la, lb = links[a], links[b]
            if la is None or lb is None:
                if la is None and lb is None:
                    parent[find(b)] = find(a)  # no NVLink data: the node is one island
                continue
            if la[0] == lb[0] or la[0] in lb[1] or lb[0] in la[1] or set(la[1]) & set(lb[1]):
                parent[find(b)] = find(a)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(r), len(ids)) for r in range(len(node_of))]
