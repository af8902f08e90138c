"""``moetrain generate``: greedy decoding with the KV cache equals transformers' ``generate`` token for token
(float64 tiny models of every family, tp 1 and 2, past the training sequence length); sampling is
seeded; the CLI decodes text with data.tokenizer and names its mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import FAMILIES, float64_reference, load_float64, make_hf_model, sample_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cfg(hf_dir: Path, tp: int, *extra: str):
    from moetrain.config import load_config
    from moetrain.launch.generate import generation_config

    base = [f"model.hf_config={hf_dir}", f"checkpoint.init_from={hf_dir}", "train.dtype=float64",
            "model.seq_len=8", f"parallel.tp={tp}", f"cluster.ranks_per_node={tp}", *extra]
    return load_config(None, base + generation_config(load_config(None, base)))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(tmp_path, family):
    from moetrain.launch.generate import generate

    d = make_hf_model(family, tmp_path / family, seed=11)
    prompt = sample_ids(1, 5, 96, seed=5)[0].tolist()
    model = load_float64(d)
    with torch.no_grad(), float64_reference():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0].tolist()
    assert len(set(ref[5:])) > 2  # a model that says something
    for tp in (1, 2):
        out = generate(_cfg(d, tp), prompt, max_new_tokens=14)
        assert out["ids"] == ref, f"{family} tp{tp}"  # 19 tokens > model.seq_len=8: RoPE tables grow


def test_sampling_is_seeded_and_cli_speaks_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moetrain.launch.generate import generate

    d = make_hf_model("qwen3_moe", tmp_path / "m", seed=2)
    prompt = [5, 9, 3]
    a = generate(_cfg(d, 1), prompt, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=4)["new_ids"]
    b = generate(_cfg(d, 2), prompt, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=4)["new_ids"]
    c = generate(_cfg(d, 1), prompt, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=5)["new_ids"]
    assert a == b and a != c
    # a word-level tokenizer over the 96 ids: "t0" .. "t95", </s> = t2 (the model's eos)
    vocab = {f"t{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "job.yaml").write_text("{}\n")
    base = ["generate", str(tmp_path / "job.yaml"), f"model.hf_config={d}", f"checkpoint.init_from={d}",
            "train.dtype=float64", f"data.tokenizer={tmp_path / 'tokenizer.json'}"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moetrain", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    bad = cli(*base, "--prompt", "t5 t9", "--max-new-tokens", "4", "--json", "--bogus")
    assert bad.returncode == 2
    out = cli(*base, "--prompt", "t5 t9 t3", "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    greedy = generate(_cfg(d, 1), prompt, max_new_tokens=6)["new_ids"]
    assert got["prompt_ids"] == prompt and got["new_ids"] == greedy[: len(got["new_ids"])]
    assert got["text"].split() == [f"t{i}" for i in got["new_ids"]]
    no_tok = cli("generate", str(tmp_path / "job.yaml"), f"model.hf_config={d}", f"checkpoint.init_from={d}",
                 "--prompt", "hi", "--max-new-tokens", "3")
    assert no_tok.returncode == 2 and "--prompt needs data.tokenizer" in no_tok.stderr
    outside = cli("generate", str(tmp_path / "job.yaml"), f"model.hf_config={d}", f"checkpoint.init_from={d}",
                  "--ids", "1,500", "--max-new-tokens", "3")
    assert outside.returncode == 2 and "prompt id 500 is outside the vocabulary" in outside.stderr
    no_weights = cli("generate", str(tmp_path / "job.yaml"), f"model.hf_config={d}", "--ids", "1,2",
                     "--max-new-tokens", "3")
    assert no_weights.returncode == 2 and "needs weights" in no_weights.stderr, no_weights.stderr


def test_byte_level_model_takes_a_text_prompt(tmp_path):
    """data.source=text models read bytes: --prompt works without a tokenizer (the quick start's model)."""
    (tmp_path / "job.yaml").write_text("{}\n")
    common = ["data.source=text", "model.vocab_size=256", "model.layers=1", "model.d_model=32", "model.heads=2",
              f"checkpoint.dir={tmp_path / 'ck'}", f"logging.run_dir={tmp_path / 'run'}"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moetrain", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    trained = cli("train", str(tmp_path / "job.yaml"), *common, "train.steps=1", "train.warmup_steps=0",
                  "checkpoint.every=1")
    assert trained.returncode == 0, trained.stderr
    out = cli("generate", str(tmp_path / "job.yaml"), *common, "--prompt", "def", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["prompt_ids"] == [100, 101, 102] and len(got["new_ids"]) == 4
    assert got["text"] == bytes(got["new_ids"]).decode("utf-8", errors="replace")
    assert "past model.seq_len" not in out.stderr
    long = cli("generate", str(tmp_path / "job.yaml"), *common, "--prompt", "def", "--max-new-tokens", "62",
               "--ignore-eod", "--json")  # 3 + 62 > seq_len 64: it runs, and says so
    assert long.returncode == 0 and len(json.loads(long.stdout.strip().splitlines()[-1])["new_ids"]) == 62
    assert "3 prompt + 62 new tokens run past model.seq_len=64" in long.stderr
