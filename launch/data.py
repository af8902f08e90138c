"""Training data: deterministic global batches, sharded over data-parallel ranks.

Sample ``k`` (a global index) is a window of ``seq_len + 1`` tokens. Step ``t`` uses samples
``[t*G, (t+1)*G)`` for global batch G; data-parallel rank r takes the contiguous slice
``t*G + r*G/dp + [0, G/dp)`` and splits it into micro-batches in order. Because a sample is a pure
function of (source, seed, k), the data position in a checkpoint is just the number of samples
consumed, and any layout sees the same global batch.

Sources:
- ``synthetic``: sample k is an arithmetic sequence ``(a + c*t) mod V`` with a, c drawn from the
  sample's own RNG stream: learnable in context, needs no files.
- ``text``: byte-level tokens (vocab 256) of a text file, every ``.txt`` under a folder, or by default
  the Python standard library's own source (text that ships with Python; nothing is downloaded).
  Windows are visited in a fresh seeded permutation each epoch.
- ``tokens``: a flat binary token file (uint16 or uint32, the nanoGPT/Megatron ``.bin`` layout),
  memory-mapped; windows are permuted per epoch like ``text``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from moetrain.errors import UserError
from moetrain.parallel.rng import stream_seed

__all__ = ["DataError", "TokenBatches", "default_corpus_bytes", "check_token_file"]

_DEFAULT_CORPUS_LIMIT = 4 * 1024 * 1024


class DataError(UserError, ValueError):
    """The configured data cannot be used (missing, too short, ids out of vocabulary)."""


def default_corpus_bytes(limit: int = _DEFAULT_CORPUS_LIMIT) -> bytes:
    """The Python standard library's top-level ``*.py`` sources, sorted by name, up to ``limit`` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for f in sorted(stdlib.glob("*.py")):
        out += f.read_bytes()
        if len(out) >= limit:
            break
    if not out:
        raise DataError(f"no default corpus: found no Python sources in {stdlib}; set data.path")
    return bytes(out[:limit])


def _text_tokens(path: str | None) -> np.ndarray:
    if path is None:
        return np.frombuffer(default_corpus_bytes(), dtype=np.uint8)
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*.txt") if x.is_file())
        if not files:
            raise DataError(f"data.path: no .txt files under {p}")
        data = b"".join(f.read_bytes() for f in files)
    elif p.is_file():
        data = p.read_bytes()
    else:
        raise DataError(f"data.path: {p} does not exist")
    return np.frombuffer(data, dtype=np.uint8)


def _token_file(path: str, dtype: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path: token file {p} does not exist")
    item = np.dtype(dtype).itemsize
    if p.stat().st_size % item:
        raise DataError(f"data.path: {p} has {p.stat().st_size} bytes, not a whole number of {dtype} tokens")
    if p.stat().st_size == 0:
        raise DataError(f"data.path: {p} is empty")
    return np.memmap(p, dtype=dtype, mode="r")


def check_token_file(path: str, dtype: str, vocab_size: int, chunk: int = 1 << 26) -> int:
    """Every id of a token file below ``vocab_size`` (one memory-mapped, vectorised pass, before training);
    returns the largest id. A uint32 file read as uint16 shows up as a zero in every second slot (ids below
    65536 have a zero high half), one read as uint32 that holds uint16 ids as ids far beyond any vocabulary."""
    tokens = _token_file(path, dtype)
    head = np.asarray(tokens[: min(len(tokens), 1 << 20)])
    if dtype == "uint16" and len(head) >= 64 and not head[1::2].any() and head[0::2].any():
        raise DataError(f"data.path: every second uint16 of {path} is 0: it looks like a uint32 token file; "
                        "set data.token_dtype=uint32")
    top = 0
    for start in range(0, len(tokens), chunk):
        top = max(top, int(tokens[start:start + chunk].max()))
    if top >= vocab_size:
        where = int(np.argmax(np.asarray(tokens) >= vocab_size))
        other = "uint32" if dtype == "uint16" else "uint16"
        raise DataError(f"data.path: token id {top} in {path} (first out-of-range id at token {where}) is >= "
                        f"model.vocab_size={vocab_size}; is the vocabulary right, or is it a {other} file "
                        f"(data.token_dtype)?")
    return top


class TokenBatches:
    """Global-batch sampler for one data-parallel rank."""

    def __init__(self, source: str, *, seq_len: int, vocab_size: int, seed: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, path: str | None = None,
                 token_dtype: str = "uint16"):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be a multiple of micro_batch * dp")
        self.source, self.seq_len, self.vocab, self.seed = source, seq_len, vocab_size, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.path = path
        self._tokens: np.ndarray | None = None
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        if source == "text":
            if vocab_size < 256:
                raise DataError(f"model.vocab_size={vocab_size} is too small for byte-level text (needs 256)")
            self._tokens = _text_tokens(path)
        elif source == "tokens":
            self._tokens = _token_file(path, token_dtype)
        elif source != "synthetic":
            raise DataError(f"data.source: unknown source {source!r}")
        if self._tokens is not None:
            self.windows = (len(self._tokens) - 1) // seq_len
            if self.windows < 1:
                raise DataError(f"data: {len(self._tokens)} tokens are fewer than one window of "
                                f"model.seq_len+1 = {seq_len + 1}")

    @property
    def micro_batches(self) -> int:
        return self.per_rank // self.micro_batch

    def sample_ids(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + self.dp_rank * self.per_rank + micro * self.micro_batch
        return list(range(start, start + self.micro_batch))

    def _sample(self, k: int) -> np.ndarray:
        if self._tokens is None:
            gen = np.random.default_rng(stream_seed(self.seed, f"synthetic/{k}"))
            a, c = int(gen.integers(self.vocab)), int(gen.integers(1, 8))
            return (a + c * np.arange(self.seq_len + 1)) % self.vocab
        epoch, i = divmod(k, self.windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(stream_seed(self.seed, f"data-epoch/{epoch}")).permutation(
                self.windows)
            self._perm_epoch = epoch
        w = int(self._perm[i])
        window = np.asarray(self._tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1], dtype=np.int64)
        if window.max() >= self.vocab:
            raise DataError(f"data.path: token id {int(window.max())} near token {w * self.seq_len} is "
                            f">= model.vocab_size={self.vocab}")
        return window

    def micro_batch_tensors(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(inputs [b, s], targets [b, s], global sample ids) for one micro-batch of this rank."""
        ids = self.sample_ids(step, micro)
        arr = torch.from_numpy(np.stack([self._sample(k) for k in ids]).astype(np.int64))
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous(), ids
