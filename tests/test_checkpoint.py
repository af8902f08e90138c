"""Checkpoints: resume equals uninterrupted, corruption falls back, mismatched models are refused."""

from __future__ import annotations

import json

import pytest
import torch

from moetrain.config import load_config
from moetrain.dist.checkpoint import Checkpointer, CheckpointError
from moetrain.launch.job import setup_groups
from moetrain.launch.local import RankFailure
from moetrain.launch.trainer import Trainer

BASE = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.d_ffn=64", "model.seq_len=16",
        "train.steps=6", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=0.01",
        "train.dtype=float64", "data.source=synthetic", "checkpoint.every=2", "logging.every=1000",
        "cluster.nodes=2", "cluster.ranks_per_node=2", "parallel.tp=2"]


def _fit(overrides: list[str]) -> dict:
    cfg = load_config(None, BASE + overrides)
    return Trainer(cfg, setup_groups(cfg)).fit()


def test_interrupted_and_resumed_equals_uninterrupted(ranks, tmp_path):
    pool = ranks(4, 2)
    whole = pool.run(_fit, [f"checkpoint.dir={tmp_path / 'a'}"])[0]
    assert len(whole["losses"]) == 6 and whole["resumed_from"] is None

    run_b = [f"checkpoint.dir={tmp_path / 'b'}"]
    with pytest.raises(RankFailure) as info:
        pool.run(_fit, run_b + ["fault.inject={rank: 1, step: 5, kind: exception}"])
    assert info.value.failed_ranks == [1] and "injected exception on rank 1 at step 5" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step_00000002", "step_00000004"]

    resumed = pool.run(_fit, run_b)[0]
    assert resumed["resumed_from"].endswith("step_00000004") and resumed["steps_run"] == 2
    assert resumed["losses"] == whole["losses"]  # bit for bit

    # corrupt the newest checkpoint (same size, flipped bytes): resume falls back to the previous one
    newest = tmp_path / "b" / "step_00000006" / "rank00003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = pool.run(_fit, run_b + ["train.steps=8"])[0]
    assert again["resumed_from"].endswith("step_00000004")


def test_resume_refuses_another_model_but_not_another_layout(ranks, tmp_path):
    pool = ranks(4, 2)
    ck = [f"checkpoint.dir={tmp_path}"]
    pool.run(_fit, ck + ["train.steps=2"])
    with pytest.raises(RankFailure) as info:
        pool.run(_fit, ck + ["model.d_ffn=128"])
    errs = info.value.errors_of_type({"moetrain.dist.checkpoint.CheckpointError"})
    assert errs and "model.d_ffn: checkpoint 64, config 128" in errs[0].message
    with pytest.raises(RankFailure) as info:
        pool.run(_fit, ck + ["moe.num_experts=4", "parallel.ep=2", "model.kv_heads=4"])
    errs = info.value.errors_of_type({"moetrain.dist.checkpoint.CheckpointError"})
    assert errs and "moe.num_experts: checkpoint 0, config 4" in errs[0].message
    # another layout of the same model loads (resharding: tests/test_resharding.py)
    assert pool.run(_fit, ck + ["parallel.tp=1", "train.steps=3"])[0]["resumed_from"].endswith("step_00000002")


def test_checkpointer_single_process_detects_damage(tmp_path):
    logs: list[str] = []
    ck = Checkpointer(tmp_path, keep=5, log=logs.append)
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((4,), float(step))}, {"note": step})
    assert ck.load("auto").state["w"][0] == 3.0
    (tmp_path / "step_00000003" / "manifest.json").unlink()  # partial save
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    manifest["files"]["rank00000.pt"]["sha256"] = "0" * 64  # checksum mismatch
    (tmp_path / "step_00000002" / "manifest.json").write_text(json.dumps(manifest))
    loaded = ck.load("auto")
    assert loaded.path.name == "step_00000001" and loaded.manifest["note"] == 1
    assert any("no manifest" in m for m in logs) and any("fails its checksum" in m for m in logs)
    (tmp_path / "step_00000004.tmp").mkdir()  # an unfinished save is never a candidate
    assert all(not p.name.endswith(".tmp") for p in ck.candidates())
    with pytest.raises(CheckpointError, match="unusable: no manifest"):
        ck.load(str(tmp_path / "step_00000003"))
    assert ck.load("never") is None


def test_keep_prunes_old_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, log=lambda m: None)
    for step in range(1, 5):
        ck.save(step, {"step": step}, {})
    assert [p.name for p in ck.candidates()] == ["step_00000004", "step_00000003"]


MOE = ["moe.num_experts=4", "parallel.ep=4", "moe.every=1", "moe.d_expert=16", "model.kv_heads=4"]


def _expert_keys(overrides: list[str]) -> list[str]:
    cfg = load_config(None, BASE + overrides + ["checkpoint.every=0"])
    trainer = Trainer(cfg, setup_groups(cfg))
    return sorted(k for k in trainer.model.state_dict() if ".experts." in k)


def test_moe_checkpoints_store_experts_by_global_id_and_resume_exactly(ranks, tmp_path):
    pool = ranks(4, 2)
    keys = pool.run(_expert_keys, MOE)
    # rank r of the EP group holds global expert r, in every MoE layer, under its global id
    for rank, k in enumerate(keys):
        assert k == sorted(f"layers.{layer}.ffn.experts.experts.{rank}.{p}" for layer in range(2)
                           for p in ("w_down_EDF", "w_up_EFD"))
    whole = pool.run(_fit, MOE + [f"checkpoint.dir={tmp_path / 'a'}"])[0]
    run_b = MOE + [f"checkpoint.dir={tmp_path / 'b'}"]
    with pytest.raises(RankFailure):
        pool.run(_fit, run_b + ["fault.inject={rank: 2, step: 3, kind: exception}"])
    resumed = pool.run(_fit, run_b)[0]
    assert resumed["resumed_from"].endswith("step_00000002")
    assert resumed["losses"] == whole["losses"]
