"""Trainer state <-> layout-free checkpoint tensors (saved at one layout, loaded at any other).

Saving: every rank enumerates its parameters' logical tensors (:mod:`parallel.logical`), the ranks
agree on one writer per logical tensor (balanced by bytes over the ranks that hold it), then each
parameter and its AdamW moments are gathered over TP / EP (and ZeRO's data-parallel shards) and
kept only by their writer. Loading: each rank reads the logical tensors its slices need and cuts
them with the same functions, so the layout at save and at load are independent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moetrain.dist.checkpoint import CheckpointError, CheckpointReader
from moetrain.parallel.logical import LogicalParam, logical_params
from moetrain.parallel.zero import ShardedAdamW

__all__ = ["logical_state", "restore_logical", "load_weights", "MOMENTS"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def _param_states(optimizer, lps: list[LogicalParam]) -> dict[int, dict[str, torch.Tensor]]:
    if isinstance(optimizer, ShardedAdamW):
        return optimizer.param_states()  # collective over each ZeRO group
    out = {}
    for lp in lps:
        st = optimizer.state.get(lp.param)
        if st:
            out[id(lp.param)] = {"step": st["step"], **{k: st[k] for k in MOMENTS}}
    return out


def _writers(lps: list[LogicalParam]) -> dict[str, int]:
    """The rank that writes each logical tensor: the least-loaded rank holding it (same on every rank)."""
    mine = []
    for lp in lps:
        per_key = lp.param.numel() * lp.param.element_size() // max(1, len(lp.keys))  # a proxy for balance
        mine += [(k, per_key) for k in lp.keys]
    every: list = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    holders: dict[str, list[int]] = {}
    size: dict[str, int] = {}
    for rank, items in enumerate(every):
        for k, n in items:
            holders.setdefault(k, []).append(rank)
            size[k] = n
    load = [0] * len(every)
    out = {}
    for k in sorted(holders, key=lambda k: (-size[k], k)):
        r = min(holders[k], key=lambda r: (load[r], r))
        out[k] = r
        load[r] += size[k] * 3  # the parameter and its two moments
    return out


def logical_state(params_of: list, optimizer, rank_state: dict[str, Any]) -> dict[str, Any]:
    """This rank's checkpoint file: the logical tensors it writes and its own RNG state (collective)."""
    lps = logical_params(params_of)
    writers = _writers(lps)
    me = dist.get_rank() if dist.is_initialized() else 0
    states = _param_states(optimizer, lps)
    tensors: dict[str, torch.Tensor] = {}
    for lp in lps:
        for k, t in lp.gather(lp.param.detach()).items():
            if writers[k] == me:
                tensors[f"model/{k}"] = t.detach().cpu().clone()
        st = states.get(id(lp.param))
        if st is None:
            continue
        for m in MOMENTS:
            for k, t in lp.gather(st[m]).items():
                if writers[k] == me:
                    tensors[f"optim/{k}/{m}"] = t.detach().cpu().clone()
        for k in lp.keys:
            if writers[k] == me:
                tensors[f"optim/{k}/step"] = torch.as_tensor(float(st["step"]), dtype=torch.float64)
    return {"tensors": tensors, "rank": rank_state}


def restore_logical(params_of: list, optimizer, reader: CheckpointReader) -> None:
    """Load every parameter, persistent buffer and optimizer state of this rank from ``reader``."""
    lps = logical_params(params_of)
    _copy_weights(lps, lambda k: reader.tensor(f"model/{k}"), f"checkpoint {reader.path}")
    trainable = [lp for lp in lps if isinstance(lp.param, torch.nn.Parameter) and lp.param.requires_grad]
    with_state = [lp for lp in trainable if f"optim/{lp.keys[0]}/step" in reader]
    if not with_state:  # saved before the first optimizer step (or imported): the weights only
        if isinstance(optimizer, ShardedAdamW):
            optimizer.refresh_masters()
        return
    states: dict[int, dict[str, torch.Tensor]] = {}
    for lp in trainable:
        states[id(lp.param)] = {m: lp.shard(lambda k, m=m: reader.tensor(f"optim/{k}/{m}")).to(lp.param.dtype)
                                for m in MOMENTS}
        states[id(lp.param)]["step"] = reader.tensor(f"optim/{lp.keys[0]}/step")
    if isinstance(optimizer, ShardedAdamW):
        optimizer.load_param_states(states)
        return
    for lp in trainable:
        st = states[id(lp.param)]
        optimizer.state[lp.param] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                                     **{m: st[m].to(lp.param.device).clone() for m in MOMENTS}}


def load_weights(params_of: list, optimizer, get, where: str) -> int:
    """Only the weights (parameters and persistent buffers) of this rank from logical tensors ``get(key)``
    (a checkpoint or a Hugging Face directory), for ``checkpoint.init_from``; returns the tensors loaded."""
    lps = logical_params(params_of)
    _copy_weights(lps, get, where)
    if isinstance(optimizer, ShardedAdamW):
        optimizer.refresh_masters()
    return len(lps)


def _copy_weights(lps: list[LogicalParam], get, where: str) -> None:
    """Each parameter / buffer its slice of the logical tensors ``get(key)``, shapes checked."""
    for lp in lps:
        local = lp.shard(get)
        if tuple(local.shape) != tuple(lp.param.shape):
            raise CheckpointError(f"{where}: {lp.name} has shape {tuple(local.shape)} there but the model needs "
                                  f"{tuple(lp.param.shape)} (a different model config?)")
        with torch.no_grad():
            lp.param.copy_(local)
