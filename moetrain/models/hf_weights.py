"""Hugging Face tensors <-> moetrain's logical tensors, for the families in :mod:`moetrain.models.hf_config`.

One table (:func:`entries`) pairs every logical tensor moetrain saves (the layout-free names of
:mod:`moetrain.parallel.logical`: ``layers.3.attn.qkv.weight``, ``layers.3.ffn.experts.experts.7.w_up_EFD``)
with the HF tensors it is made of, concatenated along dim 0 in order (q, k, v; an expert's gate and up).
Reading (:class:`HFSource`) and writing (:func:`to_hf`, :func:`write_hf_dir`) both use it, so import
followed by export gives back the same bytes.

HF directories are read from safetensors only (``model.safetensors`` or a sharded index); experts may be
stored one module per expert (the format on the Hub, which every transformers version reads) or fused
``gate_up_proj`` / ``down_proj`` tensors (transformers 5's in-memory layout). Exports write the Hub format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.errors import UserError
from moetrain.models.hf_config import HF_FAMILIES, check_family

__all__ = ["Entry", "entries", "HFSource", "to_hf", "write_hf_dir", "HFWeightsError"]


class HFWeightsError(UserError):
    """A Hugging Face directory or checkpoint whose tensors do not fit the model (named)."""


@dataclass(frozen=True)
class Entry:
    key: str
    """moetrain's logical tensor name."""
    hf: tuple[str, ...]
    """The HF tensors it is made of, concatenated along dim 0 in this order."""
    sizes: tuple[int, ...] = ()
    """Rows of each HF part (empty for a single part)."""


