"""Hugging Face models in and out, per family (llama, mixtral, qwen2_moe, qwen3_moe, olmoe), offline.

Tiny random models are built from ``transformers`` config classes (tests/helpers/hf_models.py) and
compared in float64 with transformers' own forward (its float32 down-casts removed):
- ``model.hf_config`` + ``checkpoint.init_from`` at serial, tp2 (and tp2 with SP), ep2 and pp2: logits equal;
- trained at tp2·ep2 (or tp2·dp2), saved, exported: transformers reproduces moetrain's logits;
- import-hf -> export-hf gives back every tensor byte for byte;
- each family's features (q/k/v biases, q/k norms over a head or all heads, clipping, gate normalisation,
  the gated shared expert) train identically at parallel layouts and in one process;
- mistakes: contradicting keys, unsupported HF features, missing experts, foreign tensors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers.hf_models import FAMILIES, MOE_FAMILIES, hf_logits, make_hf_model, sample_ids  # noqa: E402
from tests.test_model_parallel import POOL, _compare, _train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {f: make_hf_model(f, base / f, seed=i) for i, f in enumerate(FAMILIES)}


def _overrides(hf_dir: Path, layout: list[str], run_dir: str) -> list[str]:
    return [f"model.hf_config={hf_dir}", f"checkpoint.init_from={hf_dir}", f"model.seq_len={SEQ}",
            "train.dtype=float64", "train.micro_batch_size=2", f"logging.run_dir={run_dir}"] + layout


def _logits(overrides: list[str], ids: torch.Tensor, init: bool = True) -> torch.Tensor | None:
    """This layout's logits of ``ids`` (weights from checkpoint.init_from), on rank 0."""
    import torch.distributed as dist

    from moetrain.config import load_config
    from moetrain.launch.inference import forward_logits
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    if init:
        trainer.checkpoints.init_weights()
    out = forward_logits(trainer.chunks, trainer.groups, ids,
                         boundary_shape=trainer.spec.boundary_shape(ids.shape[0], trainer.groups.size("tp")),
                         vocab_size=cfg.model.vocab_size, dtype=torch.float64)
    return out if dist.get_rank() == 0 else None


def _layout(world: int, **parallel) -> list[str]:
    return [f"cluster.nodes={world // POOL[world][1]}", f"cluster.ranks_per_node={POOL[world][1]}"] + \
        [f"parallel.{k}={str(v).lower()}" for k, v in parallel.items()]


LAYOUTS = {"serial": (1, {}), "tp2": (2, {"tp": 2}), "tp2-sp": (2, {"tp": 2, "sp": True}), "ep2": (2, {"ep": 2}),
           "pp2": (2, {"pp": 2})}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_at_every_layout(ranks, hf_dirs, tmp_path, family):
    ids = sample_ids(2, SEQ, 96)
    ref = hf_logits(hf_dirs[family], ids)
    assert ref.abs().max() > 1.0  # not a degenerate (near-uniform) model
    for name, (world, par) in LAYOUTS.items():
        if name == "ep2" and family not in MOE_FAMILIES:
            continue
        got = ranks(*POOL[world]).run(_logits, _overrides(hf_dirs[family], _layout(world, **par),
                                                          str(tmp_path / name)), ids)[0]
        assert got.shape == ref.shape
        assert _rel(got, ref) < 1e-9, f"{family} at {name}: max relative difference {_rel(got, ref):.2e}"


def _train_export(overrides: list[str], ids: torch.Tensor) -> torch.Tensor | None:
    """Train with a checkpoint at the end; this layout's logits afterwards, on rank 0."""
    import torch.distributed as dist

    from moetrain.config import load_config
    from moetrain.launch.inference import forward_logits
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, setup_groups(cfg))
    summary = trainer.fit()
    assert summary["losses"][0] != summary["losses"][-1]
    out = forward_logits(trainer.chunks, trainer.groups, ids,
                         boundary_shape=trainer.spec.boundary_shape(ids.shape[0], trainer.groups.size("tp")),
                         vocab_size=cfg.model.vocab_size, dtype=torch.float64)
    return out if dist.get_rank() == 0 else None


