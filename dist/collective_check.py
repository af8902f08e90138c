"""Debug mode (``logging.collective_check``): catch ranks that diverge in their collectives.

Ranks that call different collectives on a group (another op, another shape, a skipped call) hang
or crash deep inside the backend: the classic distributed deadlock. With the check on, every
collective first publishes ``(op, shapes, dtype)`` under (group, per-group call number, rank) in the
job's key-value store, then reads every other member's entry for the same call number: a different
entry raises :class:`CollectiveMismatch` naming both ranks and both calls, and a member that does not
arrive within the timeout raises one naming the missing rank and its last call, instead of a silent
hang. It costs a store round trip per collective, so it is for debugging only.
"""

from __future__ import annotations

import functools
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["CollectiveMismatch", "enable", "disable", "is_enabled"]

_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "broadcast",
        "reduce_scatter_tensor", "barrier", "all_gather_object", "reduce")
_saved: dict[str, object] = {}
_state: dict = {}
_epochs = [0]  # enable() calls in this process: the same count on every rank, so keys of two runs never mix
_lock = threading.Lock()
_threads = threading.local()  # one store client per thread: a TCPStore connection is not thread-safe


def _store():
    """This thread's connection to the job's store (the link engine's channels check from their own threads;
    two threads sharing one connection interleave their requests and replies and hang)."""
    if getattr(_threads, "epoch", None) != _state["epoch"]:
        _threads.store, _threads.epoch = _state["store"].clone(), _state["epoch"]
    return _threads.store


class CollectiveMismatch(RuntimeError):
    """Ranks of one process group disagree on their next collective (or one never arrives)."""


def _describe(op: str, args, kwargs) -> str:
    shapes = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            shapes.append(f"{tuple(a.shape)}:{str(a.dtype).replace('torch.', '')}")
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            shapes.append(f"{len(a)}x{tuple(a[0].shape)}")
    if op == "all_to_all_single":  # uneven splits legitimately differ per rank: compare the op only
        shapes = shapes[:0]
    return f"{op}({', '.join(shapes)})"


def _group_of(op: str, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    positions = {"all_reduce": 2, "all_gather": 2, "all_gather_into_tensor": 2, "all_to_all_single": 4,
                 "broadcast": 2, "reduce_scatter_tensor": 3, "barrier": 0, "all_gather_object": 2, "reduce": 3}
    i = positions[op]
    return args[i] if len(args) > i else None


def _check(op: str, args, kwargs) -> None:
    group = _group_of(op, args, kwargs)
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    if len(ranks) < 2:
        return
    me = dist.get_rank()
    sig = _describe(op, args, kwargs)
    with _lock:
        seq = _state["seq"].get(ranks, 0)
        _state["seq"][ranks] = seq + 1
        _state["last"][ranks] = (seq, sig)
    store, timeout = _store(), _state["timeout"]
    key = f"moetrain/cc/{_state['epoch']}/{','.join(map(str, ranks))}/{seq}"
    store.set(f"{key}/{me}", sig)
    for other in ranks:
        if other == me:
            continue
        try:
            store.wait([f"{key}/{other}"], timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001 - the store raises its own timeout types
            raise CollectiveMismatch(
                f"rank {me}: rank {other} did not reach collective #{seq} of group {list(ranks)} within "
                f"{timeout:.0f} s (rank {me} is in {sig})") from exc
        theirs = store.get(f"{key}/{other}").decode()
        if theirs != sig:
            raise CollectiveMismatch(f"collective #{seq} of group {list(ranks)} diverges: rank {me} calls {sig}, "
                                     f"rank {other} calls {theirs}")


def _wrap(op: str, fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        _check(op, args, kwargs)
        return fn(*args, **kwargs)

    return checked


def enable(timeout_s: float = 60.0) -> None:
    """Check every collective of this process from now on (all ranks must enable it)."""
    if _saved:
        return
    from torch.distributed import distributed_c10d

    _epochs[0] += 1
    _state.update(store=distributed_c10d._get_default_store(), timeout=timeout_s, seq={}, last={}, epoch=_epochs[0])
    for op in _OPS:
        _saved[op] = getattr(dist, op)
        setattr(dist, op, _wrap(op, _saved[op]))


def disable() -> None:
    for op, fn in _saved.items():
        setattr(dist, op, fn)
    _saved.clear()


def is_enabled() -> bool:
    return bool(_saved)
