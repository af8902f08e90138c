"""The whole model, trained through the real trainer: every TP x DP x SP layout equals one process.

float64, gloo, 3 optimizer steps with gradient accumulation and clipping; compares the losses of
every step, every parameter's gradient at the first step, and every parameter after the last step.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from moetrain.config import load_config
from moetrain.launch.job import setup_groups
from moetrain.launch.trainer import Trainer

BASE = [
    "model.layers=2", "model.d_model=64", "model.heads=8", "model.kv_heads=4", "model.d_ffn=96",
    "model.vocab_size=200", "model.seq_len=16", "train.dtype=float64", "train.steps=3",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=0.01", "train.warmup_steps=1",
    "train.grad_clip=0.5", "data.source=synthetic", "logging.every=1000",
]
POOL = {1: (1, 1), 2: (2, 2), 4: (4, 2), 8: (8, 4)}  # world -> (world, ranks_per_node) of the shared pools


def _train(overrides: list[str], base: list[str] | None = None) -> dict | None:
    cfg = load_config(None, (BASE if base is None else base) + overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    first_grads: dict = {}
    step = trainer.optimizer.step

    def capturing_step(*args, **kwargs):
        if not first_grads:
            first_grads.update(trainer.full_tensors(grads=True))  # collective over TP and PP
        return step(*args, **kwargs)

    trainer.optimizer.step = capturing_step
    summary = trainer.fit()
    params = trainer.full_tensors()
    if dist.get_rank() != 0:
        return None
    return {"losses": summary["losses"], "grads": first_grads, "params": params,
            "accum": trainer.data.micro_batches, "grad_norms": summary["grad_norms"],
            "saved_bytes": summary["saved_activation_bytes"], "pipeline": summary["pipeline"],
            "resumed_from": summary["resumed_from"], "steps_run": summary["steps_run"]}


def _layout(tp: int, dp: int, sp: bool) -> list[str]:
    world = tp * dp
    _, rpn = POOL[world]
    return [f"cluster.nodes={world // rpn}", f"cluster.ranks_per_node={rpn}", f"parallel.tp={tp}",
            f"parallel.sp={str(sp).lower()}"]


@functools.cache
def _reference(extra: tuple[str, ...]) -> dict:
    from moetrain.launch.local import LocalRanks

    with LocalRanks(1, timeout=300) as pool:
        return pool.run(_train, _layout(1, 1, False) + list(extra))[0]


def _compare(got: dict, ref: dict) -> None:
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-9, abs=1e-12)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-9)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-9, atol=1e-12, msg=f"grad {name}")
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-9, atol=1e-12, msg=f"param {name}")


LAYOUTS = [(1, 2, False), (2, 1, False), (2, 1, True), (2, 2, False), (2, 2, True), (4, 1, False),
           (4, 1, True), (4, 2, False), (4, 2, True)]


@pytest.mark.parametrize("tp,dp,sp", LAYOUTS, ids=[f"tp{t}-dp{d}-sp{int(s)}" for t, d, s in LAYOUTS])
def test_layout_equals_single_process(ranks, tp, dp, sp):
    ref = _reference(())
    assert ref["accum"] == 4 and len(ref["losses"]) == 3
    assert ref["losses"][0] != ref["losses"][2]  # the run actually trains
    # clipping used the true global norm: the clipped first-step gradient has norm max_norm
    assert ref["grad_norms"][0] > 0.5
    clipped = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref["grads"].values()]))
    assert float(clipped) == pytest.approx(0.5, rel=1e-5)
    got = ranks(*POOL[tp * dp]).run(_train, _layout(tp, dp, sp))[0]
    assert got["accum"] == 4 // dp
    _compare(got, ref)


def test_dropout_and_tied_embeddings_follow_layout_independent_streams(ranks):
    extra = ("model.dropout=0.2", "model.tie_embeddings=true")
    ref = _reference(extra)
    assert ref["losses"] != _reference(())["losses"]
    got = ranks(*POOL[8]).run(_train, _layout(2, 4, True) + list(extra))[0]
    _compare(got, ref)


def test_eager_attention_equals_sdpa(ranks):
    eager = ranks(*POOL[4]).run(_train, _layout(2, 2, False) + ["model.attention=eager"])[0]
    _compare(eager, _reference(()))


def test_wtacrs_sampled_model_is_layout_independent(ranks):
    extra = ("wtacrs.enabled=true", "wtacrs.keep_ratio=0.25", "wtacrs.min_rows=2",
             "wtacrs.layers=[qkv,attn_out,mlp_up,mlp_down]")
    ref = _reference(extra)
    assert ref["losses"] != _reference(())["losses"]  # sampling changes the weight gradients
    got = ranks(*POOL[8]).run(_train, _layout(4, 2, True) + list(extra))[0]
    _compare(got, ref)