@pytest.mark.parametrize("family", FAMILIES)
def test_export_after_parallel_training_loads_in_transformers(ranks, hf_dirs, tmp_path, family):
    from moetrain.launch.ckpt_tools import export_hf

    ids = sample_ids(2, SEQ, 96, seed=7)
    par = {"tp": 2, "ep": 2} if family in MOE_FAMILIES else {"tp": 2}
    ckpt = tmp_path / "ckpt"
    overrides = _overrides(hf_dirs[family], _layout(4, **par), str(tmp_path / "run")) + [
        "train.steps=2", "train.lr=0.05", "train.global_batch_size=4", f"checkpoint.dir={ckpt}", "checkpoint.every=2",
        "data.source=synthetic"]
    trained = ranks(*POOL[4]).run(_train_export, overrides, ids)[0]
    done = export_hf(str(ckpt), str(tmp_path / "exported"))
    assert done["step"] == 2
    index = json.loads((tmp_path / "exported" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    got = hf_logits(tmp_path / "exported", ids)
    assert _rel(got, trained) < 1e-9
    assert _rel(hf_logits(hf_dirs[family], ids), trained) > 1e-3  # training moved the model


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_the_same_tensors(hf_dirs, tmp_path, family):
    from safetensors import safe_open

    from moetrain.launch.ckpt_tools import export_hf, import_hf

    done = import_hf(str(hf_dirs[family]), str(tmp_path / "ckpt"))
    assert done["family"] == family
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_gb=64 / 2**30)  # several shards
    assert out["shards"] > 1

    def tensors(d: Path) -> dict[str, tuple]:
        found = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as s:
                for k in s.keys():  # noqa: SIM118 (safe_open has no __contains__ / __iter__)
                    t = s.get_tensor(k)
                    found[k] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        return found

    before, after = tensors(hf_dirs[family]), tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k] == after[k], k
    src, dst = (json.loads((d / "config.json").read_text()) for d in (hf_dirs[family], tmp_path / "back"))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "eos_token_id"):
        assert dst.get(key) == src.get(key), key


# ------------------------------------------------------------------ family features at parallel layouts (training)
FEATURES = {
    "qwen2_moe": ["model.family=qwen2_moe", "model.qkv_bias=true", "moe.shared_experts=1", "moe.d_shared=48",
                  "moe.shared_expert_gate=true", "moe.norm_topk_prob=false"],
    "qwen3_moe": ["model.family=qwen3_moe", "model.head_dim=16", "model.qk_norm=head"],
    "olmoe": ["model.family=olmoe", "model.qk_norm=full", "model.clip_qkv=1.5", "moe.norm_topk_prob=false"],
    "deepseek_v3": ["model.family=deepseek_v3", "model.kv_lora_rank=12", "model.q_lora_rank=16",
                    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=6",
                    "model.rope_interleave=true", "moe.router=sigmoid", "moe.n_groups=4", "moe.topk_groups=2",
                    "moe.routed_scaling_factor=2.5", "moe.first_k_dense=1", "moe.shared_experts=1",
                    "moe.bias_update_rate=0.01"],
}
MOE = ["moe.num_experts=8", "moe.topk=2", "moe.d_expert=32", "moe.aux_loss_coef=0.01", "model.layers=4"]
TRAIN_LAYOUTS = {"tp2-sp-ep2": ({"tp": 2, "sp": True, "ep": 2}, []),
                 "pp2-tp2": ({"pp": 2, "tp": 2}, []),
                 "pp2-vpp2-dp2-ep2-full-recompute": ({"pp": 2, "vpp": 2, "schedule": "interleaved", "ep": 2},
                                                     ["train.recompute=full"]),
                 "dp4-ep2-etp2-zero2-selective": ({"etp": 2, "ep": 2},
                                                  ["train.optimizer.zero_stage=2", "train.recompute=selective"])}


@pytest.mark.parametrize("family", list(FEATURES))
def test_family_features_train_identically_at_parallel_layouts(ranks, family):
    from moetrain.launch.local import LocalRanks

    extra = FEATURES[family] + MOE
    with LocalRanks(1, timeout=300) as pool:
        ref = pool.run(_train, _layout(1) + extra)[0]
    assert ref["losses"][0] != ref["losses"][-1]
    for name, (par, more) in TRAIN_LAYOUTS.items():
        got = ranks(*POOL[4]).run(_train, _layout(4, **par) + extra + more)[0]
        if "zero2" in name:  # ZeRO-2 keeps only reduced gradient shards: compare the steps' results, not gradients
            got, ref_here = {**got, "grads": {}}, {**ref, "grads": {}}
        _compare(got, ref_here if "zero2" in name else ref)


