"""Forward-only passes over this rank's model chunks at any layout: the logits of a batch of token ids.

Used to check a model against its Hugging Face original and for validation loss. Pipeline stages hand the
hidden states on with blocking point-to-point transfers in virtual-stage order (no schedule: one batch,
no backward); the last stage's logits, gathered over TP inside the chunk, are summed over the pipeline
group (the other stages add zeros), so every rank returns the same ``[b, s, vocab_size]`` tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.dist.groups import ParallelGroups

__all__ = ["forward_logits", "forward_loss"]


def _forward(chunks, groups: ParallelGroups, ids_BS: torch.Tensor, targets_BS: torch.Tensor | None,
             boundary_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Run this rank's chunks in virtual-stage order; the last stage's output (None on other stages)."""
    pp, stage = groups.size("pp"), groups.rank("pp")
    ranks = groups.members["pp"]
    was = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    result = None
    try:
        hidden = None
        for c, chunk in enumerate(chunks):
            vs = c * pp + stage
            if not chunk.pre:
                hidden = torch.empty(boundary_shape, dtype=dtype, device=ids_BS.device)
                dist.recv(hidden, src=ranks[(vs - 1) % pp], group=groups.group("pp"))
            out = chunk(ids_BS if chunk.pre else hidden, targets_BS if chunk.post else None)
            if chunk.post:
                result = out
            else:
                dist.send(out.to(dtype).contiguous(), dst=ranks[(vs + 1) % pp], group=groups.group("pp"))
    finally:
        for c, mode in zip(chunks, was):
            c.train(mode)
    return result


@torch.no_grad()
def forward_logits(chunks: list[torch.nn.Module], groups: ParallelGroups, ids_BS: torch.Tensor, *,
                   boundary_shape: tuple[int, ...], vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits ``[b, s, vocab_size]`` of ``ids_BS`` (the same tokens on every rank) on every rank (collective)."""
    logits = _forward(chunks, groups, ids_BS, None, boundary_shape, dtype)
    if groups.size("pp") == 1:
        return logits
    b, s = ids_BS.shape
    total = logits if logits is not None else torch.zeros(b, s, vocab_size, dtype=dtype, device=ids_BS.device)
    total = total.to(dtype).contiguous()
    dist.all_reduce(total, group=groups.group("pp"))
    return total


@torch.no_grad()
def forward_loss(chunks: list[torch.nn.Module], groups: ParallelGroups, ids_BS: torch.Tensor,
                 targets_BS: torch.Tensor, *, boundary_shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """The mean token loss of one micro-batch on every rank of its pipeline (collective over pp)."""
    loss = _forward(chunks, groups, ids_BS, targets_BS, boundary_shape, dtype)
    total = torch.zeros((), dtype=torch.float64) if loss is None else loss.detach().to(torch.float64).cpu()
    if groups.size("pp") > 1:
        dist.all_reduce(total, group=groups.group("pp"))
    return float(total)
