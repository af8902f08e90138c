"""Overlapped MoE communication: chunk pipelining, gradient partitioning, the α-β model and solver,
simulated links, and the collective-order checker.

Chunked runs are compared with the unchunked layer through the real trainer in float64 over three
optimizer steps (losses, first-step gradients, final parameters), dropless and with capacity, flat
and hier2d, for forward / backward degrees that differ.
"""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch

from moetrain.moe.overlap import ChunkLayout
from moetrain.moe.perf_model import (
    AlphaBeta,
    SectionShape,
    choose_degree,
    choose_degrees,
    choose_schedule,
    fit_alpha_beta,
    fit_per_call,
    fit_per_call_envelope,
    makespan,
    pair_time,
)
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
    from moetrain.launch.local import LocalRanks

    with LocalRanks(4, ranks_per_node=2, timeout=300) as pool:
        return pool.run(_train_moe, list(extra))[0]


DEGREES = [(1, 1), (2, 3), (3, 1), (4, 2)]
MODES = [("dropless", "flat"), ("capacity", "hier2d"), ("dropless", "hier2d"), ("capacity", "flat")]


@pytest.mark.parametrize("i", range(len(MODES)), ids=[f"{m}-{d}" for m, d in MODES])
def test_chunked_equals_unchunked(ranks, i):
    """Every mode at two degree pairs; over the four modes every pair of DEGREES runs twice."""
    mode, dispatch = MODES[i]
    extra = (f"moe.dispatch={dispatch}",) + (("moe.capacity_factor=1.0",) if mode == "capacity" else ())
    ref = _unchunked(extra)
    assert ref["losses"][0] != ref["losses"][-1]
    for rf, rb in (DEGREES[i], DEGREES[(i + 1) % len(DEGREES)]):
        got = ranks(4, 2).run(_train_moe, list(extra) + [f"moe.pipeline_degree={rf}",
                                                          f"moe.bwd_pipeline_degree={rb}"])[0]
        _compare(got, ref)


def _grads_and_events(overrides: list[str]) -> dict | None:
    import torch.distributed as dist

    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, BASE + overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    grads: dict = {}
    step = trainer.optimizer.step

    def capturing_step(*args, **kwargs):
        grads.update({f"{i}": p.grad.clone() for i, p in enumerate(trainer.params) if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = capturing_step
    trainer.train_step()
    events = list(trainer.reducer.last_events)
    times = {"ready": {}, "launch": {}}
    for kind, b, t, *_ in events:
        times[kind].setdefault(b, t)
    out = {"grads": grads, "events": events, "n_buckets": len(trainer.reducer.buckets), "times": times,
           "windows": [e for e in events if e[0] == "launch" and e[3] == "window"]}
    trainer.engine.close()
    return out if dist.get_rank() == 1 else None


def test_partitioned_gradient_reduction_is_bit_identical_and_never_early(ranks):
    extra = ["model.layers=4", "moe.every=2", "train.bucket_mb=0.002", "moe.pipeline_degree=2",
             "moe.bwd_pipeline_degree=2", "train.global_batch_size=8"]
    held = ranks(4, 2).run(_grads_and_events, extra + ["moe.partition_grads=true"])[1]
    plain = ranks(4, 2).run(_grads_and_events, extra + ["moe.partition_grads=false"])[1]
    assert held["n_buckets"] > 4
    for k, g in plain["grads"].items():
        assert torch.equal(held["grads"][k], g), k  # bit for bit
    assert held["windows"], "no bucket was placed in an MoE backward window"
    launches = [b for kind, b, *_ in held["events"] if kind == "launch"]
    assert launches == sorted(launches)  # strictly in bucket order on every rank
    for b, t in held["times"]["launch"].items():
        source = next(e[3] for e in held["events"] if e[0] == "launch" and e[1] == b)
        if source != "finish":
            assert b in held["times"]["ready"] and held["times"]["ready"][b] <= t
    assert {e[3] for e in held["events"] if e[0] == "launch"} <= {"window", "finish"}  # never at once
    assert {e[3] for e in plain["events"] if e[0] == "launch"} <= {"ready", "finish"}


def _pipelined_layer(degrees, inter_first: bool) -> dict | None:
    """One MoE layer (hier2d, dropless, float64) on 2 nodes x 2 over three SGD steps: each step's output and
    every gradient, and the final weights, chunk-pipelined on the link engine at ``degrees`` with hier2d's
    phases in either order, or unchunked (degrees None)."""
    import torch.distributed as dist

    from moetrain.config import MoEConfig
    from moetrain.dist.groups import create_groups
    from moetrain.dist.links import LinkEngine
    from moetrain.dist.topology import Layout, build_rank_grid
    from moetrain.moe.layer import MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    world = dist.get_world_size()
    grid = build_rank_grid(Layout(dp=world, ep=world), ranks_per_node=2)
    groups = create_groups(grid)
    args = MoEConfig(num_experts=8, topk=2, d_expert=10, dispatch="hier2d", activation="swiglu", aux_loss_coef=0.0)
    engine = None
    runtime = MoERuntime()
    if degrees is not None:
        engine = LinkEngine(node_of=[grid.node_of(r) for r in range(world)], coschedule=True)
        engine.record = True
        runtime = MoERuntime(engine=engine, degrees=degrees, inter_first=inter_first)
    layer = MoELayer(args, 0, MoEGroups.from_parallel(groups), d_model=12, seed=3, sp=False, dtype=torch.float64,
                     runtime=runtime)
    out = {}
    for step in range(3):
        x = torch.randn(9, 2, 12, generator=torch.Generator().manual_seed(10 * dist.get_rank() + step),
                        dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.pow(2).mean().backward()
        out.update({f"{step}/y": y.detach(), f"{step}/gx": x.grad,
                    **{f"{step}/{n}.grad": p.grad.clone() for n, p in layer.named_parameters()}})
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
        layer.zero_grad(set_to_none=True)
    out.update({n: p.detach().clone() for n, p in layer.named_parameters()})
    if engine is not None:
        out["first_link"] = min((sp.start, sp.link) for sp in engine.spans if sp.tag.endswith("/fd0"))[1]
        engine.close()
    return out


def test_pipelined_hier2d_inter_first_equals_unchunked(ranks):
    pool = ranks(4, 2)
    ref = pool.run(_pipelined_layer, None, False)
    for degrees in ((2, 3), (3, 1)):
        for inter_first in (False, True):
            got = pool.run(_pipelined_layer, degrees, inter_first)
            for r, (a, b) in enumerate(zip(got, ref)):
                assert a.pop("first_link") == ("inter" if inter_first else "intra")
                assert a.keys() == b.keys()
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=f"{degrees} {inter_first} "
                                                                                       f"rank {r} {k}")


def _deferred_turns() -> dict:
    """Two jobs on one channel: A (two all-reduces, the second deferred), then B; A's second step must run
    after B's. Then a job that fails in a local step before its deferred turn: the channel skips the
    turn and a later job still runs."""
    import torch.distributed as dist

    from moetrain.dist.links import LinkEngine

    engine = LinkEngine(node_of=[0] * dist.get_world_size(), coschedule=True)
    g = dist.group.WORLD
    x = torch.ones(3)
    a = engine.submit(x.clone(), [engine.allreduce_step(g, tag="a0"), engine.allreduce_step(g, tag="a1")],
                      defer_from=1)
    b = engine.submit(x.clone(), [engine.allreduce_step(g, tag="b0")])
    engine.release(a)
    a_out, b_out = a.wait(), b.wait()
    order = [sp.tag for sp in engine.spans]

    def boom(_):
        raise ValueError("local step failed")

    bad = engine.submit(x.clone(), [engine.local_step(boom), engine.allreduce_step(g, tag="bad")], defer_from=0)
    engine.release(bad)
    failed = False
    try:
        bad.wait()
    except RuntimeError:
        failed = True
    after = engine.submit(x.clone(), [engine.allreduce_step(g, tag="after")]).wait()
    engine.close()
    n = dist.get_world_size()
    return {"order": order, "a": a_out.tolist() == [n * n] * 3, "b": b_out.tolist() == [n] * 3, "failed": failed,
            "after": after.tolist() == [n] * 3}


def test_deferred_turns_run_after_later_jobs_and_failed_jobs_release_them(ranks):
    for res in ranks(2).run(_deferred_turns):
        assert res["order"] == ["a0", "b0", "a1"], res["order"]
        assert res["a"] and res["b"] and res["failed"] and res["after"], res


def test_schedule_puts_the_slower_link_first():
    """hier2d's recorded order is intra then inter: the solver reverses it when inter is the slower link
    (the inter link then starts at once and ends last) and keeps it when intra is."""
    shape = SectionShape(steps=(("intra", 1e7), ("inter", 1e7)), rows=1e3)
    compute = AlphaBeta(1e-4, 1e-6)
    slow_inter = {"intra": AlphaBeta(1e-4, 1e-9), "inter": AlphaBeta(1e-4, 4e-9)}
    slow_intra = {"intra": AlphaBeta(1e-4, 4e-9), "inter": AlphaBeta(1e-4, 1e-9)}
    (rf, rb), rev, table = choose_schedule(shape, slow_inter, compute, compute, reorder=True)
    assert rev and rf > 1
    reversed_shape = SectionShape(tuple(reversed(shape.steps)), shape.rows)
    assert makespan(rf, reversed_shape, slow_inter, compute)[0] < makespan(rf, shape, slow_inter, compute)[0]
    assert not choose_schedule(shape, slow_intra, compute, compute, reorder=True)[1]
    assert not choose_schedule(shape, slow_inter, compute, compute, reorder=False)[1]


# ------------------------------------------------------------------ model and solver (no ranks)
def test_fit_alpha_beta_recovers_a_line():
    ab = fit_alpha_beta([1e3, 2e3, 4e3, 8e3], [1e-3 + 2e-9 * n for n in (1e3, 2e3, 4e3, 8e3)])
    assert ab.alpha == pytest.approx(1e-3) and ab.beta == pytest.approx(2e-9)
    assert fit_alpha_beta([5.0, 5.0], [2.0, 2.0]) == AlphaBeta(0.0, 0.4)  # one size: all of it is beta


def test_degree_solver_known_optima():
    links = {"intra": AlphaBeta(0.01, 1e-8), "inter": AlphaBeta(0.01, 1e-8)}
    shape = SectionShape(steps=(("inter", 1e8),), rows=1e4)  # each direction 1.0 s, experts 1.0 s
    compute = AlphaBeta(0.01, 1e-4)
    # worked by hand: r=1: 3.03 s; r=2: 2.04 s; r=3: 2.06 s
    assert makespan(1, shape, links, compute)[0] == pytest.approx(3.03)
    assert makespan(2, shape, links, compute)[0] == pytest.approx(2.04)
    assert makespan(3, shape, links, compute)[0] == pytest.approx(2.06)
    assert choose_degree(shape, links, compute)[0] == 2
    # latency dominates: no chunking
    slow = {"intra": AlphaBeta(1.0, 1e-12), "inter": AlphaBeta(1.0, 1e-12)}
    assert choose_degree(shape, slow, AlphaBeta(1.0, 1e-9))[0] == 1
    # the degree grows with the volume when per-chunk latency stays fixed
    picked = []
    for volume in (1e4, 1e6, 1e7, 1e8):
        s = SectionShape(steps=(("intra", volume), ("inter", volume)), rows=volume / 1e3)
        picked.append(choose_degree(s, {"intra": AlphaBeta(1e-3, 1e-9), "inter": AlphaBeta(1e-3, 1e-8)},
                                    AlphaBeta(1e-3, 1e-4), max_degree=16)[0])
    assert picked[0] == 1 and picked == sorted(picked) and picked[-1] >= 4


def test_per_call_fit_and_joint_choice_pay_for_micro_chunks_and_chunk_overhead():
    # chunk time = 2 ms per expert call + 1 us per row, recovered from chunks of different call counts
    calls, rows = [1, 1, 2, 3, 6], [4000, 2000, 2000, 1000, 3000]
    ab = fit_per_call(calls, rows, [2e-3 * c + 1e-6 * n for c, n in zip(calls, rows)])
    assert ab.alpha == pytest.approx(2e-3) and ab.beta == pytest.approx(1e-6)
    # one sample 100x slow (a cold first backward, a descheduled thread) skews least squares, not the envelope
    times = [2e-3 * c + 1e-6 * n for c, n in zip(calls, rows)]
    times[1] *= 100
    skewed = fit_per_call(calls, rows, times)
    assert skewed.beta > 5e-6 or skewed.alpha > 5e-3
    env = fit_per_call_envelope(calls, rows, times)
    assert env.alpha == pytest.approx(2e-3) and env.beta == pytest.approx(1e-6)
    assert fit_per_call_envelope(calls, rows, [2e-3 * c + 1e-6 * n for c, n in zip(calls, rows)]) == ab
    links = {"intra": AlphaBeta(1e-3, 1e-9), "inter": AlphaBeta(5e-3, 1e-8)}
    shape = SectionShape(steps=(("inter", 2e6),), rows=2e3)
    fw, bw = AlphaBeta(1e-4, 1e-6), AlphaBeta(1e-4, 2e-5)
    rf, rb = choose_degree(shape, links, fw)[0], choose_degree(shape, links, bw)[0]
    assert rf != rb  # solved apart, the directions want different degrees ...
    free = choose_degrees(shape, links, fw, bw)[0]
    assert free == (rf, rb)  # ... and with cheap expert calls the joint choice agrees
    # expensive calls: lcm(rf, rb) micro-chunks cost too much, the pair moves to a common multiple
    (jf, jb), table = choose_degrees(shape, links, AlphaBeta(2e-2, 1e-6), AlphaBeta(2e-2, 2e-5))
    assert math.lcm(jf, jb) < math.lcm(rf, rb) and table[(jf, jb)] < table[(rf, rb)]
    # a per-chunk overhead the links and experts do not show pulls both degrees down
    low = choose_degrees(shape, links, fw, bw, overhead=(5e-2, 5e-2))[0]
    assert low[0] <= rf and low[1] <= rb and low != (rf, rb)
    assert pair_time(2, 3, shape, links, fw, bw, (1.0, 0.0)) == pytest.approx(pair_time(2, 3, shape, links, fw, bw)
                                                                                + 2.0)
    assert choose_degrees(shape, links, fw, bw, fixed=(None, 5))[0][1] == 5  # a user-set direction stays


def test_backward_degree_differs_when_compute_doubles():
    links = {"intra": AlphaBeta(1e-3, 1e-9), "inter": AlphaBeta(5e-3, 1e-8)}
    shape = SectionShape(steps=(("inter", 2e6),), rows=2e3)
    fwd = choose_degree(shape, links, AlphaBeta(1e-3, 1e-6))[0]
    bwd = choose_degree(shape, links, AlphaBeta(1e-3, 2e-5))[0]
    assert fwd != bwd


@pytest.mark.parametrize("G", [1, 2, 3, 6])
def test_chunk_layout_covers_every_row_once(G):
    counts = torch.tensor([[3, 0, 5, 1], [2, 7, 0, 0]])
    lay = ChunkLayout(counts, me=1, local_experts=2, micro=G)
    send = torch.cat([lay.send_index(range(g, g + 1)) for g in range(G)])
    assert sorted(send.tolist()) == list(range(int(counts[1].sum())))
    assert torch.equal(sum(lay.counts(range(g, g + 1)) for g in range(G)), counts)
    pieces, cnt = lay.recv_pieces(range(0, G))  # member 1 owns experts 2, 3
    assert sorted(torch.cat(pieces).tolist()) == list(range(5 + 1 + 0 + 0))
    assert [sum(sum(r) for r in c) for c in cnt] == [len(p) for p in pieces]


# ------------------------------------------------------------------ collective-order checker
def _diverge() -> str:
    import torch.distributed as dist

    from moetrain.dist import collective_check

    collective_check.enable(timeout_s=20)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)  # the same on both
        if dist.get_rank() == 0:
            dist.all_reduce(t)
        else:
            dist.all_gather([torch.empty(3), torch.empty(3)], t)
        return "no error"
    except collective_check.CollectiveMismatch as exc:
        return str(exc)
    finally:
        collective_check.disable()


def _agree() -> str:
    import torch.distributed as dist

    from moetrain.dist import collective_check

    collective_check.enable(timeout_s=20)
    try:
        import time

        t = torch.ones(3)
        dist.all_reduce(t)
        if dist.get_rank() == 1:
            time.sleep(0.5)  # rank 0 looks for rank 1's entry of call #1 before rank 1 has written it
        dist.all_reduce(t)
        return "no error"
    except collective_check.CollectiveMismatch as exc:
        return str(exc)
    finally:
        collective_check.disable()


def test_collective_order_checker_catches_divergence(ranks):
    out = ranks(2, 2).run(_diverge)
    for msg in out:
        assert "collective #1 of group [0, 1] diverges" in msg
        assert "all_reduce((3,):float32)" in msg and "all_gather(2x(3,), (3,):float32)" in msg
    # a later checked run in the same processes does not read the first run's entries
    assert ranks(2, 2).run(_agree) == ["no error", "no error"]


# ------------------------------------------------------------------ simulated links: what is overlapped
def _union(iv):
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap(u, v) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in u for c, d in v)


