"""``moetrain data prepare``: local corpora -> tokens in Megatron's indexed format (``PREFIX.bin/.idx``).

Inputs are read with the ``datasets`` library in streaming mode (nothing cached, nothing downloaded):
``.jsonl`` / ``.json`` (one document per record, its ``--field``, default ``text``), ``.parquet`` (the same
column) and ``.txt`` (one document per file); a directory stands for its files of those kinds, sorted.
Documents keep their input order; each is tokenized (``--workers`` processes, results in order) and
followed by the end-of-document id. Outputs appear only when complete (``.part`` files renamed).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moetrain.errors import UserError
from moetrain.launch.indexed import IndexedWriter, token_dtype_for
from moetrain.launch.tokenizer import load_tokenizer

__all__ = ["prepare", "input_files", "PrepareError"]

_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_BATCH = 256


class PrepareError(UserError):
    """An input that cannot be prepared (named)."""


def input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _KINDS)
            if not found:
                raise PrepareError(f"{name}: no {', '.join(_KINDS)} files in the directory")
            files += found
        elif p.is_file():
            if p.suffix not in _KINDS:
                raise PrepareError(f"{name}: unsupported input type {p.suffix or '(none)'} (supported: "
                                   f"{', '.join(_KINDS)})")
            files.append(p)
        else:
            raise PrepareError(f"{name}: no such file or directory")
    return files


def _documents(files: list[Path], field: str) -> Iterator[str]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, set_verbosity

    disable_progress_bar()
    set_verbosity(logging.CRITICAL)  # its reader logs a parse failure before raising it; we name it once, below
    for f in files:
        if f.stat().st_size == 0:  # holds no documents (the json reader would fail on it without naming why)
            continue
        kind = _KINDS[f.suffix]
        extra: dict[str, Any] = {"sample_by": "document"} if kind == "text" else {}
        try:
            rows = load_dataset(kind, data_files=[str(f)], split="train", streaming=True, **extra)
            key = "text" if kind == "text" else field
            for n, row in enumerate(rows):
                if key not in row:
                    raise PrepareError(f"{f}: record {n} has no field {key!r} (fields: {', '.join(row)}); "
                                       "choose one with --field")
                text = row[key]
                if not isinstance(text, str):
                    raise PrepareError(f"{f}: record {n}'s {key!r} is {type(text).__name__}, not text")
                yield text
        except PrepareError:
            raise
        except Exception as exc:  # pyarrow / json errors name the problem but not our file
            raise PrepareError(f"{f}: cannot be read as {kind} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


_WORKER: dict = {}


def _init_worker(path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _WORKER["tok"].encode_batch(texts)


def prepare(inputs: list[str], tokenizer: str, out: str, *, workers: int = 1, field: str = "text",
            eod_token: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out``.bin/.idx; returns counts and rates."""
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    files = input_files(inputs)
    tok = load_tokenizer(tokenizer, eod_token=eod_token)
    eod = tok.require_eod()
    prefix = Path(out)
    for suffix in (".bin", ".idx"):
        if prefix.with_name(prefix.name + suffix).exists():
            raise PrepareError(f"{prefix}{suffix} exists; choose another --out prefix or remove it")
    writer = IndexedWriter(prefix, token_dtype_for(tok.vocab_size))
    docs = tokens = 0
    t0 = time.perf_counter()
    documents = _documents(files, field)
    batches = iter(lambda: list(itertools.islice(documents, _BATCH)), [])
    pool = None
    bar = _Progress(progress)
    try:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
            encoded = pool.imap(_encode, batches, chunksize=1)
        else:
            encoded = map(tok.encode_batch, batches)
        for ids_batch in encoded:
            for ids in ids_batch:
                writer.add(np.asarray(ids + [eod]))
                docs += 1
                tokens += len(ids) + 1
            bar.update(docs, tokens, time.perf_counter() - t0)
        if docs == 0:
            raise PrepareError(f"no documents in {', '.join(map(str, files))}")
        bin_path, idx_path = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    return {"documents": docs, "tokens": tokens, "seconds": seconds, "docs_per_s": docs / seconds,
            "tokens_per_s": tokens / seconds, "bin": str(bin_path), "idx": str(idx_path), "files": len(files),
            "dtype": str(writer.dtype), "eod_id": tok.eod_id, "vocab_size": tok.vocab_size}


class _Progress:
    """A rich progress line (documents, tokens, their rates) on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool):
        import sys

        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("preparing")

    def update(self, docs: int, tokens: int, seconds: float) -> None:
        if self.bar is not None:
            s = max(seconds, 1e-9)
            self.bar.update(self.task, description=f"{docs:,} documents ({docs / s:,.0f}/s), {tokens:,} tokens "
                                                   f"({tokens / s:,.0f}/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
