"""Bucketed, overlapped DP gradient reduction equals a plain all-reduce; buckets start during backward."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetrain.parallel.data_parallel import GradReducer, clip_grad_norm


def _toy(width: int = 16, depth: int = 4) -> nn.Sequential:
    torch.manual_seed(0)  # same weights on every rank
    return nn.Sequential(*[nn.Linear(width, width).double() for _ in range(depth)])


def _batch(rank: int, integer: bool):
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    x = torch.randint(-3, 4, (8, 16), generator=gen).double() if integer else torch.randn(8, 16, generator=gen).double()
    return x


def _bucketed_vs_plain(integer: bool, bucket_bytes: int, accum: int):
    rank = dist.get_rank()
    model = _toy()
    if integer:  # exactly representable sums: any reduction order gives the same bits
        for p in model.parameters():
            p.data.copy_(torch.randint(-2, 3, p.shape).double())
    reducer = GradReducer([(dist.group.WORLD, list(model.parameters()))], bucket_bytes=bucket_bytes)
    launched_before_backward_end = []

    for micro in range(accum):
        x = _batch(rank * 10 + micro, integer).requires_grad_()
        # fires when backward reaches the model input, i.e. after every parameter gradient
        x.register_hook(lambda g: launched_before_backward_end.append(sum(b.launched for b in reducer.buckets)))
        ctx = reducer.no_sync() if micro < accum - 1 else torch.enable_grad()
        with ctx:
            model(x).pow(2).sum().backward()
    local = {n: p.grad.clone() for n, p in model.named_parameters()}
    reducer.finish()
    plain = {}
    for n, g in local.items():
        t = g.clone()
        dist.all_reduce(t)
        plain[n] = t / dist.get_world_size()
    return {
        "bitwise": all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters()),
        "close": all(torch.allclose(p.grad, plain[n], rtol=1e-13, atol=1e-13) for n, p in model.named_parameters()),
        "buckets": len(reducer.buckets),
        "launched_during_backward": launched_before_backward_end,
    }


def test_bucketed_reduction_equals_plain_all_reduce(ranks):
    pool = ranks(4, 2)
    for out in pool.run(_bucketed_vs_plain, True, 600, 1):
        assert out["bitwise"] and out["buckets"] > 2
    for out in pool.run(_bucketed_vs_plain, False, 600, 3):
        assert out["close"]
        # no communication during no_sync micro-batches; in the last backward, every bucket but the one
        # holding the first layer (whose weight gradient may land after the input gradient) is already
        # in flight when backward reaches the input: communication overlaps backward
        assert out["launched_during_backward"][:2] == [0, 0]
        assert out["launched_during_backward"][2] >= out["buckets"] - 1 >= 2


def _clip_case():
    rank, world = dist.get_rank(), dist.get_world_size()
    # a parameter sharded over ranks (replicas 1) and one replicated on every rank (replicas = world)
    shard = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    shard.grad = torch.arange(3, dtype=torch.float64) + 3 * rank
    rep = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    rep.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    norm = clip_grad_norm([shard, rep], 1.0, {id(shard): 1, id(rep): world})
    full = torch.cat([torch.arange(3 * world, dtype=torch.float64), torch.tensor([1.0, -2.0])])
    ref = nn.Parameter(torch.zeros_like(full))
    ref.grad = full.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    return (norm, float(ref_norm), torch.allclose(shard.grad, ref.grad[3 * rank:3 * rank + 3], rtol=1e-12),
            torch.allclose(rep.grad, ref.grad[-2:], rtol=1e-12))


def test_clipping_equals_single_process_clip(ranks):
    for norm, ref_norm, shard_ok, rep_ok in ranks(4, 2).run(_clip_case):
        assert abs(norm - ref_norm) < 1e-12 * ref_norm
        assert shard_ok and rep_ok


def test_sum_sq_matches_float64_reference_across_chunks():
    """The chunked float64 sum of squares equals the float64 reference for float32 and float64 tensors that
    span several chunks, a partial last chunk, a non-contiguous view and an empty tensor."""
    from moetrain.parallel import data_parallel as dp

    gen = torch.Generator().manual_seed(3)
    n = 3 * dp._NORM_CHUNK + 17
    for dtype in (torch.float32, torch.float64):
        t = torch.randn(n, generator=gen, dtype=dtype) * 1e3
        ref = (t.to(torch.float64) ** 2).sum()
        got = dp.sum_sq(t)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    m = torch.randn(600, 130, generator=gen)[:, ::2]  # not contiguous
    torch.testing.assert_close(dp.sum_sq(m), (m.double() ** 2).sum(), rtol=1e-13, atol=0)
    assert float(dp.sum_sq(torch.empty(0))) == 0.0
    # float32 squares summed in float32 would lose this: 2^25 ones plus one value of 1 each added in float64
    big = torch.ones(1 << 25)
    assert float(dp.sum_sq(big)) == float(1 << 25)
