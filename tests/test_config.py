"""Job config validation: typed fields, unknown keys, overrides, cross-field rules, fuzzing."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrain.config import ConfigError, JobConfig, config_from_dict, load_config, write_resolved

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("cluster_configs").glob("*.yaml"))


def err(data=None, overrides=None, tmp=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        if overrides is not None:
            load_config(None, overrides)
        else:
            config_from_dict(data)
    return info.value


def test_defaults_make_a_valid_small_job():
    cfg = config_from_dict({})
    assert cfg.world_size == 1 and cfg.dp == 1 and cfg.kv_heads == cfg.model.heads
    assert cfg.d_ffn == 4 * cfg.model.d_model


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, shipped_overrides):
    cfg = load_config(path, shipped_overrides.get(path.name, []))
    assert cfg.world_size == cfg.parallel.tp * cfg.parallel.pp * cfg.dp


def test_dp_is_derived_and_checked():
    cfg = load_config(None, ["cluster.nodes=2", "cluster.ranks_per_node=4", "parallel.tp=2"])
    assert cfg.dp == 4
    e = err(overrides=["cluster.ranks_per_node=4", "parallel.dp=3"])
    assert e.path == "parallel.dp" and "world size is 4" in e.reason


@pytest.mark.parametrize("overrides,path,fragment", [
    (["parallel.tpp=2"], "parallel.tpp", "did you mean 'parallel.tp'"),
    (["modle.layers=2"], "modle", "did you mean 'model'"),
    (["model.layers=abc"], "model.layers", "valid integer"),
    (["model.layers=true"], "model.layers", "valid integer"),
    (["model.layers=-2"], "model.layers", "greater than or equal to 1"),
    (["train.lr=.inf"], "train.lr", "finite"),
    (["moe.router=nope"], "moe.router", "'gshard'"),
    (["moe.pipeline_degree=fast"], "moe.pipeline_degree", "'auto'"),
    (["moe.pipeline_degree=0"], "moe.pipeline_degree", "greater than or equal to 1"),
    (["moe.overlap_wgrad=sometimes"], "moe.overlap_wgrad", "'auto'"),
    (["moe.token_once=maybe"], "moe.token_once", "'auto'"),
    (["moe=null"], "moe", "a dense model is moe.num_experts: 0"),
    (["train.optimizer=[1]"], "train.optimizer", "a section, expected a mapping of its keys (beta1,"),
    (["cluster.ranks_per_node=4", "parallel.tp=3"], "parallel.tp", "does not divide the world size 4"),
    (["cluster.ranks_per_node=2", "parallel.tp=2", "model.heads=3", "model.d_model=48"], "model.heads",
     "not divisible by parallel.tp=2"),
    (["model.kv_heads=3"], "model.kv_heads", "must divide model.heads=4"),
    (["cluster.ranks_per_node=4", "parallel.tp=4", "model.kv_heads=2"], "model.kv_heads",
     "not divisible by parallel.tp=4"),
    (["moe.num_experts=6", "cluster.ranks_per_node=4", "parallel.ep=4"], "moe.num_experts",
     "not divisible by parallel.ep=4"),
    (["parallel.ep=2"], "parallel.ep", "needs experts"),
    (["moe.num_experts=8", "cluster.ranks_per_node=2", "parallel.pp=2", "model.layers=2", "parallel.ep=2"],
     "parallel.ep", "must divide the tp*dp"),
    (["cluster.ranks_per_node=4", "parallel.pp=4", "model.layers=2"], "parallel.pp", "only model.layers=2"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "parallel.vpp=4", "model.layers=6",
      "parallel.schedule=interleaved"], "model.layers", "pp*vpp"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "parallel.vpp=2", "model.layers=6",
      "parallel.schedule=1f1b"], "parallel.schedule", "needs schedule 'interleaved'"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "parallel.schedule=interleaved"], "parallel.vpp",
     "needs parallel.vpp > 1"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "parallel.vpp=2", "model.layers=4",
      "parallel.schedule=interleaved", "train.global_batch_size=6", "train.micro_batch_size=2"],
     "train.global_batch_size", "multiple of parallel.pp=2"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "model.layers=4", "parallel.pipeline_layers=[1,2]"],
     "parallel.pipeline_layers", "sum to 3 layers"),
    (["cluster.ranks_per_node=2", "parallel.pp=2", "model.layers=4", "parallel.pipeline_layers=[4]"],
     "parallel.pipeline_layers", "1 entries for pp*vpp"),
    (["parallel.pipeline_layers=[0,2]"], "parallel.pipeline_layers[0]", "greater than or equal to 1"),
    (["train.recompute=some"], "train.recompute", "'selective'"),
    (["train.global_batch_size=5", "train.micro_batch_size=2"], "train.global_batch_size", "not divisible"),
    (["cluster.device=cuda"], "cluster.device", "no CUDA device"),
    (["checkpoint.every=5"], "checkpoint.dir", "needs a checkpoint directory"),
    (["fault.inject.rank=0"], "fault.inject", "together"),
    (["fault.inject={rank: 3, step: 1, kind: exit}"], "fault.inject.rank", "does not exist"),
    (["data.source=tokens"], "data.path", "token file"),
    (["wtacrs.keep_ratio=0"], "wtacrs.keep_ratio", "greater than 0"),
    (["wtacrs.layers=[mlp_up, embedding]"], "wtacrs.layers[1]", "'qkv'"),
    (["model.layers.x=1"], "model.layers", "valid integer"),
    (["model.layers=2", "model.layers.x=1"], "model.layers", "a value, not a section"),
    (["novalue"], "novalue", "section.key=VALUE"),
    (["model.layers=[1"], "model.layers", "not valid YAML"),
    (["cluster.ranks_per_node=4", "moe.num_experts=4", "parallel.ep=2", "parallel.etp=2", "wtacrs.enabled=true"],
     "wtacrs.layers", "parallel.etp > 1"),
    (["cluster.nodes=3", "cluster.ranks_per_node=2", "moe.num_experts=6", "parallel.ep=3", "moe.dispatch=hier2d"],
     "moe.dispatch", "same number of ranks"),
    (["moe.num_experts=4", "moe.router=switch", "moe.topk=2"], "moe.topk", "top-1"),
    (["moe.num_experts=4", "moe.router=softmoe", "moe.capacity_factor=1.0"], "moe.capacity_factor", "fixed slots"),
    (["moe.num_experts=6", "moe.router=sigmoid", "moe.n_groups=4"], "moe.n_groups", "do not split"),
    (["moe.num_experts=4", "moe.bias_update_rate=0.1"], "moe.bias_update_rate", "router 'sigmoid'"),
])
def test_bad_values_name_the_field(overrides, path, fragment):
    e = err(overrides=overrides)
    assert e.path == path, str(e)
    assert fragment in e.reason, str(e)


def test_missing_and_malformed_files(tmp_path):
    e = err_file(tmp_path / "missing.yaml")
    assert "file not found" in e.reason
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers: [1\n")
    assert "invalid YAML at line" in err_file(bad).reason
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    assert "mapping of sections" in err_file(notmap).reason
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert err_file(binary).path == str(binary)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).world_size == 1


def err_file(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_override_values_parse_as_yaml():
    cfg = load_config(None, ["moe.num_experts=4", "moe.capacity_factor=1.5", "parallel.sp=true",
                             "moe.capacity_factor=null", "wtacrs.layers=[mlp_up]"])
    assert cfg.moe.num_experts == 4 and cfg.moe.capacity_factor is None and cfg.parallel.sp is True
    assert cfg.wtacrs.layers == ["mlp_up"]


def test_resolved_config_is_written_and_reloads(tmp_path):
    cfg = load_config(CONFIGS[0])
    out = write_resolved(cfg, tmp_path)
    data = yaml.safe_load(out.read_text())
    assert data["parallel"]["dp"] == cfg.dp and data["model"]["kv_heads"] == cfg.kv_heads
    again = config_from_dict(data)
    assert again.resolved() == cfg.resolved()


# ------------------------------------------------------------------------------ fuzzing
_SECTIONS = list(JobConfig.model_fields)
_KEYS = sorted({k for s in _SECTIONS for k in JobConfig.model_fields[s].annotation.model_fields} | {"bogus"})
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                     st.text(string.ascii_letters + "0123456789._-", max_size=8),
                     st.sampled_from(["auto", "cpu", "cuda", "topk", "flat", "local", "1f1b", "text"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.sampled_from(_KEYS), inner,
                                                                          max_size=3)), max_leaves=6)
_configs = st.dictionaries(st.sampled_from(_SECTIONS + ["bogus"]),
                           st.one_of(_values, st.dictionaries(st.sampled_from(_KEYS), _values, max_size=5)),
                           max_size=6)


@given(_configs)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_configs_are_accepted_or_raise_config_error(data):
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        assert e.path and e.reason
    else:
        assert isinstance(cfg, JobConfig)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_yaml_text_is_accepted_or_raises_config_error(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else None
    if not p.exists():
        return
    try:
        load_config(p)
    except ConfigError as e:
        assert e.reason
