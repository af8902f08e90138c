"""ZeRO sharding equals unsharded AdamW; checkpoints saved at one layout resume at any other.

float64, gloo. Layouts are (tp, pp, ep, dp); every run uses the MoE model of tests.test_moe_model.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from moetrain.launch.local import RankFailure
from tests.test_model_parallel import BASE, POOL, _train
from tests.test_moe_model import MOE


def _at(tp: int, pp: int, ep: int, dp: int, zero: int = 0) -> list[str]:
    world = tp * pp * dp
    _, rpn = POOL[world]
    return [f"cluster.nodes={world // rpn}", f"cluster.ranks_per_node={rpn}", f"parallel.tp={tp}",
            f"parallel.pp={pp}", f"parallel.ep={ep}", f"train.optimizer.zero_stage={zero}"] + MOE


def _close(a, b) -> None:
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ ZeRO
def test_zero_stages_and_offload_equal_unsharded_adamw(ranks):
    layout = _at(2, 1, 2, 2)  # TP x DP x EP on 4 ranks: dense over dp=2, experts over edp
    wd = ["train.optimizer.weight_decay=0.1"]
    ref = ranks(*POOL[4]).run(_train, layout + wd)[0]
    assert ref["losses"][0] != ref["losses"][-1]
    for extra in (["train.optimizer.zero_stage=1"], ["train.optimizer.zero_stage=2"],
                  ["train.optimizer.zero_stage=2", "train.optimizer.offload=cpu"]):
        got = ranks(*POOL[4]).run(_train, layout + wd + extra)[0]
        _close(got["losses"], ref["losses"])
        _close(got["grad_norms"], ref["grad_norms"])
        for name, p in ref["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-9, atol=1e-12, msg=f"{extra}: {name}")


@pytest.mark.parametrize("layout", [(2, 1, 2, 4), (2, 2, 2, 2)], ids=["tp2-dp4-ep2", "tp2-pp2-dp2-ep2-sp-tied"])
def test_zero2_on_eight_ranks(ranks, layout):
    """dp=4: experts sharded over edp=2, dense over dp=4, buckets reduce-scattered during backward.
    pp=2 with SP and tied embeddings: SP norms, routers and the tied embedding are summed over TP /
    the embedding group before their (late) reduce-scatter; the pipeline reduces after the schedule."""
    extra = ["parallel.sp=true", "model.tie_embeddings=true"] if layout[1] == 2 else []
    ref = ranks(*POOL[8]).run(_train, _at(*layout) + extra)[0]
    got = ranks(*POOL[8]).run(_train, _at(*layout, zero=2) + extra + ["train.bucket_mb=0.05"])[0]
    _close(got["losses"], ref["losses"])
    _close(got["grad_norms"], ref["grad_norms"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-9, atol=1e-12, msg=name)


def _memory(overrides: list[str]) -> dict | None:
    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, BASE + overrides + ["train.steps=1"])
    out = Trainer(cfg, setup_groups(cfg)).fit()["memory"]
    return out if dist.get_rank() == 0 else None


def test_memory_report_shows_what_zero_saves(ranks):
    pool = ranks(*POOL[4])
    mem = {z: pool.run(_memory, _at(1, 1, 1, 4, zero=z))[0] for z in (0, 1, 2)}  # experts replicated over dp
    for z, m in mem.items():
        assert len(m["per_rank"]) == 4 and m["zero_stage"] == z
        assert m["max"]["params"] > 0 and m["max"]["activations"] > 0
    p = mem[0]["max"]["params"]
    assert mem[0]["max"]["optimizer"] == 2 * p  # two AdamW moments
    # stage 1: a master slice and two moments of 1/dp of the parameters (each group padded to dp)
    assert 3 * p / 4 <= mem[1]["max"]["optimizer"] < 3 * p / 4 + 2 * 3 * 4 * 8
    assert mem[1]["max"]["grads"] == p and p / 4 <= mem[2]["max"]["grads"] < p / 4 + 2 * 4 * 8


# ------------------------------------------------------------------ resharding
def _run(overrides: list[str]) -> dict | None:
    out = _train(overrides)
    return None if out is None else {k: out[k] for k in ("losses", "params", "resumed_from", "steps_run")}


LAYOUTS = {"A": (2, 2, 2, 2, 1), "B": (1, 1, 4, 4, 2), "C": (4, 1, 1, 2, 0),  # tp, pp, ep, dp, zero stage
           "D": (2, 1, 2, 2, 2)}  # with parallel.etp=2: experts split over expert TP too


def test_checkpoints_reshard_across_layouts_and_zero_stages(ranks, tmp_path):
    """Save at A = (tp2, pp2, ep2, dp2, ZeRO-1), resume at B = (tp1, pp1, ep4, dp4, ZeRO-2) and at
    C = (tp4, pp1, ep1, dp2, no ZeRO), and from B and C back at A: the resumed steps equal an
    uninterrupted run at the resuming layout (parameters and AdamW moments came through); and from C
    at D = (tp2, ep2, etp2, dp2, ZeRO-2), experts sliced over expert TP."""
    steps = ["train.steps=4", "checkpoint.every=2", "train.lr=0.02"]
    whole = {}
    for name, (tp, pp, ep, dp, zero) in list(LAYOUTS.items())[:3]:
        world = tp * pp * dp
        whole[name] = ranks(*POOL[world]).run(_run, _at(tp, pp, ep, dp, zero) + steps
                                              + [f"checkpoint.dir={tmp_path / name}"])[0]
        if name != "A":
            _close(whole[name]["losses"], whole["A"]["losses"])  # the layouts train the same model
    for src, dst in (("A", "B"), ("A", "C"), ("B", "A"), ("C", "A"), ("C", "D")):
        tp, pp, ep, dp, zero = LAYOUTS[dst]
        extra = ["parallel.etp=2"] if dst == "D" else []
        resume = [f"checkpoint.dir={tmp_path / (src + dst)}", f"checkpoint.resume={tmp_path / src / 'step_00000002'}"]
        got = ranks(*POOL[tp * pp * dp]).run(_run, _at(tp, pp, ep, dp, zero) + steps + extra + resume)[0]
        if dst == "D":  # expert tensor parallelism: no uninterrupted run at D, compare with A's (same model)
            _close(got["losses"][2:], whole["A"]["losses"][2:])
            continue
        assert got["resumed_from"].endswith("step_00000002") and got["steps_run"] == 2
        assert len(got["losses"]) == 4  # two restored from the checkpoint, two trained here
        _close(got["losses"][2:], whole[dst]["losses"][2:])
        for name, p in whole[dst]["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-9, atol=1e-12, msg=f"{src}->{dst}: {name}")


def _fit(overrides: list[str]) -> dict:
    from moetrain.config import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, BASE + overrides)
    return Trainer(cfg, setup_groups(cfg)).fit()


def test_partial_or_foreign_checkpoints_are_refused_by_name(ranks, tmp_path):
    pool = ranks(*POOL[4])
    ck = [f"checkpoint.dir={tmp_path / 'a'}", "train.steps=2", "checkpoint.every=2"]
    pool.run(_fit, _at(2, 1, 2, 2) + ck)
    step = tmp_path / "a" / "step_00000002"

    def error(overrides):
        with pytest.raises(RankFailure) as info:
            pool.run(_fit, overrides)
        errs = info.value.errors_of_type({"moetrain.dist.checkpoint.CheckpointError"})
        assert errs, str(info.value)
        return errs[0].message

    # another model shape
    msg = error(_at(2, 1, 2, 2) + ck + ["train.steps=3", "moe.d_expert=64"])
    assert "moe.d_expert: checkpoint 32, config 64" in msg
    # a tensor missing from the index (a save that lost part of its state)
    manifest = json.loads((step / "manifest.json").read_text())
    gone = next(k for k in manifest["tensors"] if k.startswith("optim/") and ".experts." in k)
    del manifest["tensors"][gone]
    (tmp_path / "b").mkdir()
    import shutil

    shutil.copytree(step, tmp_path / "b" / step.name)
    (tmp_path / "b" / step.name / "manifest.json").write_text(json.dumps(manifest))
    msg = error(_at(1, 1, 4, 4) + ["train.steps=3", f"checkpoint.dir={tmp_path / 'c'}",
                                   f"checkpoint.resume={tmp_path / 'b' / step.name}"])
    assert "is partial" in msg and repr(gone) in msg
    # a rank file missing
    (step / "rank00001.pt").unlink()
    msg = error(_at(1, 1, 4, 4) + ["train.steps=3", f"checkpoint.dir={tmp_path / 'c'}",
                                   f"checkpoint.resume={step}"])
    assert "unusable: rank00001.pt is missing" in msg


def test_checkpoint_inspect_and_convert_to_safetensors(ranks, tmp_path):
    from safetensors.torch import load_file

    from tests.test_cli import _cli

    run = ranks(*POOL[8]).run(_run, _at(2, 2, 2, 2, zero=2) + ["train.steps=2", "checkpoint.every=2",
                                                               f"checkpoint.dir={tmp_path / 'ck'}"])[0]
    out = _cli(["checkpoint", "inspect", str(tmp_path / "ck")])
    assert out.returncode == 0, out.stderr
    for text in ("step 2", "saved by 8 ranks at tp=2 pp=2 dp=2 ep=2", "zero_stage=2", "(8 experts)", "layers.1"):
        assert text in out.stdout, out.stdout
    out = _cli(["checkpoint", "convert", str(tmp_path / "ck" / "step_00000002"), "--out", str(tmp_path / "m.st")])
    assert out.returncode == 0, out.stderr
    flat = load_file(str(tmp_path / "m.st"))
    assert not any(k.startswith("optim/") for k in flat)
    for name, p in run["params"].items():  # the consolidated tensors are the model at step 2
        if ".experts." in name:
            prefix, pname = name.rsplit(".", 1)
            got = torch.stack([flat[f"{prefix}.{e}.{pname}"] for e in range(8)])
        else:
            got = flat[name]
        torch.testing.assert_close(got, p, rtol=0, atol=0, msg=name)
    bad = _cli(["checkpoint", "inspect", str(tmp_path / "nothing")])
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr
