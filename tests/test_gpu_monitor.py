"""NVML monitoring: no-op on CPU; NVLink islands refine the node map (fake NVML, no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from moetrain.launch.gpu_monitor import GpuMonitor, nvlink_island, nvlink_node_map


def test_monitor_is_a_silent_no_op_on_cpu():
    assert GpuMonitor.create(torch.device("cpu")) is None


class FakeNVML:
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_MAX_LINKS = 4

    def __init__(self, links: dict[str, list[str]]):
        self.links = links  # bus id -> remote bus ids of its active links

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h.encode())

    def nvmlDeviceGetNvLinkState(self, h, link):
        return 1 if link < len(self.links[h]) else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return SimpleNamespace(busId=self.links[h][link])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 412_000


def test_samples_and_nvlink_peers_from_nvml():
    nvml = FakeNVML({"0000:1a:00.0": ["0000:2b:00.0"], "0000:2b:00.0": ["0000:1a:00.0"]})
    mon = GpuMonitor(nvml, "0000:1a:00.0")
    assert mon.sample() == {"gpu/util_pct": 87.0, "gpu/mem_used_gib": 3.0, "gpu/power_w": 412.0}
    assert nvlink_island(nvml, "0000:1a:00.0") == ("0000:1a:00.0", ["0000:2b:00.0"])
    assert nvlink_island(FakeNVML({"x": []}), "x") is None


def test_nvlink_islands_refine_the_node_map():
    # node 0: GPUs a-b linked directly, c-d linked directly, no link between the pairs (PCIe)
    # node 1: four GPUs behind one NVSwitch (every link ends at the switch's bus id)
    links = [("a", ["b"]), ("b", ["a"]), ("c", ["d"]), ("d", ["c"]),
             ("e", ["sw"]), ("f", ["sw"]), ("g", ["sw"]), ("h", ["sw"])]
    assert nvlink_node_map([0, 0, 0, 0, 1, 1, 1, 1], links) == [0, 0, 1, 1, 2, 2, 2, 2]
    # no NVLink data at all (CPU ranks, NVML missing): the node map is unchanged
    assert nvlink_node_map([0, 0, 1, 1], [None] * 4) == [0, 0, 1, 1]
    # the same bus ids on two nodes stay apart
    assert nvlink_node_map([0, 0, 1, 1], [("a", ["b"]), ("b", ["a"]), ("a", ["b"]), ("b", ["a"])]) == [0, 0, 1, 1]
