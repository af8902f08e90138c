"""``moetrain plan``: the memory model equals what runs allocate, the search prints launchable layouts, the CLI.

The exact part: for eight layouts (tp + sp, every pipeline schedule, ep, etp, ZeRO 1/2 with offload, both
recomputation modes, tied embeddings) the predicted parameter, gradient and optimizer bytes of every rank equal
the trainer's ``memory.per_rank`` byte for byte; the predicted saved activations of a micro-batch are within 10%
of the measured ones.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from moetrain import build_model, load_config
from moetrain.launch.cli import main
from moetrain.launch.metrics import SavedBytes
from moetrain.models.spec import get_model_spec
from moetrain.plan import load_hardware, make_plan
from moetrain.plan.memory import rank_shape, stage_memory
from tests.test_model_parallel import POOL

SMALL = ["model.layers=4", "model.d_model=64", "model.heads=4", "model.kv_heads=2", "model.vocab_size=200",
         "model.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=8", "train.steps=1",
         "data.source=synthetic", "logging.every=1000", "train.bucket_mb=0.02", "moe.num_experts=4", "moe.topk=2",
         "moe.d_expert=48", "moe.every=2"]


def _on(world: int) -> list[str]:
    _, rpn = POOL[world]
    return [f"cluster.nodes={world // rpn}", f"cluster.ranks_per_node={rpn}"]


LAYOUTS = {
    "tp2-sp-ep2": ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"],
    "pp2-1f1b-tied-zero2": ["parallel.pp=2", "model.tie_embeddings=true", "train.optimizer.zero_stage=2"],
    "pp2-vpp2-interleaved": ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved"],
    "pp2-zero-bubble-zero1": ["parallel.pp=2", "parallel.schedule=zero_bubble", "train.optimizer.zero_stage=1"],
    "pp2-gpipe-full-recompute": ["parallel.pp=2", "parallel.schedule=gpipe", "train.recompute=full"],
    "tp2-ep2-etp2-zero1": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2", "train.optimizer.zero_stage=1"],
    "tp2-sp-zero2-offload": ["parallel.tp=2", "parallel.sp=true", "parallel.ep=4", "train.optimizer.zero_stage=2",
                             "train.optimizer.offload=cpu"],
    "selective-zero1-offload-xmoe": ["train.recompute=selective", "parallel.ep=4", "moe.router=xmoe",
                                     "moe.shared_experts=1", "train.optimizer.zero_stage=1",
                                     "train.optimizer.offload=cpu"],
}


def _memory(overrides: list[str]) -> dict | None:
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, overrides)
    out = Trainer(cfg, setup_groups(cfg)).fit()["memory"]
    return out if dist.get_rank() == 0 else None


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_memory_equals_the_run(ranks, name):
    overrides = SMALL + _on(8) + LAYOUTS[name]
    cfg = load_config(None, overrides)
    measured = ranks(*POOL[8]).run(_memory, overrides)[0]["per_rank"]
    spec = get_model_spec(cfg)
    stages = [stage_memory(cfg, spec, s, imbalance=1.0) for s in range(cfg.parallel.pp)]
    per_stage = cfg.parallel.tp * cfg.dp
    for rank, got in enumerate(measured):
        want = stages[rank // per_stage]
        assert (got["params"], got["grads"], got["optimizer"]) == (want.params, want.grads, want.optimizer), \
            f"rank {rank}: measured {got}, predicted {want}"
    for s, want in enumerate(stages):  # activations of one micro-batch (routing varies by rank: the stage's mean)
        got = [r["activations"] for i, r in enumerate(measured) if i // per_stage == s]
        mean = sum(got) / len(got)
        assert abs(want.activation_per_micro_batch / mean - 1) < 0.10, (s, want.activation_per_micro_batch, got)


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true", "moe.router=softmoe"], ["model.kv_heads=4"],
                                   ["train.recompute=full"], ["train.recompute=selective"],
                                   ["moe.router=xmoe", "moe.shared_experts=1"]])
def test_rank_params_and_activations_follow_the_built_model(extra):
    """One process: the parameter list in ``model.parameters()`` order, and the saved bytes within 10%."""
    cfg = load_config(None, SMALL + extra)
    model = build_model(cfg)
    spec = get_model_spec(cfg)
    shape = rank_shape(cfg, 0)
    assert [q.numel for q in spec.rank_params(shape)] == [p.numel() for p in model.parameters()]
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len))
    with SavedBytes(list(model.parameters())) as saved:
        model(tokens, tokens)
    predicted = spec.saved_activation_bytes(range(cfg.model.layers), pre=True, post=True, rank=shape)
    assert abs(predicted / saved.nbytes - 1) < 0.10, (predicted, saved.nbytes)


def test_search_prints_layouts_that_validate(capsys):
    """Every layout ``--search`` prints is launchable as printed: ``moetrain validate`` accepts it."""
    code = main(["plan", "cluster_configs/h100_1node.yaml", "model.layers=4", "--search", "--gpus", "16",
                 "--top", "5", "--json"])
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert found["complete"] and found["fitting"] >= 5 and len(found["top"]) == 5
    speeds = [x["plan"]["tokens_per_s"] for x in found["top"]]
    assert speeds == sorted(speeds, reverse=True)
    for item in found["top"]:
        assert item["plan"]["fits"]
        assert main(["validate", "cluster_configs/h100_1node.yaml", "model.layers=4"] + item["overrides"]) == 0
        cfg = load_config("cluster_configs/h100_1node.yaml", ["model.layers=4"] + item["overrides"])
        assert cfg.world_size == 16
    capsys.readouterr()


def test_plan_json_contract_and_errors(capsys, tmp_path):
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    mem = plan["memory_per_rank"]
    assert set(mem) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert mem["total"] == sum(mem[k] for k in ("params", "grads", "optimizer", "activations", "buffers"))
    for key in ("device_memory", "fits", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "breakdown"):
        assert key in plan
    assert plan["tokens_per_s"] == pytest.approx(256 * 4096 / plan["step_time_s"])
    assert 0 < plan["mfu"] < 1
    # bad input: one line naming the problem, exit 2
    assert main(["plan", "cluster_configs/sim_cpu_8rank.yaml"]) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--hardware", "nope"]) == 2
    assert "h100_sxm" in capsys.readouterr().err
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--gpus", "0"]) == 2  # a plan has no --gpus
    assert "--gpus sets the device count of --search" in capsys.readouterr().err
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--search", "--gpus", "0"]) == 2
    assert "--gpus: must be >= 1" in capsys.readouterr().err
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--search", "--top", "0"]) == 2  # not "no layout fits"
    assert capsys.readouterr().err.strip() == "error: --top must be at least 1, got 0"
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--search", "--budget", "0"]) == 2
    assert "--budget must be a positive number" in capsys.readouterr().err
    # a device count no layout can use says which rules it breaks, not "does not fit"
    assert main(["plan", "cluster_configs/sim_cpu_8rank.yaml", "--hardware", "h100_sxm", "--search",
                 "--gpus", "7"]) == 1
    out = capsys.readouterr().out
    assert "no layout of 7 devices suits this model" in out and "kv_heads" in out
    # --out that cannot be written fails before a minute of measuring, and leaves nothing behind
    (tmp_path / "a_dir.yaml").mkdir()
    assert main(["plan", "--calibrate", "--out", str(tmp_path / "a_dir.yaml")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["plan", "--calibrate", "--out", str(blocked / "hw.yaml")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: x\ndevice_memory_gib: 80\n")
    assert main(["plan", "cluster_configs/h100_1node.yaml", "--hardware", str(bad)]) == 2
    assert "missing" in capsys.readouterr().err


def test_sharding_and_recomputation_shrink_memory():
    """ZeRO 1 and 2 shrink the optimizer state and gradients; recomputation shrinks activations."""
    hw = load_hardware("h100_sxm")
    base = ["model.layers=8", "parallel.ep=2"]  # experts over edp=4 (at ep=8, edp=1: ZeRO's master copy adds)
    plans = {z: make_plan(load_config("cluster_configs/h100_1node.yaml", base + [f"train.optimizer.zero_stage={z}"]),
                          hw)["memory_per_rank"] for z in (0, 1, 2)}
    assert plans[0]["optimizer"] > plans[1]["optimizer"] and plans[1]["grads"] > plans[2]["grads"]
    acts = [make_plan(load_config("cluster_configs/h100_1node.yaml", base + [f"train.recompute={r}"]),
                      hw)["memory_per_rank"]["activations"] for r in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]


def test_calibrate_then_plan_a_cpu_job(tmp_path, capsys):
    """``--calibrate`` writes a hardware file that ``moetrain plan`` and a run's prediction accept (one round of
    the single-rank measurements: the flow and the file, not the figures, are under test)."""
    hw = tmp_path / "hw.yaml"
    assert main(["plan", "--calibrate", "--out", str(tmp_path / "x.yaml"), "--rounds", "0"]) == 2
    assert "--rounds: must be >= 1" in capsys.readouterr().err
    assert main(["plan", "--calibrate", "--out", str(hw), "--rounds", "1"]) == 0
    capsys.readouterr()
    measured = load_hardware(str(hw))
    assert measured.peak_flops("float32") > 0 and measured.gemm_bytes_gbps > 0
    assert measured.elementwise_factor >= 1.0 and measured.shared_node_memory_slowdown >= 1.0
    assert main(["plan", "cluster_configs/sim_cpu_8rank.yaml", "--hardware", str(hw), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["step_time_s"] > 0 and plan["fits"] and plan["breakdown"]["host_overhead"] > 0


def test_run_prediction_warns_of_a_gpu_oom_and_survives_bad_hardware():
    from moetrain.plan.runtime import compare_run, predict_run

    big = load_config("cluster_configs/h100_1node.yaml", ["model.layers=96", "model.d_model=8192", "model.heads=64",
                                                          "model.kv_heads=8"])
    p = predict_run(big, "NVIDIA H100 80GB HBM3")
    assert p["hardware"] == "H100 SXM 80GB" and p["fits"] is False and p["step_time_s"] > 0
    bad = load_config("cluster_configs/h100_1node.yaml", ["logging.plan_hardware=/nonexistent.yaml"])
    p = predict_run(bad, None)
    assert p["error"] and "nonexistent" in p["error"] and p["step_time_s"] is None
    cmp = compare_run(predict_run(load_config(None, SMALL), None), None, [0.5, 0.2, 0.3, 0.4], per_stage=1)
    assert cmp["measured"]["step_time_s"] == 0.3 and "step_time" not in cmp["error"]


def test_dispatch_algorithms_and_chunking_change_the_predicted_moe_time():
    """Across nodes hier1d funnels a node's rows through its leader (slowest at large messages), and FSMoE's
    chunk pipelining (``auto`` degrees) hides part of the all-to-all behind the experts."""
    from moetrain.plan.timing import moe_layer_time

    hw = load_hardware("h100_sxm")
    times = {}
    for algo in ("flat", "hier2d", "hier1d"):
        for deg in ("1", "auto"):
            cfg = load_config(None, ["cluster.launcher=env", "cluster.device=cuda", "train.dtype=bfloat16",
                                     "model.d_model=4096", "model.heads=32", "moe.num_experts=64", "moe.topk=8",
                                     "moe.d_expert=1408", "parallel.ep=32", "cluster.nodes=4",
                                     "cluster.ranks_per_node=8",
                                     f"moe.dispatch={algo}", f"moe.pipeline_degree={deg}",
                                     f"moe.bwd_pipeline_degree={deg}"])
            r = moe_layer_time(cfg, hw, 8192, "bfloat16")
            times[algo, deg] = r["fwd"] + r["bwd"]
    assert times["hier1d", "1"] > times["hier2d", "1"] > times["flat", "1"]
    for algo in ("flat", "hier2d", "hier1d"):
        assert times[algo, "auto"] < times[algo, "1"]


def test_expert_tensor_parallelism_keeps_the_expert_work():
    """With expert TP a rank runs the rows of all its etp peers on 1/etp of the hidden width: the same GEMM work
    as etp=1 plus the exchange with the peers (an earlier model divided the work by etp, predicting 91% MFU)."""
    from moetrain.plan.timing import moe_layer_time

    hw = load_hardware("h100_sxm")
    work = {}
    for etp in (1, 2, 4):
        cfg = load_config(None, ["cluster.launcher=env", "cluster.device=cuda", "train.dtype=bfloat16",
                                 "model.d_model=4096", "model.heads=32", "moe.num_experts=8", "moe.topk=2",
                                 "moe.d_expert=14336", "parallel.ep=2", f"parallel.etp={etp}", "cluster.nodes=1",
                                 "cluster.ranks_per_node=8"])
        work[etp] = moe_layer_time(cfg, hw, 4096, "bfloat16")["experts_fwd"]
    assert work[2] >= 0.95 * work[1] and work[4] >= 0.95 * work[1]
    assert work[4] > work[2]  # more peers to exchange rows with


def test_token_once_dispatch_shrinks_the_predicted_all_to_all():
    """With token-once dispatch a rank sends one row per (token, rank it visits): top-8 of 128 experts on 2 ranks
    is 2 x (1 - C(64, 8) / C(128, 8)) ~ 1.99 rows per token, not 8; off, chunk-pipelined or at EP 1 the rows are
    the assignments; the predicted all-to-all time shrinks with them."""
    import math

    from moetrain.plan.timing import _sent_rows, moe_layer_time

    def cfg(*extra):
        return load_config(None, ["cluster.launcher=env", "cluster.device=cuda", "train.dtype=bfloat16",
                                  "model.d_model=2048", "model.heads=16", "moe.num_experts=128", "moe.topk=8",
                                  "moe.d_expert=768", "parallel.ep=2", "cluster.nodes=1", "cluster.ranks_per_node=2",
                                  *extra])

    visits = 2 * (1 - math.comb(64, 8) / math.comb(128, 8))
    assert _sent_rows(cfg(), 1000, 8, 8000) == pytest.approx(1000 * visits)
    # auto leaves top-2 of 8 on 2 ranks (0.79 of the rows) alone; true forces it
    top2 = ["moe.num_experts=8", "moe.topk=2"]
    assert _sent_rows(cfg(*top2), 1000, 2, 2000) == 2000
    assert _sent_rows(cfg(*top2, "moe.token_once=true"), 1000, 2, 2000) == pytest.approx(1000 * 2 * (1 - 6 / 28))
    for extra in (["moe.token_once=false"], ["moe.pipeline_degree=2"], ["parallel.ep=1"]):
        assert _sent_rows(cfg(*extra), 1000, 8, 8000) == 8000, extra
    hw = load_hardware("h100_sxm")
    on, off = (moe_layer_time(c, hw, 8192, "bfloat16")["a2a_fwd"] for c in (cfg(), cfg("moe.token_once=false")))
    assert on < 0.5 * off


def test_moe_layer_time_counts_the_small_collectives():
    """A dispatch pays the all-gather of per-expert counts (token-once: also the row indices and gates, and the
    gates' gradient) beside the two row all-to-alls each way."""
    import dataclasses

    from moetrain.plan.timing import _a2a, moe_layer_time

    hw = dataclasses.replace(load_hardware("h100_sxm"), name="test: slow links")
    hw = dataclasses.replace(hw, intra=dataclasses.replace(hw.intra, latency_us=1000.0))
    for E, k, token_once in ((8, 2, False), (128, 8, True)):
        cfg = load_config(None, [f"moe.num_experts={E}", f"moe.topk={k}", "moe.d_expert=64", "model.d_model=64",
                                 "parallel.ep=2", "cluster.ranks_per_node=2",
                                 f"moe.token_once={str(token_once).lower()}"])
        t = moe_layer_time(cfg, hw, 4096, "float32")
        latency = _a2a(hw, cfg, 1.0)[0]  # one latency-bound exchange over the EP group
        counts = hw.intra.time(8 * E * 2)
        # forward: counts (+ indices and gates); backward: (+ the gates' gradient); the row all-to-alls cancel
        expected = counts + (latency if token_once else 0.0)
        assert t["a2a_fwd"] - t["a2a_bwd"] == pytest.approx(expected, rel=0.05)
        assert t["a2a_fwd"] - t["a2a_bwd"] > 0.9e-3  # the latency dominates: these links are slow


def test_memory_bound_work_takes_the_memory_slowdown():
    """With several ranks per node the optimizer and gradient-norm terms scale by the memory slowdown, GEMMs by
    the compute one."""
    import dataclasses

    base = dataclasses.replace(load_hardware("h100_sxm"), optimizer_ns_per_param=2.0, grad_norm_ns_per_param=1.0)
    cfg = load_config(None, ["cluster.ranks_per_node=2", "parallel.tp=2", "model.layers=2"])
    plain = make_plan(cfg, base)
    slowed = make_plan(cfg, dataclasses.replace(base, shared_node_memory_slowdown=1.5))
    for part in ("optimizer", "grad_norm"):
        assert slowed["breakdown"][part] == pytest.approx(1.5 * plain["breakdown"][part])
    assert slowed["breakdown"]["gemm"] == pytest.approx(plain["breakdown"]["gemm"])


def test_elementwise_factor_scales_the_blocks_elementwise_traffic():
    """``elementwise_factor`` (fitted by --calibrate) multiplies the per-block elementwise passes and nothing
    else in a chunk; the calibration's fit recovers a factor from a measured time."""
    import dataclasses

    from moetrain.models.spec import get_model_spec
    from moetrain.plan import calibrate
    from moetrain.plan.timing import chunk_cost

    cfg = load_config(None, calibrate._BLOCKS)
    spec = get_model_spec(cfg)
    hw = dataclasses.replace(load_hardware("h100_sxm"), name="test: factor 1")
    c1 = chunk_cost(cfg, spec, hw, range(cfg.model.layers), pre=False, post=False, stage=0)
    c3 = chunk_cost(cfg, spec, dataclasses.replace(hw, name="test: factor 3", elementwise_factor=3.0),
                    range(cfg.model.layers), pre=False, post=False, stage=0)
    assert c3.by_part["elementwise"] == pytest.approx(tuple(3 * v for v in c1.by_part["elementwise"]))
    assert c3.by_part["gemm"] == pytest.approx(c1.by_part["gemm"])
    # the fit: a measured time that needs 2.5x the modeled elementwise traffic gives 2.5
    from moetrain.plan.hardware import HARDWARE_DIRS

    text = next(d / "h100_sxm.yaml" for d in HARDWARE_DIRS if (d / "h100_sxm.yaml").is_file()).read_text()
    hw_t = calibrate._hardware_from(text)
    full = chunk_cost(cfg, spec, hw_t, range(cfg.model.layers), pre=True, post=True, stage=0)
    modeled = sum(full.by_part["elementwise"])
    measured = full.forward + full.backward + 1.5 * modeled
    assert calibrate._elementwise_factor(text, measured) == pytest.approx(2.5)
    assert calibrate._elementwise_factor(text, 0.5 * (full.forward + full.backward)) == 1.0
