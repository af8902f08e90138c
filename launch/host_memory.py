"""How a CPU rank's process allocates: glibc malloc keeping freed memory for reuse.

With glibc's defaults every block over 128 KiB (its threshold grows to at most 32 MiB) is a fresh ``mmap``
returned to the OS when freed, so each step's large temporaries (gradient-norm casts, AdamW's
intermediates, MoE row buffers) fault their pages in again on first touch. CPU PyTorch deployments avoid
that with jemalloc / tcmalloc; :func:`keep_freed_memory` gets the same from glibc by raising its mmap and
trim thresholds to 1 GiB. Measured on 2 cores (benchmarks/RESULTS.md, planner section): a 1-rank MoE step
(4 layers, 8 experts top-2) 341-352 ms -> 270-274 ms, a dense step unchanged; the run's peak resident memory
659 vs 658 MiB. The cost: a freed block is reused only by requests that fit in it, and PyTorch's 64-byte
aligned requests carry a little padding, so a loop that allocates the same large size again and again can leave
a few such blocks unused (one 40 MiB temporary repeated 300 times: 582 MiB resident instead of 222).
``cluster.keep_freed_memory: false`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds to 1 GiB in this process; False where they cannot be
    set (not glibc: musl, macOS), which leaves the allocator as it was."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
