"""Tensor-parallel layers equal their nn counterparts in float64: outputs and all gradients, SP on/off."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_normal,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)

S, B, DIN, DOUT, SEED = 8, 3, 12, 16, 7
TOL = dict(rtol=1e-12, atol=1e-12)


def _tp_group(tp: int):
    """A TP group over consecutive ranks (every rank creates every group)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, tp):
        g = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = g
    return mine


def _rand(*shape, name):
    return init_normal(shape, 1.0, 99, name).double()


def _column_case(tp: int, sp: bool) -> list[str]:
    group = _tp_group(tp)
    r = dist.get_rank(group)
    parts = [DOUT, DOUT // 2]
    layer = ColumnParallelLinear(DIN, parts, tp_group=group, sp=sp, seed=SEED, name="col", std=0.5,
                                 dtype=torch.float64)
    w_full = torch.cat([init_normal((n, DIN), 0.5, SEED, f"col.{i}") for i, n in enumerate(parts)]).double()
    ref_lin = torch.nn.Linear(DIN, sum(parts), bias=False).double()
    ref_lin.weight.data.copy_(w_full)
    x = _rand(S, B, DIN, name="x").requires_grad_()
    dy = _rand(S, B, sum(parts), name="dy")
    y_ref = ref_lin(x)
    y_ref.backward(dy)

    x_local = (x.detach().chunk(tp, 0)[r] if sp else x.detach()).clone().requires_grad_()
    y_local = layer(x_local)
    # this rank's output columns: the slice of each part
    cols = torch.cat([torch.arange(off + r * n // tp, off + (r + 1) * n // tp)
                      for off, n in zip([0, DOUT], parts)])
    y_local.backward(dy[..., cols])
    fails = []
    if not torch.allclose(y_local, y_ref[..., cols], **TOL):
        fails.append("output")
    dx = x.grad.chunk(tp, 0)[r] if sp else x.grad
    if not torch.allclose(x_local.grad, dx, **TOL):
        fails.append("input grad")
    if not torch.allclose(layer.full(layer.weight.grad), ref_lin.weight.grad, **TOL):
        fails.append("weight grad")
    if not torch.allclose(layer.full(layer.weight.data), w_full, **TOL):
        fails.append("weight init")
    return fails


def _row_case(tp: int, sp: bool) -> list[str]:
    group = _tp_group(tp)
    r = dist.get_rank(group)
    layer = RowParallelLinear(DIN, DOUT, tp_group=group, sp=sp, seed=SEED, name="row", std=0.5, dtype=torch.float64)
    ref_lin = torch.nn.Linear(DIN, DOUT, bias=False).double()
    ref_lin.weight.data.copy_(init_normal((DOUT, DIN), 0.5, SEED, "row").double())
    x = _rand(S, B, DIN, name="x").requires_grad_()
    dy = _rand(S, B, DOUT, name="dy")
    y_ref = ref_lin(x)
    y_ref.backward(dy)
    x_local = x.detach().chunk(tp, -1)[r].clone().requires_grad_()
    y = layer(x_local)
    y.backward(dy.chunk(tp, 0)[r] if sp else dy)
    fails = []
    if not torch.allclose(y, y_ref.chunk(tp, 0)[r] if sp else y_ref, **TOL):
        fails.append("output")
    if not torch.allclose(x_local.grad, x.grad.chunk(tp, -1)[r], **TOL):
        fails.append("input grad")
    if not torch.allclose(layer.full(layer.weight.grad), ref_lin.weight.grad, **TOL):
        fails.append("weight grad")
    return fails


def _embedding_and_loss_case(tp: int, sp: bool) -> list[str]:
    group = _tp_group(tp)
    r = dist.get_rank(group)
    vocab, d = 200, 8  # padded to 256 (tp 1, 2) or 512 (tp 4): padding must not change anything
    emb = VocabParallelEmbedding(vocab, d, tp_group=group, sp=sp, seed=SEED, name="embed", std=1.0,
                                 dtype=torch.float64)
    ref = torch.nn.Embedding(vocab, d).double()
    ref.weight.data.copy_(init_normal((vocab, d), 1.0, SEED, "embed").double())
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (S, B), generator=gen)
    ids[0, 0], ids[1, 0] = 0, vocab - 1  # both ends of the vocabulary
    dy = _rand(S, B, d, name="dy-emb")
    out_ref = ref(ids)
    out_ref.backward(dy)
    out = emb(ids)
    out.backward(dy.chunk(tp, 0)[r] if sp else dy)
    fails = []
    if not torch.allclose(out, out_ref.chunk(tp, 0)[r] if sp else out_ref, **TOL):
        fails.append("embedding output")
    if not torch.allclose(emb.full(emb.weight.grad), ref.weight.grad, **TOL):
        fails.append("embedding weight grad")

    # vocab-parallel cross-entropy vs F.cross_entropy; padded logits are excluded from the softmax
    padded = padded_vocab_size(vocab, tp)
    logits_full = torch.full((S, B, padded), 123.0, dtype=torch.float64)  # garbage in padding
    logits_full[..., :vocab] = _rand(S, B, vocab, name="logits") * 3
    targets = torch.randint(0, vocab, (S, B), generator=gen)
    local = logits_full.chunk(tp, -1)[r].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, group, vocab)
    weights = _rand(S, B, name="lw")
    (loss * weights).sum().backward()
    ref_logits = logits_full[..., :vocab].clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, vocab), targets.reshape(-1), reduction="none").view(S, B)
    (ref_loss * weights).sum().backward()
    if not torch.allclose(loss, ref_loss, **TOL):
        fails.append("cross-entropy loss")
    grad_full = torch.zeros(S, B, padded, dtype=torch.float64)
    grad_full[..., :vocab] = ref_logits.grad
    if not torch.allclose(local.grad, grad_full.chunk(tp, -1)[r], **TOL):
        fails.append("cross-entropy grad")
    return fails


def _all_cases(tp: int) -> dict[str, list[str]]:
    out = {}
    for sp in (False, True):
        out[f"column sp={sp}"] = _column_case(tp, sp)
        out[f"row sp={sp}"] = _row_case(tp, sp)
        out[f"embedding+loss sp={sp}"] = _embedding_and_loss_case(tp, sp)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_equal_nn_counterparts(ranks, tp):
    for rank, result in enumerate(ranks(4, 2).run(_all_cases, tp)):
        failed = {case: f for case, f in result.items() if f}
        assert not failed, f"rank {rank}: {failed}"


def test_padded_vocab_size():
    assert padded_vocab_size(256, 1) == 256 and padded_vocab_size(257, 1) == 384
    assert padded_vocab_size(200, 4) == 512 and padded_vocab_size(32000, 8) == 32768
