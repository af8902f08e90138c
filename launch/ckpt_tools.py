"""``moetrain checkpoint inspect | convert | import-hf | export-hf``: checkpoints without starting a job
(one process)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from moetrain.dist.checkpoint import MANIFEST, Checkpointer, CheckpointError, CheckpointReader

__all__ = ["open_checkpoint", "inspect", "convert", "import_hf", "export_hf"]


def open_checkpoint(path: str) -> CheckpointReader:
    """A verified reader for a step directory, or for the newest usable one under a checkpoint.dir."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if (p / MANIFEST).is_file():
        ck, resume = Checkpointer(p.parent, log=lambda m: None), str(p)
    else:
        ck, resume = Checkpointer(p, log=lambda m: None), "auto"
        if not ck.candidates():
            raise CheckpointError(f"{path} holds no checkpoint (no {MANIFEST}, no step_* directories)")
    found = ck.find(resume)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (every candidate is partial or damaged)")
    reader = CheckpointReader(*found)
    if not reader.index:
        raise CheckpointError(f"{found[0]} has no tensor index (not a trainer checkpoint)")
    return reader


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def inspect(path: str) -> dict[str, Any]:
    """What a checkpoint holds and at what layout it was saved."""
    r = open_checkpoint(path)
    m = r.manifest
    model = {k[len("model/"):]: v for k, v in r.index.items() if k.startswith("model/")}
    optim = [k for k in r.index if k.startswith("optim/")]
    groups: Counter = Counter()
    experts: dict[str, set] = {}
    for name, info in model.items():
        hit = re.match(r"(layers\.\d+)\.", name)
        groups[hit.group(1) if hit else name.split(".")[0]] += _numel(info["shape"])
        e = re.match(r"(layers\.\d+)\..*\.(\d+)\.w_(up|down)_", name)
        if e:
            experts.setdefault(e.group(1), set()).add(int(e.group(2)))
    dtypes = Counter(info["dtype"] for info in model.values())
    return {
        "path": str(r.path), "step": m.get("step"), "format": m.get("format"), "world_size": m.get("world_size"),
        "layout": m.get("layout"), "shape": m.get("shape"),
        "last_loss": (m.get("losses") or [None])[-1],
        "files": len(m.get("files", {})), "bytes": sum(f["bytes"] for f in m.get("files", {}).values()),
        "model_tensors": len(model), "parameters": sum(_numel(v["shape"]) for v in model.values()),
        "dtypes": dict(dtypes), "optimizer_tensors": len(optim),
        "by_group": dict(sorted(groups.items(), key=lambda kv: _order(kv[0]))),
        "experts_per_layer": {k: len(v) for k, v in sorted(experts.items(), key=lambda kv: _order(kv[0]))},
    }


def _order(name: str) -> tuple:
    hit = re.match(r"layers\.(\d+)", name)
    return (1, int(hit.group(1)), "") if hit else ((0 if name == "embed" else 2), 0, name)


def format_inspect(info: dict[str, Any]) -> str:
    lay = info["layout"] or {}
    shape = info["shape"] or {}
    lines = [
        f"checkpoint {info['path']}",
        f"  step {info['step']}, last loss {info['last_loss']}, format {info['format']}",
        f"  saved by {info['world_size']} ranks at "
        + " ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "dp", "ep", "etp", "vpp", "zero_stage") if k in lay),
        f"  model    {info['parameters']:,} parameters in {info['model_tensors']} tensors "
        f"({', '.join(f'{k}: {v}' for k, v in info['dtypes'].items())}); "
        + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in shape.items()
                    if k in ("model.layers", "model.d_model", "model.vocab_size", "moe.num_experts")),
        f"  optimizer {info['optimizer_tensors']} tensors (AdamW moments and steps, by parameter)",
        f"  files    {info['files']} ({info['bytes'] / 2**20:.1f} MiB)",
        "  parameters by group:",
    ]
    for group, n in info["by_group"].items():
        extra = f"  ({info['experts_per_layer'][group]} experts)" if group in info["experts_per_layer"] else ""
        lines.append(f"    {group:<12} {n:>14,}{extra}")
    return "\n".join(lines)


def convert(path: str, out: str, optimizer: bool = False) -> dict[str, Any]:
    """Write the consolidated (unsharded) state dict as one safetensors file; returns what was written."""
    from safetensors.torch import save_file

    r = open_checkpoint(path)
    prefixes = ("model/", "optim/") if optimizer else ("model/",)
    tensors = {}
    for key in r.index:
        if key.startswith(prefixes):
            name = key[len("model/"):] if key.startswith("model/") else key
            tensors[name] = r.tensor(key).contiguous().clone()
    meta = {"moetrain_step": str(r.manifest.get("step")), "moetrain_layout": str(r.manifest.get("layout")),
            "moetrain_source": str(r.path)}
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(dest)
    return {"path": str(dest), "tensors": len(tensors), "bytes": dest.stat().st_size}


