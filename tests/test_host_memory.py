"""CPU ranks' allocator setting (launch/host_memory.py): freed memory is kept and reused."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
import torch
if sys.argv[1] == "keep":
    from moetrain.launch.host_memory import keep_freed_memory
    assert keep_freed_memory()
M = 1 << 18  # float32 values per MiB
peak = torch.ones(64 * M)  # one step's large buffer, then freed
del peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
later = [torch.ones(24 * M), torch.ones(24 * M)]  # the next step's buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_serves_later_buffers_without_page_faults():
    """glibc's defaults return a freed 64 MiB buffer to the OS (it was an mmap), so the next two 24 MiB buffers
    fault their 12,288 pages in afresh; after keep_freed_memory() they reuse the freed memory: no faults."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    pages = (48 << 20) // 4096
    assert faults("default") >= pages * 9 // 10
    assert faults("keep") < pages // 20


def test_keep_freed_memory_is_a_cluster_setting():
    from moetrain.config import ConfigError, load_config

    assert load_config(None, []).cluster.keep_freed_memory is True
    assert load_config(None, ["cluster.keep_freed_memory=false"]).cluster.keep_freed_memory is False
    with pytest.raises(ConfigError, match="keep_freed_memory"):
        load_config(None, ["cluster.keep_freed_memory=sometimes"])