def _timeline_figures(result: dict) -> dict:
    """From one rank's last recorded step: link busy time, the share hidden behind compute, intra∩inter."""
    spans, waits = result["last_timeline"]
    comm = _union([(s, e) for _, _, s, e in spans])
    busy = sum(b - a for a, b in comm)
    per_link = {k: _union([(s, e) for link, _, s, e in spans if link == k]) for k in ("intra", "inter")}
    return {"busy": busy, "hidden": busy - _overlap(comm, _union(waits)),
            "both_links": _overlap(per_link["intra"], per_link["inter"]),
            "intra": sum(b - a for a, b in per_link["intra"]), "inter": sum(b - a for a, b in per_link["inter"])}


def test_overlapped_section_runs_both_links_at_once_and_hides_transfers(ranks):
    """Structure, not speed (the speed-up is the benchmark's job, benchmarks/RESULTS.md): in the
    recorded timeline of (c) the intra and inter links are busy at the same time and transfers run
    while the rank computes; in (a) one channel serialises the links and the rank waits for each."""
    from benchmarks.overlap import run_setting

    links = {"intra": (50e-6, 0.0015e9), "inter": (50e-6, 0.0015e9)}  # slow links: communication dominates
    shape = dict(tokens=256, d=64, d_expert=64, experts=8, topk=2, dense_mb=0.05, iters=2, warmup=1, links=links)
    pool = ranks(4, 2)
    none = [_timeline_figures(r) for r in pool.run(run_setting, "a", **shape)]
    full = [_timeline_figures(r) for r in pool.run(run_setting, "c", degrees=(4, 4), **shape)]
    for a, c in zip(none, full):
        assert a["both_links"] == 0.0 and a["intra"] > 0 and a["inter"] > 0
        assert c["both_links"] > 0.2 * min(c["intra"], c["inter"]), c  # co-scheduled: ~0.5 measured
        assert c["hidden"] > 0.02 * c["busy"], c  # chunks transfer while others compute: ~0.06 measured


