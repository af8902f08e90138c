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
- ``indexed``: Megatron indexed datasets (``moetrain data prepare``): the documents' tokens, EOD-separated,
  packed into windows across document boundaries, permuted per epoch; a blend draws each sample's dataset
  from a fixed weighted pattern (:func:`_blend_pattern`), so sample k is still a pure function of k.

Validation (``train.eval_every``) uses a second sampler over held-out windows: the tail ``split[1]`` share
of each dataset's windows, or separate ``data.valid`` datasets; its samples are the same at every
evaluation.
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


def _blend_pattern(weights: list[float], length: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which dataset each of ``length`` consecutive samples comes from (always the one furthest behind its
    share), each sample's index among its dataset's samples in the cycle, and each dataset's samples per
    cycle: sample k of a blend is a pure function of k."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    part = np.empty(length, dtype=np.int64)
    local = np.empty(length, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(length):
        d = int(np.argmax(w * (i + 1) - counts))
        part[i], local[i] = d, counts[d]
        counts[d] += 1
    return part, local, counts


class TokenBatches:
    """Global-batch sampler for one data-parallel rank.

    ``which``: ``train`` or ``valid`` (held-out windows of ``split``, or the ``valid`` datasets of an indexed
    source; synthetic validation draws from its own stream). ``blend``: ``[[weight, prefix], ...]`` of an
    indexed source; ``split``: ``[train, valid]`` shares of every dataset's windows."""

    def __init__(self, source: str, *, seq_len: int, vocab_size: int, seed: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, path: str | None = None,
                 token_dtype: str = "uint16", blend: list | None = None, split: list[float] | None = None,
                 valid: str | list | None = None, which: str = "train"):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be a multiple of micro_batch * dp")
        self.source, self.seq_len, self.vocab, self.seed = source, seq_len, vocab_size, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.path, self.which = path, which
        self._perm_key: tuple | None = None
        self._perm: np.ndarray | None = None
        self._stream = "synthetic" if which == "train" else "synthetic-valid"
        streams: list[tuple[str, np.ndarray]] = []  # (name, tokens) of each dataset
        weights: list[float] = []
        if source == "text":
            if vocab_size < 256:
                raise DataError(f"model.vocab_size={vocab_size} is too small for byte-level text (needs 256)")
            streams = [(path or "the default corpus", _text_tokens(path))]
        elif source == "tokens":
            streams = [(path, _token_file(path, token_dtype))]
        elif source == "indexed":
            from moetrain.launch.indexed import IndexedTokens

            spec = valid if (which == "valid" and valid is not None) else (blend if blend is not None else path)
            pairs = [[1.0, spec]] if isinstance(spec, str) else spec
            streams = [(prefix, IndexedTokens(prefix).tokens) for _, prefix in pairs]
            weights = [float(w) for w, _ in pairs]
            if which == "valid" and valid is not None:
                split = None  # whole datasets
        elif source != "synthetic":
            raise DataError(f"data.source: unknown source {source!r}")
        self.parts: list[tuple[str, np.ndarray, int, int]] = []  # (name, tokens, first window, windows)
        for name, tokens in streams:
            total = (len(tokens) - 1) // seq_len
            first, count = 0, total
            if split is not None:
                train = int(total * split[0] / (split[0] + split[1]))
                first, count = (0, train) if which == "train" else (train, total - train)
            if total < 1:
                raise DataError(f"data: {name} has {len(tokens)} tokens, fewer than one window of model.seq_len+1 = "
                                f"{seq_len + 1}")
            if count < 1:
                what = "validation" if which == "valid" else "training"
                raise DataError(f"data: {name} has {len(tokens)} tokens, {total} window(s) of model.seq_len+1 = "
                                f"{seq_len + 1}, which leaves no {what} window" + (f" at data.split={split}"
                                                                                    if split else ""))
            self.parts.append((name, tokens, first, count))
        self._pattern = _blend_pattern(weights) if len(self.parts) > 1 else None
        if self.parts:
            self._tokens = self.parts[0][1]
            self.windows = self.parts[0][3]

    @property
    def micro_batches(self) -> int:
        return self.per_rank // self.micro_batch

    def sample_ids(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + self.dp_rank * self.per_rank + micro * self.micro_batch
        return list(range(start, start + self.micro_batch))

    def _locate(self, k: int) -> tuple[int, int]:
        """(dataset, its own sample index) of global sample k."""
        if self._pattern is None:
            return 0, k
        part, local, counts = self._pattern
        cycle, i = divmod(k, len(part))
        d = int(part[i])
        return d, cycle * int(counts[d]) + int(local[i])

    def _sample(self, k: int) -> np.ndarray:
        if not self.parts:
            gen = np.random.default_rng(stream_seed(self.seed, f"{self._stream}/{k}"))
            a, c = int(gen.integers(self.vocab)), int(gen.integers(1, 8))
            return (a + c * np.arange(self.seq_len + 1)) % self.vocab
        d, j = self._locate(k)
        name, tokens, first, windows = self.parts[d]
        epoch, i = divmod(j, windows)
        if (d, epoch) != self._perm_key:
            key = f"data-epoch/{epoch}" if len(self.parts) == 1 else f"data-epoch/{d}/{epoch}"
            if self.which == "valid":
                key = "valid/" + key
            self._perm = np.random.default_rng(stream_seed(self.seed, key)).permutation(windows)
            self._perm_key = (d, epoch)
        w = first + int(self._perm[i])
        window = np.asarray(tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1], dtype=np.int64)
        if window.max() >= self.vocab:
            raise DataError(f"data: token id {int(window.max())} near token {w * self.seq_len} of {name} is "
                            f">= model.vocab_size={self.vocab}")
        return window

    def micro_batch_tensors(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(inputs [b, s], targets [b, s], global sample ids) for one micro-batch of this rank."""
        ids = self.sample_ids(step, micro)
        arr = torch.from_numpy(np.stack([self._sample(k) for k in ids]).astype(np.int64))
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous(), ids
