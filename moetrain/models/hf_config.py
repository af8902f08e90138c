"""Hugging Face ``config.json`` <-> moetrain's ``model`` and ``moe`` sections, per model family (torch-free).

``model.hf_config: DIR`` reads ``DIR/config.json`` and fills the two sections with the architecture it
describes (:func:`sections_from_hf`); a key the job config also gives must agree, or the config is refused
naming both values (:func:`merge_hf_config`, called while loading the config, before validation).
``moetrain checkpoint export-hf`` writes the inverse (:func:`hf_from_config`).

Only architecture is mapped: training choices that HF configs also carry (``router_aux_loss_coef``,
``initializer_range``, ``max_position_embeddings``) stay the job config's. What a family's HF
implementation can express and moetrain cannot (RoPE scaling, sliding windows, dense-only layer lists,
biases on the output projection) is refused with the HF key's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrain.errors import UserError

__all__ = ["HFFamily", "HF_FAMILIES", "family_of", "read_hf_config", "sections_from_hf", "merge_hf_config",
           "hf_from_config", "check_family"]


@dataclass(frozen=True)
class HFFamily:
    """One HF architecture as moetrain builds it."""

    family: str
    """``model.family`` (also the HF ``model_type``)."""
    architecture: str
    """HF ``architectures[0]``."""
    moe: bool
    moe_prefix: str = "mlp"
    """HF name of a block's MoE module: ``block_sparse_moe`` (Mixtral) or ``mlp``."""
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """HF names of an expert's gate, up and down projections (Mixtral: w1, w3, w2)."""
    qkv_bias: bool = False
    qk_norm: str = "none"
    shared_expert_gate: bool = False
    clip_qkv: bool = False
    mla: bool = False
    shared_name: str = "shared_expert"
    """HF name of the shared-expert MLP under the MoE module."""


HF_FAMILIES: dict[str, HFFamily] = {f.family: f for f in (
    HFFamily("llama", "LlamaForCausalLM", moe=False),
    HFFamily("mixtral", "MixtralForCausalLM", moe=True, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    HFFamily("qwen2_moe", "Qwen2MoeForCausalLM", moe=True, qkv_bias=True, shared_expert_gate=True),
    HFFamily("qwen3_moe", "Qwen3MoeForCausalLM", moe=True, qk_norm="head"),
    HFFamily("olmoe", "OlmoeForCausalLM", moe=True, qk_norm="full", clip_qkv=True),
    HFFamily("deepseek_v3", "DeepseekV3ForCausalLM", moe=True, mla=True, shared_name="shared_experts"),
)}


def family_of(name: str) -> HFFamily:
    if name not in HF_FAMILIES:
        raise UserError(f"model.family {name!r} has no Hugging Face mapping (families with one: "
                        f"{', '.join(HF_FAMILIES)})")
    return HF_FAMILIES[name]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory (or the file itself)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such directory")
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{path}: no Hugging Face config.json there" if p.is_dir() else f"{path}: file not found")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{f}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{f}: not a Hugging Face model config (no model_type)")
    return data