def test_overlap_beats_no_overlap_on_simulated_links(ranks):
    """The issue's ratio check, with slack: links slow enough that transfers (slept, so they cost no CPU)
    are ~10x the compute, and the two settings' iterations interleaved, so load on the machine slows
    both alike. (a) serialises intra and inter on one channel; (c) pipelines 4 chunks with both links
    busy at once: about (2 + grad) / (1.25 + grad) of (a)'s time in the model, ~1.5x; asserted 1.2x."""
    from benchmarks.overlap import run_settings

    links = {"intra": (50e-6, 0.0005e9), "inter": (50e-6, 0.0005e9)}
    shape = dict(tokens=128, d=32, d_expert=32, experts=8, topk=2, dense_mb=0.01, iters=3, warmup=1, links=links)
    res = ranks(4, 2).run(run_settings, ["a", "c"], degrees={"c": (4, 4)}, **shape)[0]
    a, c = res["a"], res["c"]
    assert sum(a["link_busy_s"].values()) > 5 * a["compute_s"], a  # communication-bound, as intended
    ratio = a["median_s"] / c["median_s"]
    print(f"overlap speed-up on simulated links: {ratio:.2f}")
    assert ratio > 1.2, (a["median_s"], c["median_s"])


def test_profile_command_writes_traces_timeline_and_summary(tmp_path):
    import json

    from tests.test_cli import ROOT, _cli

    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    out = _cli(["profile", cfg, "cluster.ranks_per_node=2", "cluster.nodes=2", "parallel.tp=1", "parallel.sp=false",
                "parallel.ep=4", "model.layers=2", "model.d_model=32", "model.d_ffn=64", "model.seq_len=32",
                "train.micro_batch_size=2", "train.global_batch_size=8", "train.warmup_steps=1",
                "moe.pipeline_degree=auto",
                "moe.bwd_pipeline_degree=auto", "moe.profile_steps=2", "network.simulate=true",
                "network.inter.bandwidth_gbps=0.0005",  # per-byte cost (~10 ms a chunk) well above timing noise
                f"logging.run_dir={tmp_path}/run", "--out", str(tmp_path / "prof"), "--steps", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    prof = tmp_path / "prof"
    summary = json.loads((prof / "summary.json").read_text())
    assert summary["measured_steps"] >= 1 and summary["comm_s_per_step"] > 0
    assert 0.0 <= summary["overlap_ratio"] <= 1.0
    assert summary["hidden_comm_s_per_step"] + summary["exposed_comm_s_per_step"] == pytest.approx(
        summary["comm_s_per_step"])
    kinds = summary["by_kind"]  # per kind of transfer: the MoE all-to-all on both link classes, the DP gradient
    assert {"intra: MoE all-to-all", "inter: MoE all-to-all"} <= set(kinds)
    for k in kinds.values():
        assert k["hidden_comm_s_per_step"] + k["exposed_comm_s_per_step"] == pytest.approx(k["comm_s_per_step"])
    assert "| inter: MoE all-to-all |" in out.stdout
    assert set(summary["degrees"]) == {"1"} and summary["modeled_step_s"] > 0
    assert summary["model"]["1"]["links"]["inter"]["beta"] > 0  # fitted from the simulated inter link
    trace = json.loads((prof / "trace_rank3.json").read_text())["traceEvents"]
    tracks = {e.get("tid") for e in trace}
    assert {"steps", "compute", "intra link", "inter link", "waiting on comm"} <= tracks
    assert (prof / "timeline.png").stat().st_size > 10_000 and list((prof / "tb").glob("events.out.tfevents.*"))
    assert "overlap" in out.stdout and "degrees" in out.stdout


def test_degree_tuner_profiles_then_keeps_the_choice_and_reprofiles_on_new_shapes():
    from moetrain.moe.tuning import DegreeTuner

    tuner = DegreeTuner("auto", 3, profile_steps=3)
    seen = []
    for _ in range(4):
        assert not tuner.ready
        seen.append(tuner.degrees((64, 32)))
        tuner.end_step()
        if tuner.step == 1:  # the warm-up step's records are not fitted
            assert 0 < tuner.fit_from <= time.perf_counter()
    assert seen == [(2, 3), (2, 3), (4, 3), (1, 3)] and tuner.profiling and tuner.ready
    tuner.chosen = (2, 3)
    assert tuner.degrees((64, 32)) == (2, 3) and not tuner.profiling
    assert tuner.degrees((128, 32)) == (2, 3) and tuner.profiling  # another token count: profile again
    fixed = DegreeTuner(2, 4)
    assert fixed.degrees((64, 32)) == (2, 4) and not fixed.profiling


def test_fit_ignores_records_from_the_warm_up_step():
    """A 1 s expert call and a 1 s transfer before ``tuner.fit_from`` (the warm-up step) leave the fit alone."""
    from types import SimpleNamespace

    from moetrain.dist.links import Span
    from moetrain.moe.overlap import SectionTimes
    from moetrain.moe.tuning import DegreeTuner, fit_and_choose

    tuner = DegreeTuner("auto", "auto", profile_steps=2)
    tuner.fit_from = 100.0
    times = SectionTimes()
    times.shape = SectionShape(steps=(("inter", 1e6),), rows=1000.0)
    spans = [Span("inter", "a2a", 4000, 10.0, 11.0)]  # warm-up: 1 s for 4 kB
    # measured: 1 ms + 1 ns/byte on the inter link; experts 2 ms per call + 10 us per row
    for t0, nb in ((200.0, 1e5), (201.0, 4e5), (202.0, 2e5)):
        spans.append(Span("inter", "a2a", int(nb), t0, t0 + 1e-3 + 1e-9 * nb))
    times.compute.append(("fwd", 500, 1.0, 10.0, 1))  # warm-up
    times.compute.append(("bwd", 500, 1.0, 10.5, 1))
    for i, rows in enumerate((250, 500, 1000)):
        times.compute.append(("fwd", rows, 2e-3 + 1e-5 * rows, 300.0 + i, 1))
        times.compute.append(("bwd", rows, 2e-3 + 2e-5 * rows, 310.0 + i, 1))
    layer = SimpleNamespace(layer=0, tuner=tuner, section_times=times, dispatch=SimpleNamespace(algo="flat"))
    engine = SimpleNamespace(spans=spans, coschedule=True)
    report = fit_and_choose([layer], engine)[0]
    assert report["links"]["inter"]["alpha"] == pytest.approx(1e-3) and report["links"]["inter"]["beta"] == \
        pytest.approx(1e-9)
    assert report["compute_fwd"]["alpha"] == pytest.approx(2e-3) and report["compute_fwd"]["beta"] == \
        pytest.approx(1e-5)
    assert report["compute_bwd"]["beta"] == pytest.approx(2e-5) and tuner.chosen is not None
    tuner.fit_from = 0.0  # with the warm-up records the same data fits far worse
    assert fit_and_choose([layer], engine)[0]["links"]["inter"]["alpha"] > 0.01