def entries(resolved: dict[str, Any]) -> list[Entry]:
    """Every logical tensor of a model (``JobConfig.resolved()``) with its HF names, in model order."""
    check_family(resolved)
    m, moe = resolved["model"], resolved["moe"]
    fam = HF_FAMILIES[m["family"]]
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    out = [Entry("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(m["layers"]):
        hf, mt = f"model.layers.{i}", f"layers.{i}"
        att = f"{hf}.self_attn"
        out.append(Entry(f"{mt}.attn_norm.weight", (f"{hf}.input_layernorm.weight",)))
        if fam.mla:
            for ours, theirs in ((("q_down", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("q_up", "q_b_proj"))
                                 if m["q_lora_rank"] else (("q", "q_proj"),)) + (
                    ("kv_down", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("kv_up", "kv_b_proj")):
                out.append(Entry(f"{mt}.attn.{ours}.weight", (f"{att}.{theirs}.weight",)))
        else:
            out.append(Entry(f"{mt}.attn.qkv.weight", tuple(f"{att}.{p}_proj.weight" for p in "qkv"), (q, kv, kv)))
        if m["qkv_bias"]:
            out.append(Entry(f"{mt}.attn.qkv.bias", tuple(f"{att}.{p}_proj.bias" for p in "qkv"), (q, kv, kv)))
        if m["qk_norm"] != "none":
            out.append(Entry(f"{mt}.attn.q_norm.weight", (f"{att}.q_norm.weight",)))
            out.append(Entry(f"{mt}.attn.k_norm.weight", (f"{att}.k_norm.weight",)))
        out.append(Entry(f"{mt}.attn.out.weight", (f"{att}.o_proj.weight",)))
        out.append(Entry(f"{mt}.ffn_norm.weight", (f"{hf}.post_attention_layernorm.weight",)))
        moe_layer = moe["num_experts"] > 0 and i >= moe["first_k_dense"] and (i + 1) % moe["every"] == 0
        if not moe_layer:
            f = m["d_ffn"]
            out.append(Entry(f"{mt}.ffn.up.weight", (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"), (f, f)))
            out.append(Entry(f"{mt}.ffn.down.weight", (f"{hf}.mlp.down_proj.weight",)))
            continue
        blk = f"{hf}.{fam.moe_prefix}"
        gate, up, down = fam.expert_names
        f = moe["d_expert"]
        out.append(Entry(f"{mt}.ffn.gate.router.weight", (f"{blk}.gate.weight",)))
        if moe["router"] == "sigmoid":  # the aux-loss-free correction bias (a buffer on both sides)
            out.append(Entry(f"{mt}.ffn.gate.router.expert_bias", (f"{blk}.gate.e_score_correction_bias",)))
        for e in range(moe["num_experts"]):
            ex, mx = f"{blk}.experts.{e}", f"{mt}.ffn.experts.experts.{e}"
            out.append(Entry(f"{mx}.w_up_EFD", (f"{ex}.{gate}.weight", f"{ex}.{up}.weight"), (f, f)))
            out.append(Entry(f"{mx}.w_down_EDF", (f"{ex}.{down}.weight",)))
        if moe["shared_experts"]:
            sh, fs = f"{blk}.{fam.shared_name}", moe["d_shared"]
            out.append(Entry(f"{mt}.ffn.shared.up.weight", (f"{sh}.gate_proj.weight", f"{sh}.up_proj.weight"),
                             (fs, fs)))
            out.append(Entry(f"{mt}.ffn.shared.down.weight", (f"{sh}.down_proj.weight",)))
            if moe["shared_expert_gate"]:
                out.append(Entry(f"{mt}.ffn.shared_gate.weight", (f"{blk}.shared_expert_gate.weight",)))
    out.append(Entry("norm.weight", ("model.norm.weight",)))
    if not m["tie_embeddings"]:
        out.append(Entry("head.weight", ("lm_head.weight",)))
    return out


_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")  # older exports saved RoPE's buffer
_EXPERT = re.compile(r"^(?P<blk>.+\.experts)\.(?P<e>\d+)\.(?P<part>\w+)\.weight$")


class HFSource:
    """The safetensors of an HF model directory, read lazily by HF name or by moetrain logical key."""

    def __init__(self, path: str | os.PathLike, resolved: dict[str, Any]):
        self.path = Path(path)
        self.resolved = resolved
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFWeightsError(f"{index}: not a safetensors index ({exc})") from None
        elif single.is_file():
            weight_map = None
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            extra = f" (found {', '.join(bins)}: convert them to safetensors first)" if bins else ""
            raise HFWeightsError(f"{self.path}: no model.safetensors or model.safetensors.index.json{extra}")
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        if weight_map is None:
            weight_map = dict.fromkeys(self._open("model.safetensors").keys(), "model.safetensors")
        for name, file in weight_map.items():
            self._where[name] = file
        self._entries = {e.key: e for e in entries(resolved)}

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            p = self.path / file
            if not p.is_file():
                raise HFWeightsError(f"{self.path}: the index names {file}, which is not there")
            self._files[file] = safe_open(str(p), framework="pt")
        return self._files[file]

    def names(self) -> set[str]:
        return set(self._where)

    def hf_tensor(self, name: str) -> torch.Tensor:
        if name in self._where:
            return self._open(self._where[name]).get_tensor(name)
        hit = _EXPERT.match(name)
        if hit:  # fused experts (transformers 5 in memory): one tensor per projection for all experts
            fam = HF_FAMILIES[self.resolved["model"]["family"]]
            gate, up, down = fam.expert_names
            blk, e, part = hit["blk"], int(hit["e"]), hit["part"]
            if part in (gate, up) and f"{blk}.gate_up_proj" in self._where:
                both = self.hf_tensor(f"{blk}.gate_up_proj")[e]
                return both.chunk(2, dim=0)[0 if part == gate else 1].contiguous()
            if part == down and f"{blk}.down_proj" in self._where:
                return self.hf_tensor(f"{blk}.down_proj")[e].contiguous()
        raise HFWeightsError(f"{self.path}: tensor {name} is missing (the config describes a model that has it)")

    def tensor(self, key: str) -> torch.Tensor:
        """The logical moetrain tensor ``key``."""
        e = self._entries.get(key)
        if e is None:
            raise HFWeightsError(f"{self.path}: moetrain tensor {key} has no Hugging Face counterpart")
        parts = [self.hf_tensor(n) for n in e.hf]
        for n, t, rows in zip(e.hf, parts, e.sizes or (None,) * len(parts)):
            if rows is not None and t.shape[0] != rows:
                raise HFWeightsError(f"{self.path}: {n} has shape {tuple(t.shape)}, expected {rows} rows")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def logical_keys(self) -> list[str]:
        return list(self._entries)

    def check_unused(self) -> None:
        """Refuse a directory with tensors the model has no place for (a different architecture)."""
        used = {n for e in self._entries.values() for n in e.hf}
        fused = {re.sub(r"\.\d+\.\w+\.weight$", "", n) for n in used if _EXPERT.match(n)}
        used |= {f"{b}.gate_up_proj" for b in fused} | {f"{b}.down_proj" for b in fused}
        layers = self.resolved["model"]["layers"]

        def beyond(n: str) -> bool:  # DeepSeek's multi-token-prediction layers follow the last block
            hit = re.match(r"model\.layers\.(\d+)\.", n)
            return bool(hit) and int(hit.group(1)) >= layers

        extra = sorted(n for n in self._where if n not in used and not _IGNORED.search(n) and not beyond(n))
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise HFWeightsError(f"{self.path}: tensors the configured model has no place for: "
                                 f"{', '.join(extra[:3])}{more}")


def to_hf(resolved: dict[str, Any], get: Callable[[str], torch.Tensor], have: set[str]) -> dict[str, torch.Tensor]:
    """HF tensors by name from moetrain's logical tensors (``get(key)``; ``have``: the keys present). A missing
    tensor is refused by name (an expert of some EP rank lost on save is the case this guards)."""
    missing = [e.key for e in entries(resolved) if e.key not in have]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HFWeightsError(f"the checkpoint lacks {', '.join(missing[:3])}{more}; refusing to export an "
                             "incomplete model")
    out: dict[str, torch.Tensor] = {}
    for e in entries(resolved):
        t = get(e.key)
        parts = t.split(list(e.sizes), dim=0) if e.sizes else (t,)
        if e.sizes and sum(e.sizes) != t.shape[0]:
            raise HFWeightsError(f"{e.key} has {t.shape[0]} rows, expected {sum(e.sizes)}")
        for name, part in zip(e.hf, parts):
            out[name] = part.contiguous()
    return out


def write_hf_dir(out: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                 generation: dict[str, Any], max_shard_bytes: int = 5 * 2**30,
                 extra_files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """A directory ``from_pretrained`` loads: config.json, generation_config.json, safetensors shards of at
    most ``max_shard_bytes``, model.safetensors.index.json and ``extra_files`` (name -> bytes). Written beside
    and renamed into place."""
    from safetensors.torch import save_file

    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HFWeightsError(f"{dest} exists and is not empty; choose a new directory")
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards: list[list[str]] = [[]]
        size = 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        weight_map = {}
        for k, names in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():  # e.g. the tokenizer's files
            (tmp / name).write_bytes(data)
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(dest), "tensors": len(tensors), "shards": len(shards), "bytes": total}
