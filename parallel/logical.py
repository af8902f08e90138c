"""Logical identity of every parameter: the layout-free name and unsharded tensor it belongs to.

A rank's parameter is a slice of one logical tensor (TP column / row / vocabulary slices, padding
dropped) or a stack of several (grouped experts: one logical tensor per global expert id, unsharded
over expert TP). :func:`logical_params` pairs each local parameter with a collective ``gather``
(local-shaped tensor -> its logical tensors by name) and a communication-free ``shard`` (logical
tensors -> the local slice). Checkpoints use it to save at one layout and load at any other; the
same functions apply to anything shaped like the parameter (gradients, optimizer moments).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.dist.groups import rank_size
from moetrain.parallel.layers import gather_dim, pad_rows

__all__ = ["LogicalParam", "logical_params"]

Getter = Callable[[str], torch.Tensor]


@dataclass
class LogicalParam:
    name: str  # the model-level name (layer ids are global), e.g. layers.3.attn.qkv.weight
    param: torch.Tensor  # a parameter, or a persistent buffer (replicated; no optimizer state)
    keys: list[str]  # the logical tensors this parameter is made of
    gather: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # collective over TP / EP / expert TP
    shard: Callable[[Getter], torch.Tensor]  # reads logical tensors by key -> this rank's slice


def _experts(mod, mod_name: str, pname: str, p: nn.Parameter) -> LogicalParam:
    E = mod.num_local * rank_size(mod.ep_group)[1]
    keys = [f"{mod_name}.{gid}.{pname}" for gid in range(E)]  # the names the state_dict uses too
    own = keys[mod.first:mod.first + mod.num_local]

    def gather(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(keys, mod.full(t, pname).unbind(0)))

    def shard(get: Getter) -> torch.Tensor:
        return mod.shard(torch.stack([get(k) for k in own]), pname)

    return LogicalParam(f"{mod_name}.{pname}", p, keys, gather, shard)


def _head(chunk, name: str, p: nn.Parameter) -> LogicalParam:
    vocab = chunk.args.vocab_size

    def gather(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: gather_dim(t.detach(), 0, chunk.tp_group)[:vocab]}

    def shard(get: Getter) -> torch.Tensor:
        rank, tp = rank_size(chunk.tp_group)
        return pad_rows(get(name), chunk.vocab_padded).chunk(tp, dim=0)[rank]

    return LogicalParam(name, p, [name], gather, shard)


def _plain(mod, name: str, p: nn.Parameter) -> LogicalParam:
    if mod is not None and hasattr(mod, "full"):
        def gather(t):
            return {name: mod.full(t.detach())}

        def shard(get):
            return mod.shard(get(name))
    else:  # replicated over TP
        def gather(t):
            return {name: t.detach().clone()}

        def shard(get):
            return get(name)
    return LogicalParam(name, p, [name], gather, shard)


def logical_params(chunks) -> list[LogicalParam]:
    """Every trainable parameter of this rank's model chunks, in a fixed order (the same on every rank
    of a stage, so collective gathers line up)."""
    out = []
    for chunk in chunks:
        for mod_name, mod in chunk.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if name == "head.weight":
                    out.append(_head(chunk, name, p))
                elif hasattr(mod, "ep_group") and hasattr(mod, "shard"):
                    out.append(_experts(mod, mod_name, p_name, p))
                else:
                    out.append(_plain(mod, name, p))
            for b_name, b in mod.named_buffers(recurse=False):
                if b_name not in mod._non_persistent_buffers_set:  # e.g. the aux-loss-free expert bias
                    out.append(_plain(None, f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out