def test_family_features_change_the_function():
    """Each feature is live: the same seed with the feature off gives other losses (one process, no ranks)."""
    from moetrain.launch.local import LocalRanks

    with LocalRanks(1, timeout=300) as pool:
        plain = pool.run(_train, _layout(1) + MOE)[0]["losses"]
        for family, extra in FEATURES.items():
            got = pool.run(_train, _layout(1) + MOE + extra)[0]["losses"]
            assert got[0] != pytest.approx(plain[0], rel=1e-9), family


# ------------------------------------------------------------------ configs and mistakes
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrain", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_hf_config_fills_model_and_moe_and_refuses_contradictions(hf_dirs):
    from moetrain.config import ConfigError, load_config

    cfg = load_config(None, [f"model.hf_config={hf_dirs['qwen2_moe']}"])
    m, moe = cfg.model, cfg.moe
    assert (m.family, m.d_model, m.heads, m.kv_heads, m.head_dim, m.qkv_bias, m.vocab_size) == \
        ("qwen2_moe", 32, 4, 2, 8, True, 96)
    assert (moe.num_experts, moe.topk, moe.d_expert, moe.shared_experts, moe.d_shared, moe.shared_expert_gate,
            moe.norm_topk_prob) == (4, 2, 16, 1, 40, True, False)
    assert load_config(None, [f"model.hf_config={hf_dirs['qwen2_moe']}", "model.d_model=32"]).model.d_model == 32
    with pytest.raises(ConfigError, match=r"model\.d_model: 64 contradicts 32 from model\.hf_config"):
        load_config(None, [f"model.hf_config={hf_dirs['qwen2_moe']}", "model.d_model=64"])
    with pytest.raises(ConfigError, match=r"moe\.topk: 3 contradicts 2"):
        load_config(None, [f"model.hf_config={hf_dirs['mixtral']}", "moe.topk=3"])
    with pytest.raises(ConfigError, match="/nonexistent/dir: no such directory"):
        load_config(None, ["model.hf_config=/nonexistent/dir"])
    with pytest.raises(ConfigError, match="model.family.*cannot hold model.qk_norm=head"):
        load_config(None, ["model.family=mixtral", "moe.num_experts=4", "model.qk_norm=head"])


