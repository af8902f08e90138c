"""The moetrain CLI contracts: validate, topology --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.dist.topology import Layout, build_rank_grid
from moetrain.launch.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "cluster_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validate_and_topology_on_shipped_configs(path, capsys, shipped_overrides):
    extra = shipped_overrides.get(path.name, [])
    assert main(["validate", str(path), *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {path}") and "layout" in out
    assert main(["topology", str(path), "--json", *extra]) == 0
    grid = json.loads(capsys.readouterr().out)
    assert set(grid["groups"]) >= {"tp", "pp", "dp", "ep", "edp"}
    flat = sorted(r for node in grid["nodes"] for r in node)
    assert flat == list(range(grid["world_size"]))


@pytest.mark.parametrize("overrides,text", [
    ([], "router=topk dropless"),
    (["moe.capacity_factor=1.25", "moe.drop_policy=position"], "capacity 1.25 (position)"),
    (["moe.router=expert_choice"], "router=expert_choice expert capacity 1.0"),
    (["moe.router=softmoe", "moe.slots_per_expert=2"], "router=softmoe 2 slot(s) per expert"),
])
def test_validate_summary_states_the_capacity_each_router_applies(overrides, text, capsys):
    cfg = ROOT / "cluster_configs/sim_cpu_8rank.yaml"
    assert main(["validate", str(cfg), "moe.router=topk", "moe.capacity_factor=null", *overrides]) == 0
    assert text in capsys.readouterr().out


def test_topology_json_for_sim_config_matches_grid(capsys):
    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    args = ["topology", cfg, "moe.num_experts=8", "parallel.ep=4", "--json"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    want = build_rank_grid(Layout(tp=2, dp=4, ep=4), ranks_per_node=4).to_json()
    assert got == want
    assert got["nodes"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_overrides_before_and_after_options(capsys):
    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    args = ["topology", cfg, "parallel.tp=4", "--json", "moe.num_experts=4", "parallel.ep=2", "model.kv_heads=4"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["groups"]["tp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("args,line", [
    (["validate", "missing.yaml"], "config error: missing.yaml: file not found"),
    (["validate", "{cfg}", "parallel.tpp=2"],
     "config error: parallel.tpp: unknown key (did you mean 'parallel.tp'?)"),
    (["topology", "{cfg}", "parallel.tp=3", "--json"], "config error: parallel.tp: tp*pp = 3*1 = 3 does not divide"),
    (["validate", "{cfg}", "model.seq_len=x"], "config error: model.seq_len: expected a valid integer"),
])
def test_bad_input_is_one_line_exit_2(args, line, capsys):
    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    assert main([a.replace("{cfg}", cfg) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(line), err


def test_console_script_exit_codes():
    exe = Path(sys.executable).with_name("moetrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moetrain"]
    ok = subprocess.run(cmd + ["validate", str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["validate", str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "train.steps=-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("config error: train.steps: expected greater than or equal to 1, got -1")
    usage = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "validate" in usage.stdout and "topology" in usage.stdout


TRAIN_SMALL = ["cluster.nodes=1", "cluster.ranks_per_node=2", "parallel.tp=2", "moe.num_experts=0", "parallel.ep=1",
               "model.layers=2", "model.d_model=32", "model.d_ffn=64", "model.seq_len=32", "train.steps=4",
               "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=2", "logging.every=1"]


def _cli(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("moetrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moetrain"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # the process ended
        return ""


def test_train_writes_summary_resolved_config_and_tensorboard(tmp_path):
    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    summary = tmp_path / "summary.json"
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", f"logging.tensorboard_dir={tmp_path}/tb",
                "--summary", str(summary)])
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(summary.read_text())
    assert {"steps", "losses", "final_loss", "tokens_per_s", "world_size", "layout", "restarts"} <= set(data)
    assert data["steps"] == 4 and len(data["losses"]) == 4 and data["final_loss"] == data["losses"][-1]
    assert data["world_size"] == 2 and data["layout"] == {"tp": 2, "pp": 1, "ep": 1, "dp": 1}
    assert data["tokens_per_s"] > 0 and 0 < data["mfu"] < 1
    assert "step     4/4 | loss" in out.stdout
    assert (tmp_path / "config.resolved.yaml").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_train_user_errors_are_one_line(tmp_path):
    cfg = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", "fault.max_restarts=1"])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "fault.max_restarts" in out.stderr and "checkpoint.dir" in out.stderr
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", "parallel.pp=2", "parallel.tp=1",
                "parallel.vpp=2", "parallel.schedule=interleaved", "model.layers=4", "train.global_batch_size=6"])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "train.global_batch_size" in out.stderr and "multiple of parallel.pp=2" in out.stderr
    t0 = time.monotonic()
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", "cluster.launcher=ray",
                "cluster.ray_address=127.0.0.1:9"])  # nothing listens there
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "error: cluster.ray_address=127.0.0.1:9 is unreachable (ConnectionRefusedError" in out.stderr
    assert time.monotonic() - t0 < 30
    ray_running = any(_read(p) == "gcs_server" for p in Path("/proc").glob("*/comm"))
    bootstrap = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    if not ray_running and not bootstrap.exists():
        # 'auto' with no Ray instance on this machine: Ray's ConnectionError becomes one line naming the fix
        out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", "cluster.launcher=ray",
                    "cluster.ray_address=auto"], env={**os.environ, "RAY_ADDRESS": ""})
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "cluster.ray_address=auto but no running Ray instance" in out.stderr and "ray start --head" in out.stderr
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}", f"data.path={tmp_path}/missing"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: data.path: {tmp_path}/missing does not exist"]
    out = _cli(["train", cfg, *TRAIN_SMALL, f"logging.run_dir={tmp_path}",
                "fault.inject={rank: 1, step: 1, kind: exception}"])
    assert out.returncode == 1 and "rank 1: error" in out.stderr and "injected exception" in out.stderr
