"""Named RNG streams: every random draw of a run is a pure function of (seed, stream name), so a layout
change (tp, pp, ep, dp, chunking) never changes the function being computed.

- weights: ``init_normal(shape, std, seed, name)`` draws the full logical tensor; each rank slices it;
- per-token uniforms (stochastic routers): one stream per (site, step, global sample);
- dropout masks: one stream per (step, global sample, site), sliced to the rank's sequence shard;
- WTA-CRS draws (parallel/wtacrs.py) and data order (launch/data.py) key their streams the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = ["stream_seed", "init_normal", "token_uniforms", "TokenStreams", "StaticStreams", "DropoutStream"]


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the named RNG stream (stable across processes and Python versions)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_normal(shape: Sequence[int], std: float, seed: int, name: str) -> torch.Tensor:
    """The full (unsharded) weight ``name`` ~ N(0, std^2), float32 on CPU."""
    gen = torch.Generator().manual_seed(stream_seed(seed, name))
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std


def token_uniforms(seed: int, site: str, step: int, sample_ids, seq_len: int) -> torch.Tensor:
    """``[seq_len * b]`` uniforms in ``[s, b]`` order, one stream per (site, step, sample): layout-free."""
    cols = []
    for sid in sample_ids:
        gen = torch.Generator().manual_seed(stream_seed(seed, f"{site}/{step}/{sid}"))
        cols.append(torch.rand(seq_len, generator=gen, dtype=torch.float64))
    return torch.stack(cols, dim=1).reshape(-1)


class TokenStreams(Protocol):
    """Per-token uniforms for a routing site (what a stochastic router needs from its model)."""

    def uniform_per_token(self, site: str, seq_len: int, batch: int) -> torch.Tensor: ...


class StaticStreams:
    """Streams for a layer used outside a training loop: step 0, samples 0..b-1."""

    def __init__(self, seed: int):
        self.seed = seed

    def uniform_per_token(self, site: str, seq_len: int, batch: int) -> torch.Tensor:
        return token_uniforms(self.seed, site, 0, range(batch), seq_len)


class DropoutStream:
    """One model chunk's per-step streams: dropout masks and per-token uniforms keyed by (step, global
    sample), set before each micro-batch with :meth:`set`; ``seq_offset`` is the rank's sequence shard."""

    def __init__(self, seed: int, p: float, seq_len: int):
        self.seed, self.p, self.seq_len = seed, p, seq_len
        self.step = 0
        self.sample_ids: Sequence[int] = ()
        self.seq_offset = 0

    def set(self, step: int, sample_ids: Sequence[int]) -> None:
        self.step, self.sample_ids = step, list(sample_ids)

    def uniform_per_token(self, site: str, seq_len: int, batch: int) -> torch.Tensor:
        """One uniform per token of the full micro-batch, ``[s * b]`` in ``[s, b]`` order (stochastic routers)."""
        if len(self.sample_ids) != batch:
            raise RuntimeError(f"step streams have {len(self.sample_ids)} sample ids for a batch of {batch}")
        return token_uniforms(self.seed, site, self.step, self.sample_ids, seq_len)

    def __call__(self, x_SBD: torch.Tensor, site: str) -> torch.Tensor:
        if self.p == 0.0 or not torch.is_grad_enabled():
            return x_SBD
        s, b, d = x_SBD.shape
        if len(self.sample_ids) != b:
            raise RuntimeError(f"dropout stream has {len(self.sample_ids)} sample ids for a batch of {b}")
        masks = []
        for sid in self.sample_ids:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, f"dropout/{self.step}/{sid}/{site}"))
            full = torch.rand(self.seq_len, d, generator=gen)
            masks.append(full[self.seq_offset:self.seq_offset + s])
        keep = (torch.stack(masks, dim=1) >= self.p).to(device=x_SBD.device, dtype=x_SBD.dtype)
        return x_SBD * keep / (1.0 - self.p)
