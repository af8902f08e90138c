"""Training recipes: the LR schedules (cosine, linear, constant, wsd with min_lr) and Weights & Biases logging
in offline mode beside TensorBoard."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.config import ConfigError, load_config
from moetrain.parallel.optimizer import lr_at

ROOT = Path(__file__).resolve().parents[1]


def _train_cfg(schedule: str, **kw):
    over = ["train.steps=20", "train.warmup_steps=4", "train.lr=1.0", "train.min_lr=0.1",
            f"train.lr_schedule={schedule}"] + [f"train.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).train


def test_lr_schedules():
    cos, lin, const, wsd = (_train_cfg(s) for s in ("cosine", "linear", "constant", "wsd"))
    for t in (cos, lin, const, wsd):  # the same linear warm-up
        assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cos) == 1.0 and lr_at(12, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(12, lin) == pytest.approx(0.55) and lr_at(20, lin) == pytest.approx(0.1)
    assert {lr_at(s, const) for s in range(4, 40)} == {1.0}
    # wsd: stable for the first 80% of the post-warm-up steps, then linear to min_lr
    assert [lr_at(s, wsd) for s in range(4, 17)] == [1.0] * 13
    assert lr_at(18, wsd) == pytest.approx(1.0 - 0.9 * (14 / 16 - 0.8) / 0.2) and lr_at(20, wsd) == pytest.approx(0.1)
    assert lr_at(100, wsd) == pytest.approx(0.1)
    short = _train_cfg("wsd", lr_decay_fraction=0.5)
    assert lr_at(11, short) == 1.0 and lr_at(16, short) == pytest.approx(0.55)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=step"])
    with pytest.raises(ConfigError, match="train.lr_decay_fraction"):
        load_config(None, ["train.lr_decay_fraction=0"])


def test_wandb_offline_logs_train_and_valid(tmp_path):
    pytest.importorskip("wandb")
    (tmp_path / "job.yaml").write_text("{}\n")
    run = subprocess.run(
        [sys.executable, "-m", "moetrain", "train", str(tmp_path / "job.yaml"), "train.steps=3", "train.eval_every=2",
         f"logging.run_dir={tmp_path / 'run'}", "logging.wandb={project: moetrain-test, run_name: offline-check}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**__import__("os").environ, "WANDB_SILENT": "true"})
    assert run.returncode == 0, run.stderr
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    for key in (b"train/loss", b"train/lr", b"valid/loss", b"valid/ppl", b"offline-check", b"moetrain-test"):
        assert key in blob, key
    with pytest.raises(ConfigError, match="logging.wandb.project"):
        load_config(None, ["logging.wandb={run_name: x}"])