_HF_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range")
"""HF config keys that are not architecture but that an import keeps for the export (token ids and such)."""


def import_hf(hf_dir: str, out: str) -> dict[str, Any]:
    """A moetrain checkpoint (step 0, layout-free, no optimizer state) of an HF model directory, plus
    ``OUT/model.yaml``: the model and moe sections it implies (the resolved config is in the manifest)."""
    import torch
    import yaml

    from moetrain.config import config_from_dict
    from moetrain.models.hf_config import read_hf_config, sections_from_hf
    from moetrain.models.hf_weights import HFSource
    from moetrain.models.spec import get_model_spec

    hf = read_hf_config(hf_dir)
    sections = sections_from_hf(hf, where=f"{hf_dir}/config.json")
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest} exists and is not empty; choose a new directory")
    cfg = config_from_dict({"model": {"hf_config": str(Path(hf_dir).resolve())}})
    resolved = cfg.resolved()
    source = HFSource(hf_dir, resolved)
    source.check_unused()
    tensors = {f"model/{k}": source.tensor(k) for k in source.logical_keys()}
    meta = {"config": resolved, "shape": get_model_spec(cfg).shape_keys(),
            "layout": {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "etp": 1, "vpp": 1, "zero_stage": 0},
            "losses": [], "grad_norms": [], "lr_schedule_steps": 0, "samples_consumed": 0,
            "hf": {k: hf[k] for k in _HF_CARRIED if k in hf}, "imported_from": str(Path(hf_dir).resolve())}
    state = {"tensors": tensors, "rank": {"rng": {"cpu": torch.get_rng_state(), "cuda": None}}}
    path = Checkpointer(dest, keep=1, log=lambda m: None).save(0, state, meta)
    (dest / "model.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
    return {"path": str(path), "tensors": len(tensors), "family": resolved["model"]["family"],
            "parameters": sum(t.numel() for t in tensors.values()), "config": str(dest / "model.yaml")}


def export_hf(path: str, out: str, dtype: str | None = None, max_shard_gb: float = 5.0) -> dict[str, Any]:
    """An HF model directory (config.json, generation_config.json, sharded safetensors with an index) from a
    moetrain checkpoint; every expert of every EP / ETP rank must be there (the checkpoint saved them gathered)."""
    import torch

    from moetrain.models.hf_config import hf_from_config
    from moetrain.models.hf_weights import to_hf, write_hf_dir

    r = open_checkpoint(path)
    resolved = r.manifest.get("config")
    if not isinstance(resolved, dict):
        raise CheckpointError(f"{r.path}: the manifest has no config (not a trainer checkpoint)")
    config = hf_from_config(resolved)
    have = {k[len("model/"):] for k in r.index if k.startswith("model/")}
    tensors = to_hf(resolved, lambda k: r.tensor(f"model/{k}"), have)
    if dtype is not None:
        tensors = {k: t.to(getattr(torch, dtype)) for k, t in tensors.items()}
    carried = r.manifest.get("hf") or {}
    config.update({k: v for k, v in carried.items() if k in _HF_CARRIED})
    if config.get("max_position_embeddings", 0) < resolved["model"]["seq_len"]:
        config["max_position_embeddings"] = resolved["model"]["seq_len"]
    dtypes = {t.dtype for t in tensors.values()}
    config["torch_dtype"] = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    tok_path = (resolved.get("data") or {}).get("tokenizer")
    tok = None
    if tok_path:
        from moetrain.launch.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path, vocab_size=resolved["model"]["vocab_size"])
        if tok.eod_id is not None:
            config.setdefault("eos_token_id", tok.eod_id)
    generation = {"_from_model_config": True,
                  **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}}
    done = write_hf_dir(out, tensors, config, generation, max_shard_bytes=int(max_shard_gb * 2**30),
                        extra_files=_tokenizer_files(tok) if tok is not None else None)
    done.update(step=r.manifest.get("step"), family=resolved["model"]["family"], source=str(r.path))
    return done


def _tokenizer_files(tok) -> dict[str, bytes]:
    """The tokenizer's files for an HF export; a bare tokenizer.json gets the tokenizer_config.json that
    ``AutoTokenizer`` needs to load it (a fast tokenizer, with its end-of-document token as EOS)."""
    import json

    files = {f.name: f.read_bytes() for f in tok.files}
    if "tokenizer_config.json" not in files and "tokenizer.json" in files:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if tok.eod_id is not None:
            cfg["eos_token"] = tok.id_to_token(tok.eod_id)
        files["tokenizer_config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    return files
