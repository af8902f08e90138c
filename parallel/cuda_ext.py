"""Builds the csrc/ CUDA extensions on first use (torch.utils.cpp_extension, cached under
TORCH_EXTENSIONS_DIR; ninja), once per process, and says once why one is unavailable."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CSRC", "Extension"]

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_log = logging.getLogger("moetrain.kernels")


def _arch_list() -> str:
    """This device's architecture; Hopper as sm_90a, so wgmma-era instructions are available."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}{'a' if major == 9 else ''}"


class Extension:
    """``get()`` returns the compiled module, or None (no CUDA device, no toolkit, a compile error, a
    failed self-check) with :attr:`reason` set and logged once; the callers then run their torch path.

    ``check(module, device)`` runs once after the build: every kernel on small random inputs against its
    torch reference, returning the first mismatch (or None). A kernel that disagrees is never used."""

    def __init__(self, name: str, sources: list[str], *, fast_math: bool = False,
                 check: Callable[[object, str], str | None] | None = None):
        self.name, self.sources, self.fast_math, self.check = name, sources, fast_math, check
        self._module = None
        self.reason: str | None = None

    def get(self):
        if self._module is not None or self.reason is not None:
            return self._module
        if not torch.cuda.is_available():
            self.reason = "no CUDA device"
            return None
        try:
            from torch.utils.cpp_extension import load as build

            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _arch_list())
            flags = ["-O3", "-std=c++17"] + (["--use_fast_math"] if self.fast_math else [])
            module = build(name=self.name, sources=[str(CSRC / s) for s in self.sources], extra_cuda_cflags=flags,
                           verbose=False)
            failed = self.check(module, "cuda") if self.check is not None else None
            if failed is not None:
                self.reason = f"self-check failed: {failed}"
            else:
                self._module = module
        except Exception as exc:  # a missing toolkit, a compile error, a kernel that crashed its check
            text = str(exc).strip()
            self.reason = f"{exc.__class__.__name__}: {text.splitlines()[-1] if text else ''}"
        if self.reason is not None:
            _log.warning("moetrain CUDA extension %s unavailable (%s); using the torch path", self.name, self.reason)
        return self._module
