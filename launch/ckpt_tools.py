"""``moetrain checkpoint inspect | convert``: read a checkpoint without starting a job (one process)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from moetrain.dist.checkpoint import MANIFEST, Checkpointer, CheckpointError, CheckpointReader

__all__ = ["open_checkpoint", "inspect", "convert"]


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
