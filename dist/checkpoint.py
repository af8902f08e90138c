"""Checkpoints: per-rank files, a manifest with checksums and a tensor index, atomic publication.

Layout of ``checkpoint.dir``::

    step_00000300/
        manifest.json      step, world size, layout, resolved config, sha256 + size of every file,
                           and "tensors": every logical tensor -> {file, shape, dtype}
        rank00000.pt       {"tensors": {logical name: tensor}, "rank": this rank's RNG states}
        ...

Trainer checkpoints store every tensor once, under its logical (layout-free) name: ``model/<name>``
for parameters and persistent buffers (unsharded over TP, padding dropped, one tensor per global
expert id), ``optim/<name>/exp_avg|exp_avg_sq|step`` for AdamW's state. Which rank writes a tensor is
balanced over the ranks that hold it, so files are about equal in size. A job at any other layout
(tp, pp, ep, dp, ZeRO stage) reads what its own slices need from the index (memory-mapped).

A checkpoint is written into ``step_XXXXXXXX.tmp/`` and renamed into place by rank 0 only after every
rank's file is complete and the manifest is written, so a crash mid-save never leaves a directory
that looks complete. On resume, candidates are tried newest first; one whose manifest is missing or
unreadable, or any of whose files is missing or fails its checksum, is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetrain.errors import UserError

__all__ = ["Checkpointer", "CheckpointError", "CheckpointReader", "CheckpointLock", "sha256_file"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (corrupt, incomplete, or saved for another model)."""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return ticks is None or _start_ticks(pid) in (None, ticks)


class CheckpointLock:
    """One job per checkpoint directory: ``DIR/.lock`` names the holder (host, pid, process start, command).

    A second job fails at start with one line naming the holder. A lock whose holder is gone (a crashed or
    killed job on this host: its pid is dead, or now another process) is taken over, with a line saying so;
    a holder on another host cannot be checked from here, so its lock is reported, not broken."""

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike, *, log=print):
        self.path = Path(directory) / self.NAME
        self.log = log
        self.mine: dict[str, Any] | None = None

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        record = {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:200]}
        for _ in range(3):
            if self._create(record):
                self.mine = record
                return
            try:
                held = json.loads(self.path.read_text())
            except (OSError, ValueError):
                held = None  # being written, or damaged: look again
            if held is None:
                time.sleep(0.2)
                continue
            holder = f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')} ({held.get('command')})"
            same_host = held.get("host") == record["host"]
            if not same_host or _alive(int(held.get("pid", -1)), held.get("start_ticks")):
                where = "" if same_host else f"; if that job is gone, delete {self.path}"
                raise CheckpointError(f"checkpoint.dir {self.path.parent} is in use by {holder}{where}")
            self.log(f"[moetrain] taking over the lock of {self.path.parent} from {holder}, which is no longer "
                     "running")
            self.path.unlink(missing_ok=True)
        raise CheckpointError(f"could not lock checkpoint.dir {self.path.parent} ({self.path} keeps changing)")

    def release(self) -> None:
        if self.mine is None:
            return
        try:
            if json.loads(self.path.read_text()) == self.mine:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.mine = None

    def __enter__(self) -> CheckpointLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


@dataclass
class Loaded:
    path: Path
    state: dict[str, Any]
    manifest: dict[str, Any]


