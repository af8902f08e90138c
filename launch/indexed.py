"""Megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and read without Megatron.

The layout (Megatron-Core ``megatron/core/datasets/indexed_dataset.py``, version 1):
``.idx``: the 9 bytes ``MMIDIDX\\0\\0``; version ``<Q`` = 1; the token dtype's code ``<B`` (1 uint8, 2 int8,
3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16); the sequence count ``<Q``; the document-index
count ``<Q``; then int32 sequence lengths, int64 byte pointers into ``.bin``, int64 document indices
(the first sequence of each document, then the sequence count). ``.bin``: the sequences' tokens back to
back. ``moetrain data prepare`` writes one sequence per document (the document's tokens and its EOD).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from moetrain.errors import UserError

__all__ = ["IndexedWriter", "IndexedTokens", "token_dtype_for", "DTYPE_CODES", "IndexedDataError"]

_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDataError(UserError):
    """An indexed dataset that is missing or damaged (named)."""


def token_dtype_for(vocab_size: int) -> type:
    """Megatron's choice: uint16 below 65,500 ids, int32 above."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Appends documents to ``PREFIX.bin`` and writes ``PREFIX.idx`` on :meth:`finish`; both are written as
    ``.part`` files and renamed into place only when complete."""

    def __init__(self, prefix: str | os.PathLike, dtype: type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_part = self.prefix.with_name(self.prefix.name + ".bin.part")
        self._bin = open(self._bin_part, "wb")  # noqa: SIM115 (open until finish / abort)
        self.lengths: list[int] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(int(arr.size))
        self.tokens += int(arr.size)

    def finish(self) -> tuple[Path, Path]:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        docs = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        idx_part = self.prefix.with_name(self.prefix.name + ".idx.part")
        with open(idx_part, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(docs)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(docs.tobytes(order="C"))
        bin_path, idx_path = (self.prefix.with_name(self.prefix.name + s) for s in (".bin", ".idx"))
        os.replace(self._bin_part, bin_path)
        os.replace(idx_part, idx_path)
        return bin_path, idx_path

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_part, self.prefix.with_name(self.prefix.name + ".idx.part")):
            p.unlink(missing_ok=True)


class IndexedTokens:
    """A prepared dataset, memory-mapped: its documents and the flat token stream they form in ``.bin``."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx, bin_ = (self.prefix.with_name(self.prefix.name + s) for s in (".idx", ".bin"))
        for p in (idx, bin_):
            if not p.is_file():
                raise IndexedDataError(f"indexed dataset {prefix}: {p} does not exist (a prefix without .bin/.idx, "
                                       "made by moetrain data prepare or Megatron's preprocess_data.py)")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        head = len(_HEADER) + 8 + 1 + 8 + 8
        if raw.size < head or bytes(raw[: len(_HEADER)]) != _HEADER:
            raise IndexedDataError(f"{idx}: not a Megatron index file (bad header)")
        version, code, seqs, docs = struct.unpack("<QBQQ", bytes(raw[len(_HEADER): head]))
        if version != 1 or code not in DTYPE_CODES:
            raise IndexedDataError(f"{idx}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = head + seqs * 4 + seqs * 8 + docs * 8
        if raw.size < need:
            raise IndexedDataError(f"{idx}: truncated ({raw.size} bytes, the header promises {need})")
        self.lengths = np.frombuffer(raw, dtype=np.int32, count=seqs, offset=head)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=seqs, offset=head + seqs * 4)
        self.doc_index = np.frombuffer(raw, dtype=np.int64, count=docs, offset=head + seqs * 12)
        self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r") if bin_.stat().st_size else \
            np.zeros(0, dtype=self.dtype)
        total = int(self.lengths.astype(np.int64).sum())
        if total * self.dtype.itemsize != bin_.stat().st_size:
            raise IndexedDataError(f"{bin_}: {bin_.stat().st_size} bytes, the index describes {total} {self.dtype} "
                                   "tokens")

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (its sequences, in order)."""
        lo, hi = int(self.doc_index[i]), int(self.doc_index[i + 1])
        start = int(self.pointers[lo]) // self.dtype.itemsize if hi > lo else 0
        n = int(self.lengths[lo:hi].astype(np.int64).sum())
        return np.asarray(self.tokens[start:start + n])