def test_unsupported_hf_features_are_named(tmp_path, hf_dirs):
    from moetrain.config import ConfigError, load_config

    for key, value, words in (("rope_scaling", {"rope_type": "dynamic", "factor": 4.0}, "rope_type 'dynamic'"),
                              ("hidden_act", "gelu", "hidden_act='gelu'"),
                              ("mlp_only_layers", [1], "mlp_only_layers=[1]")):
        d = tmp_path / key
        d.mkdir()
        cfg = json.loads((hf_dirs["qwen3_moe"] / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [f"model.hf_config={d}"])


def test_cli_import_export_and_validate(hf_dirs, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"cluster: {{ranks_per_node: 2}}\nparallel: {{tp: 2}}\nmodel: {{hf_config: {hf_dirs['olmoe']}}}\n")
    ok = _cli("validate", str(job))
    assert ok.returncode == 0, ok.stderr
    assert "olmoe" in ok.stdout
    bad = _cli("validate", str(job), "model.heads=8")
    assert bad.returncode == 2 and bad.stderr.startswith("config error: model.heads: 8 contradicts 4"), bad.stderr
    imp = _cli("checkpoint", "import-hf", str(hf_dirs["mixtral"]), "--out", str(tmp_path / "ck"))
    assert imp.returncode == 0, imp.stderr
    assert "imported mixtral" in imp.stdout and (tmp_path / "ck" / "model.yaml").is_file()
    again = _cli("checkpoint", "import-hf", str(hf_dirs["mixtral"]), "--out", str(tmp_path / "ck"))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    exp = _cli("checkpoint", "export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert exp.returncode == 0, exp.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    none = _cli("checkpoint", "import-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert none.returncode == 2 and "nothing: no such directory" in none.stderr, none.stderr
    assert not (tmp_path / "x").exists()


def test_missing_expert_and_foreign_tensors_are_refused(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from moetrain.config import load_config
    from moetrain.models.hf_weights import HFSource, HFWeightsError, to_hf

    resolved = load_config(None, [f"model.hf_config={hf_dirs['qwen3_moe']}"]).resolved()
    src = HFSource(hf_dirs["qwen3_moe"], resolved)
    keys = set(src.logical_keys())
    gone = "layers.1.ffn.experts.experts.3.w_down_EDF"
    with pytest.raises(HFWeightsError, match=f"lacks {gone}"):
        to_hf(resolved, src.tensor, keys - {gone})
    tensors = load_file(str(hf_dirs["qwen3_moe"] / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "config.json").write_text((hf_dirs["qwen3_moe"] / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFWeightsError, match="no place for: model.layers.0.self_attn.o_proj.bias"):
        HFSource(d, resolved).check_unused()
    del tensors["model.layers.0.self_attn.o_proj.bias"], tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFWeightsError, match="model.layers.1.mlp.experts.2.up_proj.weight is missing"):
        HFSource(d, resolved).tensor("layers.1.ffn.experts.experts.2.w_up_EFD")


def test_init_from_a_moetrain_checkpoint_equals_init_from_hf(ranks, hf_dirs, tmp_path):
    from moetrain.launch.ckpt_tools import import_hf

    import_hf(str(hf_dirs["qwen2_moe"]), str(tmp_path / "ck"))
    ids = sample_ids(2, SEQ, 96, seed=3)
    layout = _layout(2, tp=2)
    from_hf = ranks(*POOL[2]).run(_logits, _overrides(hf_dirs["qwen2_moe"], layout, str(tmp_path / "a")), ids)[0]
    over = _overrides(hf_dirs["qwen2_moe"], layout, str(tmp_path / "b"))
    over[1] = f"checkpoint.init_from={tmp_path / 'ck'}"
    from_ck = ranks(*POOL[2]).run(_logits, over, ids)[0]
    assert torch.equal(from_hf, from_ck)


def test_mixtral_finetune_example_validates_and_fits(tmp_path):
    """cluster_configs/mixtral_finetune_2x8_h100.yaml against Mixtral-8x7B's published config.json (no weights
    needed): the architecture is read from it, and the planner says the layout fits an H100."""
    from tests.helpers.shipped import MIXTRAL_8X7B

    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    example = str(ROOT / "cluster_configs" / "mixtral_finetune_2x8_h100.yaml")
    ok = _cli("validate", example, f"model.hf_config={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    assert "mixtral from" in ok.stdout and "params 46.7B (12.9B active)" in ok.stdout
    plan = _cli("plan", example, f"model.hf_config={tmp_path}", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["fits"] is True


ROPE_CASES = {
    "llama-llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8}),
    "qwen3_moe-yarn": ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    "deepseek_v3-yarn-mscale": ("deepseek_v3", {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                                "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                                "original_max_position_embeddings": 4}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_equals_transformers_and_survives_export(ranks, tmp_path, case):
    """Llama 3.1 frequency bands and YaRN (with DeepSeek's mscale on the softmax) as transformers computes them:
    logits at serial and tp2; import -> export keeps the scaling (transformers reads it back identically)."""
    from moetrain.launch.ckpt_tools import export_hf, import_hf

    family, rope = ROPE_CASES[case]
    d = make_hf_model(family, tmp_path / "hf", seed=4, rope=rope)
    ids = sample_ids(2, SEQ, 96, seed=9)
    ref = hf_logits(d, ids)
    plain = make_hf_model(family, tmp_path / "plain", seed=4)
    assert _rel(hf_logits(plain, ids), ref) > 1e-4  # the scaling changes the function
    for world, par in ((1, {}), (2, {"tp": 2})):
        got = ranks(*POOL[world]).run(_logits, _overrides(d, _layout(world, **par), str(tmp_path / "run")), ids)[0]
        assert _rel(got, ref) < 1e-9, f"{case} at {par}"
    import_hf(str(d), str(tmp_path / "ck"))
    export_hf(str(tmp_path / "ck"), str(tmp_path / "back"))
    assert _rel(hf_logits(tmp_path / "back", ids), ref) < 1e-12