class Checkpointer:
    """Saves and finds checkpoints; every method is collective over the world group."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, log=print):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.log = log

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _broadcast(self, obj: Any) -> Any:
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def candidates(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                 and not p.name.endswith(".tmp")]
        return sorted(found, key=lambda p: p.name, reverse=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write this rank's ``state``; rank 0 adds ``meta`` to the manifest and publishes the directory."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for left in sorted(self.dir.glob("step_*.tmp")):  # a crashed save's leftovers (the lock is ours)
                shutil.rmtree(left, ignore_errors=True)
                if left != tmp:
                    self.log(f"[moetrain] removed {left}, an incomplete save of an earlier run")
            tmp.mkdir()
        self._barrier()
        part = tmp / (_rank_file(self.rank) + ".part")
        torch.save(state, part)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, tmp / _rank_file(self.rank))
        index = {k: {"file": _rank_file(self.rank), "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                 for k, v in state.get("tensors", {}).items()} if isinstance(state, dict) else {}
        if dist.is_initialized():
            parts: list = [None] * self.world
            dist.all_gather_object(parts, index)
        else:
            parts = [index]
        self._barrier()
        if self.rank == 0:
            tensors: dict[str, Any] = {}
            for part in parts:
                tensors.update(part)
            files = {}
            for r in range(self.world):
                p = tmp / _rank_file(r)
                files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            manifest = {"format": FORMAT_VERSION, "step": step, "world_size": self.world, "files": files, **meta}
            if tensors:
                manifest["tensors"] = dict(sorted(tensors.items()))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.candidates()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    # ------------------------------------------------------------------ load
    def _check_manifest(self, path: Path) -> tuple[dict | None, str]:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None, "no manifest (incomplete save)"
        except (OSError, ValueError) as exc:
            return None, f"unreadable manifest ({exc.__class__.__name__})"
        files = manifest.get("files")
        if not isinstance(files, dict) or manifest.get("world_size") != len(files):
            return None, "manifest lists the wrong number of rank files"
        for name, info in files.items():
            f = path / name
            if not f.is_file():
                return None, f"{name} is missing"
            if f.stat().st_size != info.get("bytes"):
                return None, f"{name} has {f.stat().st_size} bytes, manifest says {info.get('bytes')}"
        return manifest, ""

    def find(self, resume: str) -> tuple[Path, dict] | None:
        """The newest usable checkpoint for ``checkpoint.resume`` (auto | never | PATH) at any world size:
        its manifest is complete and every file has its recorded size and checksum (each rank hashes a
        share of the files). None = fresh start: no checkpoint yet, or ``never``. When checkpoints exist but
        none is usable, :class:`CheckpointError` lists each and why (never silently start over in a directory
        whose evidence the new run's saves would replace)."""
        if resume == "never":
            return None
        explicit = resume != "auto"
        paths = [Path(resume)] if explicit else self.candidates()
        if explicit and not paths[0].is_dir():
            raise CheckpointError(f"checkpoint.resume: {resume} is not a checkpoint directory")
        unusable: list[str] = []
        for path in paths:
            manifest, why = self._check_manifest(path) if self.rank == 0 else (None, "")
            manifest, why = self._broadcast((manifest, why))
            if manifest is not None and manifest.get("format") != FORMAT_VERSION:
                manifest, why = None, f"format {manifest.get('format')} (this build reads {FORMAT_VERSION})"
            if manifest is not None:
                names = sorted(manifest["files"])
                bad = [n for n in names[self.rank::self.world]
                       if sha256_file(path / n) != manifest["files"][n]["sha256"]]
                whys = [bad]
                if dist.is_initialized():
                    whys = [None] * self.world
                    dist.all_gather_object(whys, bad)
                failed = sorted(n for b in whys for n in b)
                if not failed:
                    return path, manifest
                why = ", ".join(failed) + (" fails its checksum" if len(failed) == 1 else " fail their checksums")
            if self.rank == 0:
                self.log(f"[moetrain] checkpoint {path} is unusable: {why}"
                         + ("" if explicit else "; trying the previous one"))
            if explicit:
                raise CheckpointError(f"checkpoint {path} is unusable: {why}")
            unusable.append(f"{path.name}: {why}")
        if paths:
            raise CheckpointError(f"no usable checkpoint in {self.dir} ({'; '.join(unusable)}); set "
                                  "checkpoint.resume=never to start over there, or point checkpoint.dir elsewhere")
        return None

    def load(self, resume: str) -> Loaded | None:
        """:meth:`find`, then this rank's own file (a checkpoint saved by the same number of ranks)."""
        found = self.find(resume)
        if found is None:
            return None
        path, manifest = found
        if manifest["world_size"] != self.world:
            raise CheckpointError(
                f"checkpoint {path} was saved by {manifest['world_size']} ranks but this job has "
                f"{self.world}; load it by logical tensor names (CheckpointReader) instead")
        state = torch.load(path / _rank_file(self.rank), map_location="cpu", weights_only=False)
        return Loaded(path=path, state=state, manifest=manifest)


class CheckpointReader:
    """Reads logical tensors of a checkpoint by name, memory-mapping each rank file once."""

    def __init__(self, path: str | os.PathLike, manifest: dict | None = None):
        self.path = Path(path)
        if manifest is None:
            try:
                manifest = json.loads((self.path / MANIFEST).read_text())
            except FileNotFoundError:
                raise CheckpointError(f"{self.path} has no {MANIFEST}: not a checkpoint, or an incomplete save") \
                    from None
            except ValueError as exc:
                raise CheckpointError(f"{self.path / MANIFEST} is unreadable ({exc})") from None
        self.manifest = manifest
        self.index: dict[str, dict] = manifest.get("tensors", {})
        self._files: dict[str, dict] = {}

    def _file(self, name: str) -> dict:
        if name not in self._files:
            f = self.path / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {self.path} is partial: {name} is missing")
            try:
                self._files[name] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # a truncated or corrupt file
                raise CheckpointError(f"checkpoint {self.path}: {name} cannot be read ({exc.__class__.__name__})") \
                    from None
        return self._files[name]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.index.get(key)
        if entry is None:
            raise CheckpointError(f"checkpoint {self.path} is partial: it has no tensor {key!r}")
        t = self._file(entry["file"]).get("tensors", {}).get(key)
        if t is None:
            raise CheckpointError(f"checkpoint {self.path} is partial: {entry['file']} lacks {key!r}")
        return t

    def rank_state(self, rank: int) -> dict | None:
        name = _rank_file(rank)
        if name not in self.manifest.get("files", {}):
            return None
        return self._file(name).get("rank")
