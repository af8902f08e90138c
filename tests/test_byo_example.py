"""The README's "Bring your own model and data" example, end to end from its script: a jsonl corpus and a
tokenizer made here -> data prepare -> a tiny Qwen3-MoE trained at tp2 x ep2 with validation -> eval ->
export-hf -> transformers loads it (model and tokenizer) and continues a prompt exactly as moetrain
generate does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bring_your_own_example_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "byo"
    default_out = ROOT / "runs" / "byo"
    existed = default_out.exists()
    env = {**os.environ, "OUT": str(out), "BIN": str(Path(sys.executable).parent)}
    run = subprocess.run(["bash", str(ROOT / "examples" / "bring_your_own.sh")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    hf = next(line for line in lines if line.startswith("transformers: "))[len("transformers: "):]
    ours = next(line for line in lines if line.startswith("moetrain:     "))[len("moetrain:     "):]
    assert hf.startswith("def ") and len(hf) > len("def ") and hf == ours
    summary = json.loads((out / "summary.json").read_text())
    assert [v["step"] for v in summary["valid"]] == [20, 40, 60]
    assert summary["valid"][-1]["loss"] < summary["valid"][0]["loss"]
    assert any(line.startswith("valid loss ") for line in lines)
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (out / "hf" / f).is_file(), f
    assert default_out.exists() == existed  # everything went under OUT
