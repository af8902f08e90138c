"""Overlapped MoE communication: chunk pipelining, gradient partitioning, the α-β model and solver,
simulated links, and the collective-order checker.

Chunked runs are compared with the unchunked layer through the real trainer in float64 over three
optimizer steps (losses, first-step gradients, final parameters), dropless and with capacity, flat
and hier2d, for forward / backward degrees that differ.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moe.overlap import ChunkLayout
from moe.perf_model import AlphaBeta, SectionShape, choose_degree, fit_alpha_beta, makespan
from tests.test_model_parallel import _compare, _train

BASE = [
    "cluster.nodes=2", "cluster.ranks_per_node=2", "model.layers=2", "model.d_model=32", "model.heads=4",
    "model.d_ffn=48", "model.vocab_size=96", "model.seq_len=8", "train.dtype=float64", "train.steps=3",
    "train.micro_batch_size=2", "train.global_batch_size=16", "train.lr=0.01", "train.warmup_steps=1",
    "train.grad_clip=0.5", "data.source=synthetic", "logging.every=1000", "moe.num_experts=8", "moe.topk=2",
    "moe.d_expert=32", "parallel.ep=4", "moe.aux_loss_coef=0.1",
]


def _train_moe(overrides: list[str]) -> dict | None:
    return _train(overrides, BASE)


@functools.cache
def _unchunked(extra: tuple[str, ...]) -> dict:
    from launch.local import LocalRanks

    with LocalRanks(4, ranks_per_node=2, timeout=300) as pool:
        return pool.run(_train_moe, list(extra))[0]


DEGREES = [(1, 1), (2, 3), (3, 1), (4, 2)]
MODES = [("dropless", "flat"), ("capacity", "hier2d"), ("dropless", "hier2d"), ("capacity", "flat")]


@pytest.mark.parametrize("mode,dispatch", MODES, ids=[f"{m}-{d}" for m, d in MODES])
def test_chunked_equals_unchunked(ranks, mode, dispatch):
    extra = (f"moe.dispatch={dispatch}",) + (("moe.capacity_factor=1.0",) if mode == "capacity" else ())
    ref = _unchunked(extra)
    assert ref["losses"][0] != ref["losses"][-1]
    for rf, rb in DEGREES:
        got = ranks(4, 2).run(_train_moe, list(extra) + [f"moe.pipeline_degree={rf}",
                                                          f"moe.bwd_pipeline_degree={rb}"])[0]
        _compare(got, ref)
