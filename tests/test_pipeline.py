"""Pipeline parallelism: schedules (pure), partitioning, and every pipelined layout equal to one process.

The multi-rank tests train a 8-layer model with MoE blocks (aux and z losses produced in middle
stages) for 3 steps in float64 and compare losses, the first step's gradients and the final
parameters with the single-process run, as ``test_model_parallel`` does for TP x DP.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moetrain.launch.local import RankFailure
from moetrain.parallel.pipeline import partition_layers
from moetrain.parallel.schedules import SCHEDULES, Action, build_schedule, simulate, theoretical_bubble
from tests.test_model_parallel import POOL, _compare, _train

# ------------------------------------------------------------------ schedules (no ranks)
CASES = [(name, p, m, 2 if name == "interleaved" else 1) for name in SCHEDULES for p in (2, 3, 4)
         for m in range(1, 10) if not (name == "interleaved" and m % p)]


@pytest.mark.parametrize("name,p,m,v", CASES)
def test_schedule_runs_every_action_once_in_dependency_order(name, p, m, v):
    lists = build_schedule(name, p, m, v)
    split = name == "zero_bubble"
    timeline = simulate(lists, v, split_backward=split)  # raises on deadlock
    kinds = "FBW" if split else "FB"
    for r, actions in enumerate(lists):
        assert sorted(map(repr, actions)) == sorted(repr(Action(k, mb, c)) for k in kinds for mb in range(m)
                                                     for c in range(v))
        for mb in range(m):
            for c in range(v):
                at = {k: actions.index(Action(k, mb, c)) for k in kinds}
                assert at["F"] < at["B"] and (not split or at["B"] < at["W"])
        if name in ("1f1b", "zero_bubble"):  # 1F1B's memory bound: at most p micro-batches in flight
            live, peak = 0, 0
            for a in actions:
                live += a.kind == "F"
                live -= a.kind == ("W" if split else "B")
                peak = max(peak, live)
            assert peak <= p - (0 if split else r)
    if m >= p:  # the steady-state formulas hold from m = p on
        assert timeline.bubble() == pytest.approx(theoretical_bubble(name, p, m, v), abs=1e-12)


def test_zero_bubble_beats_1f1b_and_interleaved_beats_1f1b():
    for p, m in ((2, 4), (4, 8), (4, 16)):
        one = simulate(build_schedule("1f1b", p, m), split_backward=False).makespan
        zb = simulate(build_schedule("zero_bubble", p, m), split_backward=True).makespan
        assert (one, zb) == (3 * m + 3 * (p - 1), 3 * m + p - 1)
        inter = simulate(build_schedule("interleaved", p, m, 2), 2, cost={"F": 0.5, "B": 1.0, "W": 0.0}).makespan
        assert inter < one


def test_schedule_rejects_bad_requests():
    with pytest.raises(ValueError, match="multiple of pp=4"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="one model chunk"):
        build_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build_schedule("zb", 2, 4)


def test_partition_layers_balances_cost():
    assert partition_layers([1] * 8, 4) == [2, 2, 2, 2]
    assert partition_layers([1] * 8, 2, last_extra=2) == [5, 3]
    assert partition_layers([1, 4, 1, 4, 1, 4], 3) == [2, 2, 2]
    assert partition_layers([10, 1, 1, 1, 1], 2) == [1, 4]
    assert partition_layers([1, 1, 1], 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least one layer"):
        partition_layers([1, 1], 3)


# ------------------------------------------------------------------ pipelined training == one process
BASE = [
    "model.layers=8", "model.d_model=32", "model.heads=4", "model.kv_heads=2", "model.d_ffn=48",
    "model.vocab_size=96", "model.seq_len=8", "train.dtype=float64", "train.steps=3",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=0.01", "train.warmup_steps=1",
    "train.grad_clip=0.5", "data.source=synthetic", "logging.every=1000",
    "moe.num_experts=4", "moe.topk=2", "moe.every=2", "moe.d_expert=32", "moe.aux_loss_coef=0.1",
    "moe.z_loss_coef=0.01",
]


def _train_pipe(overrides: list[str]) -> dict | None:
    return _train(overrides, BASE)


def _layout(tp: int, pp: int, dp: int, *, sp: bool = False, ep: int = 1, schedule: str = "1f1b",
            vpp: int = 1) -> list[str]:
    world = tp * pp * dp
    _, rpn = POOL[world]
    return [f"cluster.nodes={world // rpn}", f"cluster.ranks_per_node={rpn}", f"parallel.tp={tp}",
            f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.sp={str(sp).lower()}",
            f"parallel.schedule={schedule}", f"parallel.vpp={vpp}"]


@functools.cache
def _reference(extra: tuple[str, ...] = ()) -> dict:
    from moetrain.launch.local import LocalRanks

    with LocalRanks(1, timeout=300) as pool:
        return pool.run(_train_pipe, _layout(1, 1, 1) + list(extra))[0]


PIPES = [(p, s) for p in (2, 4) for s in SCHEDULES]


@pytest.mark.parametrize("pp,schedule", PIPES, ids=[f"pp{p}-{s}" for p, s in PIPES])
def test_pipeline_schedule_equals_single_process(ranks, pp, schedule):
    ref = _reference()
    assert ref["accum"] == 4 and ref["losses"][0] != ref["losses"][2]
    assert any(k.endswith("router.weight") for k in ref["grads"])  # MoE layers in every stage
    got = ranks(*POOL[pp]).run(_train_pipe, _layout(1, pp, 1, schedule=schedule,
                                                    vpp=2 if schedule == "interleaved" else 1))[0]
    _compare(got, ref)


@pytest.mark.parametrize("sp", [False, True], ids=["sp0", "sp1"])
def test_tp2_pp2_dp2_with_experts_equals_single_process(ranks, sp):
    got = ranks(*POOL[8]).run(_train_pipe, _layout(2, 2, 2, sp=sp, ep=2))[0]
    _compare(got, _reference())


def test_interleaved_zero_bubble_layouts_with_tp_dp_ep(ranks):
    # with the expert weight-gradient overlap forced on: zero-bubble deferral takes the weight GEMMs first
    got = ranks(*POOL[8]).run(_train_pipe, _layout(2, 2, 2, ep=4, schedule="zero_bubble")
                              + ["moe.overlap_wgrad=true"])[0]
    _compare(got, _reference())
    got = ranks(*POOL[8]).run(_train_pipe, _layout(1, 2, 4, ep=2, schedule="interleaved", vpp=2)
                              + ["train.global_batch_size=16", "moe.overlap_wgrad=true"])[0]
    _compare(got, _reference(("train.global_batch_size=16",)))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_identical_losses_and_gradients(ranks, mode):
    extra = ("model.dropout=0.1",)
    ref = _reference(extra)
    one = ranks(1, 1).run(_train_pipe, _layout(1, 1, 1) + list(extra) + [f"train.recompute={mode}"])[0]
    assert one["losses"] == ref["losses"]
    for name, g in ref["grads"].items():
        assert torch.equal(one["grads"][name], g), name
    assert one["saved_bytes"] < ref["saved_bytes"]  # it really dropped activations
    got = ranks(*POOL[4]).run(_train_pipe, _layout(1, 4, 1, schedule="zero_bubble") + list(extra)
                              + [f"train.recompute={mode}"])[0]
    _compare(got, ref)


def test_tied_embeddings_dropout_and_wtacrs_through_zero_bubble(ranks):
    extra = ("model.tie_embeddings=true", "model.dropout=0.1", "wtacrs.enabled=true", "wtacrs.keep_ratio=0.25",
             "wtacrs.min_rows=2", "wtacrs.layers=[qkv,attn_out,mlp_up,mlp_down]")
    ref = _reference(extra)
    assert "head.weight" not in ref["grads"]
    got = ranks(*POOL[4]).run(_train_pipe, _layout(2, 2, 1, sp=True, schedule="zero_bubble") + list(extra))[0]
    _compare(got, ref)


def test_explicit_stage_layers_and_summary(ranks):
    got = ranks(*POOL[2]).run(_train_pipe, _layout(1, 2, 1) + ["parallel.pipeline_layers=[3,5]"])[0]
    _compare(got, _reference())
    assert got["pipeline"] == {"schedule": "1f1b", "vpp": 1, "stage_layers": [3, 5]}
    default = ranks(*POOL[4]).run(_train_pipe, _layout(1, 4, 1))[0]["pipeline"]
    assert sum(default["stage_layers"]) == 8 and default["stage_layers"][-1] <= default["stage_layers"][0]


def _fit_pipe(overrides: list[str]) -> dict:
    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, BASE + overrides)
    return Trainer(cfg, setup_groups(cfg)).fit()


def test_pipelined_checkpoint_resume_equals_uninterrupted(ranks, tmp_path):
    pool = ranks(*POOL[4])
    layout = _layout(2, 2, 1, schedule="zero_bubble") + ["train.steps=4", "checkpoint.every=2",
                                                          "model.tie_embeddings=true", "moe.router=sigmoid",
                                                          "moe.bias_update_rate=0.01"]
    whole = pool.run(_fit_pipe, layout + [f"checkpoint.dir={tmp_path / 'a'}"])[0]
    with pytest.raises(RankFailure):  # interrupted after the step-2 checkpoint (a stop at train.steps=2 would
        # end the LR schedule there: a resumed run keeps its first run's schedule length)
        pool.run(_fit_pipe, layout + [f"checkpoint.dir={tmp_path / 'b'}",
                                      "fault.inject={rank: 1, step: 2, kind: exception}"])
    resumed = pool.run(_fit_pipe, layout + [f"checkpoint.dir={tmp_path / 'b'}"])[0]
    assert resumed["resumed_from"].endswith("step_00000002") and resumed["steps_run"] == 2
    assert resumed["losses"] == whole["losses"]