_SCALING_KEYS = {"llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                 "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "attention_factor", "truncate")}


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    rope = hf.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict[str, Any], where: str) -> dict[str, Any] | None:
    """``model.rope_scaling`` from transformers 5's ``rope_parameters`` or 4's ``rope_scaling``."""
    rope = dict(hf.get("rope_scaling") or {})
    rope.update({k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind not in _SCALING_KEYS:
        raise UserError(f"{where}: rope_type {kind!r} is not supported (plain RoPE, llama3 or yarn)")
    out: dict[str, Any] = {"type": kind}
    for key in _SCALING_KEYS[kind]:
        if rope.get(key) is not None:
            out[key] = rope[key]
    if "original_max_position_embeddings" not in out:
        out["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    if out.get("factor") is None and kind == "yarn":  # DeepSeek's convention
        out["factor"] = hf["max_position_embeddings"] / out["original_max_position_embeddings"]
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor"):
        if key in out:
            out[key] = float(out[key])
    if out.get("original_max_position_embeddings") is not None:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def sections_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "moe": {...}}`` for an HF config (``where`` names it in errors)."""
    kind = hf["model_type"]
    if kind not in HF_FAMILIES:
        raise UserError(f"{where}: model_type {kind!r} is not supported (supported: {', '.join(HF_FAMILIES)})")
    fam = HF_FAMILIES[kind]

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise UserError(f"{where}: {kind} config without {key!r}")
        return hf[key]

    def refuse(key: str, ok: Any, what: str) -> None:
        if hf.get(key, ok) not in (ok, None):
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported ({what})")

    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise UserError(f"{where}: a quantized checkpoint ({method}); dequantize it to bf16 / fp32 first")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    refuse("mlp_bias", False, "MLPs without biases only")
    refuse("use_sliding_window", False, "full attention only")
    if kind == "mixtral":
        refuse("sliding_window", None, "full attention only")
    refuse("mlp_only_layers", [], "use decoder_sparse_step for dense layers")
    if kind != "qwen2_moe":
        refuse("attention_bias", False, "biases on q/k/v and the output projection")
    if kind == "deepseek_v3":
        return _deepseek_sections(hf, where, need)
    heads = int(need("num_attention_heads"))
    d_model = int(need("hidden_size"))
    model: dict[str, Any] = {
        "family": kind,
        "layers": int(need("num_hidden_layers")),
        "d_model": d_model,
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d_model // heads),
        "d_ffn": int(need("intermediate_size")),
        "vocab_size": int(need("vocab_size")),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(hf, where),
        "rope_scaling": _rope_scaling(hf, where),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": bool(hf.get("qkv_bias", True)) if fam.qkv_bias else False,
        "qk_norm": fam.qk_norm,
        "clip_qkv": (float(hf["clip_qkv"]) if hf.get("clip_qkv") is not None else None) if fam.clip_qkv else None,
    }
    moe: dict[str, Any] = {"num_experts": 0}
    if fam.moe:
        experts = hf.get("num_local_experts") if kind == "mixtral" else (hf.get("num_experts")
                                                                         or hf.get("num_local_experts"))
        if not experts:
            raise UserError(f"{where}: {kind} config without a number of experts")
        moe = {
            "num_experts": int(experts),
            "topk": int(need("num_experts_per_tok")),
            "router": "topk",
            "activation": "swiglu",
            "every": int(hf.get("decoder_sparse_step") or 1),
            "d_expert": int(need("intermediate_size" if kind in ("mixtral", "olmoe") else "moe_intermediate_size")),
            "norm_topk_prob": True if kind == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            "shared_experts": 0,
        }
        if fam.shared_expert_gate:
            shared = int(need("shared_expert_intermediate_size"))
            moe.update(shared_experts=1, d_shared=shared, shared_expert_gate=True)
    return {"model": model, "moe": moe}


def _deepseek_sections(hf: dict[str, Any], where: str, need) -> dict[str, dict[str, Any]]:
    """DeepSeek-V3: multi-head latent attention, the first k blocks dense, sigmoid routing limited to the best
    groups with the aux-loss-free correction bias, routed_scaling_factor, ungated shared experts."""
    heads, experts = int(need("num_attention_heads")), int(need("n_routed_experts"))
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UserError(f"{where}: scoring_func={hf.get('scoring_func')!r} / topk_method={hf.get('topk_method')!r} is "
                        "not supported (sigmoid with noaux_tc, as DeepSeek-V3)")
    model = {
        "family": "deepseek_v3", "layers": int(need("num_hidden_layers")), "d_model": int(need("hidden_size")),
        "heads": heads, "kv_heads": heads, "d_ffn": int(need("intermediate_size")),
        "vocab_size": int(need("vocab_size")),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "rope_theta": _rope_theta(hf, where),
        "rope_scaling": _rope_scaling(hf, where),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "qkv_bias": False, "qk_norm": "none",
        "clip_qkv": None, "kv_lora_rank": int(need("kv_lora_rank")),
        "q_lora_rank": int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None,
        "qk_nope_head_dim": int(need("qk_nope_head_dim")), "qk_rope_head_dim": int(need("qk_rope_head_dim")),
        "v_head_dim": int(need("v_head_dim")), "rope_interleave": bool(hf.get("rope_interleave", True)),
    }
    groups = int(hf.get("n_group") or 1)
    moe = {
        "num_experts": experts, "topk": int(need("num_experts_per_tok")), "router": "sigmoid", "activation": "swiglu",
        "every": 1, "first_k_dense": int(hf.get("first_k_dense_replace") or 0),
        "d_expert": int(need("moe_intermediate_size")),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)), "n_groups": groups,
        "topk_groups": int(hf.get("topk_group") or groups), "shared_experts": int(hf.get("n_shared_experts") or 0),
    }
    if moe["shared_experts"]:
        moe["d_shared"] = moe["shared_experts"] * moe["d_expert"]
    return {"model": model, "moe": moe}


def merge_hf_config(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a job config as plain data) with ``model.hf_config`` expanded into the model and moe sections;
    a key given in both must have the same value (:class:`UserError` naming the key and both values)."""
    from moetrain.config import ConfigError

    model = data.get("model")
    path = model.get("hf_config") if isinstance(model, dict) else None
    if path is None:
        return data
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("model.hf_config", f"expected a Hugging Face model directory, got {path!r}")
    try:
        sections = sections_from_hf(read_hf_config(path), where=f"model.hf_config {path}")
    except UserError as exc:
        raise ConfigError("model.hf_config", str(exc)) from None
    out = dict(data)
    for name, values in sections.items():
        given = out.get(name)
        if given is not None and not isinstance(given, dict):
            continue  # not a mapping: validation names the mistake
        merged = dict(given or {})
        for key, value in values.items():
            if key in merged and merged[key] != value and not _same_number(merged[key], value):
                raise ConfigError(f"{name}.{key}", f"{merged[key]!r} contradicts {value!r} from model.hf_config "
                                                   f"{path} (leave the key out to use the model's value)")
            merged.setdefault(key, value)
        out[name] = merged
    return out


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and float(a) == b


def check_family(resolved: dict[str, Any]) -> None:
    """Refuse a config that its family's HF architecture cannot express (before an export writes anything)."""
    m, moe = resolved["model"], resolved["moe"]
    fam = family_of(m["family"])
    wrong = []
    if fam.moe != (moe["num_experts"] > 0):
        wrong.append(f"moe.num_experts={moe['num_experts']} ({fam.family} is {'an MoE' if fam.moe else 'a dense'} "
                     "model)")
    if m["qkv_bias"] and not fam.qkv_bias:
        wrong.append("model.qkv_bias=true")
    if (m["kv_lora_rank"] is not None) != fam.mla:
        wrong.append("multi-head latent attention" if m["kv_lora_rank"] is not None else "grouped-query attention")
    if m["qk_norm"] != fam.qk_norm:
        wrong.append(f"model.qk_norm={m['qk_norm']} ({fam.family}: {fam.qk_norm})")
    if m["clip_qkv"] is not None and not fam.clip_qkv:
        wrong.append("model.clip_qkv")
    if fam.moe:
        router = "sigmoid" if fam.mla else "topk"
        if moe["router"] != router or moe["activation"] != "swiglu":
            wrong.append(f"moe.router={moe['router']}, moe.activation={moe['activation']} ({fam.family}: {router}, "
                         "swiglu)")
        if not fam.mla and (moe["routed_scaling_factor"] != 1.0 or moe["first_k_dense"]):
            wrong.append("moe.routed_scaling_factor / moe.first_k_dense")
        if fam.family == "mixtral" and not moe["norm_topk_prob"]:
            wrong.append("moe.norm_topk_prob=false")
        shared = moe["shared_experts"] > 0
        if fam.mla:
            if moe["shared_expert_gate"] or (shared and moe["d_shared"] != moe["shared_experts"] * moe["d_expert"]):
                wrong.append("moe.shared_expert_gate / moe.d_shared (DeepSeek's shared experts are n x d_expert, "
                             "ungated)")
        elif shared != fam.shared_expert_gate or (shared and not moe["shared_expert_gate"]):
            wrong.append(f"moe.shared_experts={moe['shared_experts']}, moe.shared_expert_gate="
                         f"{moe['shared_expert_gate']}")
        if moe["every"] != 1 and fam.family in ("mixtral", "olmoe"):
            wrong.append(f"moe.every={moe['every']}")
    if wrong:
        raise UserError(f"model.family {fam.family}: its Hugging Face architecture ({fam.architecture}) cannot hold "
                        f"{'; '.join(wrong)}")


def hf_from_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The HF ``config.json`` of a resolved job config (``JobConfig.resolved()``), for ``export-hf``."""
    check_family(resolved)
    m, moe = resolved["model"], resolved["moe"]
    fam = HF_FAMILIES[m["family"]]
    if fam.mla:
        return _deepseek_hf(m, moe)
    hf: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.family,
        "vocab_size": m["vocab_size"], "hidden_size": m["d_model"], "num_hidden_layers": m["layers"],
        "num_attention_heads": m["heads"], "num_key_value_heads": m["kv_heads"], "head_dim": m["head_dim"],
        "intermediate_size": m["d_ffn"], "hidden_act": "silu", "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_theta"], "rope_parameters": _rope_parameters(m),
        **({"rope_scaling": _rope_parameters(m)} if m.get("rope_scaling") else {}),  # transformers 4 reads this
        "tie_word_embeddings": m["tie_embeddings"], "max_position_embeddings": max(m["seq_len"], 4096),
        "attention_dropout": 0.0, "use_cache": True,
    }
    if fam.family in ("llama", "qwen3_moe", "olmoe"):
        hf["attention_bias"] = False
    if fam.family == "llama":
        hf["mlp_bias"] = False
    if fam.moe:
        hf["num_experts_per_tok"] = moe["topk"]
        if fam.family == "mixtral":
            hf.update(num_local_experts=moe["num_experts"], intermediate_size=moe["d_expert"])
        else:
            hf.update(num_experts=moe["num_experts"], norm_topk_prob=moe["norm_topk_prob"], mlp_only_layers=[],
                      decoder_sparse_step=moe["every"])
            if fam.family == "olmoe":
                hf["intermediate_size"] = moe["d_expert"]
            else:
                hf["moe_intermediate_size"] = moe["d_expert"]
        if fam.shared_expert_gate:
            hf.update(shared_expert_intermediate_size=moe["d_shared"], qkv_bias=m["qkv_bias"])
        if fam.clip_qkv:
            hf["clip_qkv"] = m["clip_qkv"]
        hf["router_aux_loss_coef"] = moe["aux_loss_coef"]
        hf["output_router_logits"] = False
    return hf


def _deepseek_hf(m: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": m["vocab_size"],
        "hidden_size": m["d_model"], "num_hidden_layers": m["layers"], "num_attention_heads": m["heads"],
        "num_key_value_heads": m["heads"], "intermediate_size": m["d_ffn"], "hidden_act": "silu",
        "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_theta"],
        "rope_parameters": _rope_parameters(m),
        **({"rope_scaling": _rope_parameters(m)} if m.get("rope_scaling") else {}),
        "tie_word_embeddings": m["tie_embeddings"], "max_position_embeddings": max(m["seq_len"], 4096),
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True, "kv_lora_rank": m["kv_lora_rank"],
        "q_lora_rank": m["q_lora_rank"], "qk_nope_head_dim": m["qk_nope_head_dim"],
        "qk_rope_head_dim": m["qk_rope_head_dim"], "v_head_dim": m["v_head_dim"],
        "rope_interleave": m["rope_interleave"],
        "n_routed_experts": moe["num_experts"], "num_experts_per_tok": moe["topk"],
        "moe_intermediate_size": moe["d_expert"], "n_shared_experts": moe["shared_experts"],
        "first_k_dense_replace": moe["first_k_dense"], "routed_scaling_factor": moe["routed_scaling_factor"],
        "n_group": moe["n_groups"], "topk_group": moe["topk_groups"] or moe["n_groups"],
        "norm_topk_prob": moe["norm_topk_prob"], "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    }


def _rope_parameters(m: dict[str, Any]) -> dict[str, Any]:
    scaling = m.get("rope_scaling")
    if not scaling:
        return {"rope_theta": m["rope_theta"], "rope_type": "default"}
    keys = {k: v for k, v in scaling.items() if k != "type" and v is not None}
    return {"rope_theta": m["rope_theta"], "rope_type": scaling["type"], **keys}
