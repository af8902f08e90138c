"""Every valid layout of a model for N devices, filtered by memory and ranked by modeled tokens/s.

The candidates vary tp (inside a node), pp, vpp and the schedule, ep and etp, sequence parallelism, the
micro-batch size, recomputation, the ZeRO stage (and CPU offload when nothing fits without it) and the MoE
chunk-pipelining degrees (1 or ``auto``). Each candidate is a set of config overrides; it must pass the
config's own validation (the same one ``moetrain validate`` runs), so every printed layout is launchable as
printed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

from moetrain.config import ConfigError, JobConfig, config_from_dict, load_config
from moetrain.plan.hardware import Hardware

__all__ = ["candidates", "search"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(base: JobConfig, gpus: int, hw: Hardware) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(the overrides of a compute layout, the memory-saving variants to try in order) for ``gpus`` devices.

    The variants (recomputation none / selective / full, each with ZeRO 0 / 1 / 2, then CPU offload) go from
    fastest to leanest: the first that fits is the layout's best. ``gpipe`` is left out: it has 1F1B's
    bubble and holds every micro-batch's activations."""
    m, moe = base.model, base.moe
    per_node = min(gpus, hw.devices_per_node)
    nodes = gpus // per_node
    gbs = base.global_batch_size
    cluster = [f"cluster.nodes={nodes}", f"cluster.ranks_per_node={per_node}", "parallel.dp=null",
               "parallel.pipeline_layers=null", f"train.global_batch_size={gbs}"]
    variants = [[f"train.recompute={rec}", f"train.optimizer.zero_stage={zero}", f"train.optimizer.offload={off}"]
                for rec in ("none", "selective", "full")
                for zero, off in ((0, "none"), (1, "none"), (2, "none"))]
    variants += [["train.recompute=full", f"train.optimizer.zero_stage={z}", "train.optimizer.offload=cpu"]
                 for z in (1, 2)]
    for tp in [d for d in _divisors(per_node) if m.kv_heads % d == 0]:
        for pp in [d for d in _divisors(gpus // tp) if d <= m.layers]:
            dp = gpus // (tp * pp)
            scheds = [("1f1b", 1)] if pp == 1 else \
                [("1f1b", 1), ("zero_bubble", 1)] + [("interleaved", v) for v in (2, 4) if pp * v <= m.layers]
            eps = [e for e in _divisors(tp * dp) if moe.enabled and moe.num_experts % e == 0] or [1]
            for (sched, vpp), ep, sp, mbs in itertools.product(scheds, eps, ([False, True] if tp > 1 else [False]),
                                                               (1, 2, 4)):
                if gbs % (mbs * dp):
                    continue
                if sched == "interleaved" and (gbs // (mbs * dp)) % pp:
                    continue
                for etp in (sorted({1, tp}) if moe.enabled else [1]):
                    if (tp * dp) % (ep * etp) or (moe.enabled and moe.d_expert % etp):
                        continue
                    for deg in (["1", "auto"] if moe.enabled and ep > 1 else [None]):
                        ov = cluster + [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp}",
                                        f"parallel.schedule={sched}", f"parallel.ep={ep}", f"parallel.etp={etp}",
                                        f"parallel.sp={str(sp).lower()}", f"train.micro_batch_size={mbs}"]
                        if deg is not None:
                            ov += [f"moe.pipeline_degree={deg}", f"moe.bwd_pipeline_degree={deg}"]
                        yield ov, variants


def _with(data: dict, ov: list[str]) -> dict:
    """``data`` with the overrides set, copying only the mappings on their paths (the rest is shared)."""
    out = dict(data)
    for key, value in _parse(ov):
        *path, last = key.split(".")
        node = out
        for part in path:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = value
    return out


def _changed(data: dict, ov: list[str]) -> list[str]:
    """The overrides whose value differs from the config's own (what a user pastes after the config)."""
    out = []
    for item, (key, value) in zip(ov, _parse(ov)):
        node: object = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            out.append(item)
    return out


def _parse(ov: list[str]) -> list[tuple[str, object]]:
    """The overrides :func:`candidates` writes (ints, booleans, null, words) without a YAML parser."""
    out = []
    for item in ov:
        key, _, raw = item.partition("=")
        value: object = {"true": True, "false": False, "null": None}.get(raw, raw)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        out.append((key, value))
    return out


def _share(data: dict, gpus: int, hw: Hardware, share: int, of: int, deadline: float, top: int) -> dict[str, Any]:
    """Evaluate every ``of``-th candidate starting at ``share`` (one worker's part of the search)."""
    from moetrain.models.spec import get_model_spec
    from moetrain.plan import make_plan
    from moetrain.plan.memory import stage_memory

    base = config_from_dict(data)
    found, tried, invalid, over, complete = [], 0, 0, 0, True
    for i, (ov, variants) in enumerate(candidates(base, gpus, hw)):
        if i % of != share:
            continue
        if time.time() > deadline:
            complete = False
            break
        tried += 1
        try:
            layout = _with(data, ov)
            config_from_dict(layout)
        except ConfigError:
            invalid += 1
            continue
        for extra in variants:  # fastest first: the first that fits is this layout's best
            cfg = config_from_dict(_with(layout, extra))
            spec = get_model_spec(cfg)
            stages = []
            for s in range(cfg.parallel.pp):
                stages.append(stage_memory(cfg, spec, s))
                if stages[-1].device_total > hw.usable_bytes:
                    break
            else:
                found.append({"overrides": _changed(data, ov + extra), "plan": make_plan(cfg, hw, stages=stages)})
                break
        else:
            over += 1
    found.sort(key=_rank_key)
    return {"found": found[:top], "fitting": len(found), "tried": tried, "invalid": invalid, "over": over,
            "complete": complete}


def _rank_key(item: dict) -> tuple:
    return -round(item["plan"]["tokens_per_s"], 6), item["plan"]["memory_per_rank"]["total"], item["overrides"]


def search(config: str | None, overrides: list[str], gpus: int, hw: Hardware, *, top: int = 10,
           budget_s: float = 60.0, workers: int | None = None) -> dict[str, Any]:
    """The ``top`` fitting layouts by modeled tokens/s (each with its overrides and plan), and counts; the
    candidates are shared among ``workers`` processes (default: one per core)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    base = load_config(config, overrides)
    data = base.model_dump(mode="json")
    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {gpus}")
    per_node = min(gpus, hw.devices_per_node)
    if gpus % per_node:
        raise ConfigError("--gpus", f"{gpus} devices do not fill whole nodes of {hw.devices_per_node} ({hw.name})")
    t0 = time.perf_counter()
    deadline = time.time() + budget_s
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        parts = [_share(data, gpus, hw, 0, 1, deadline, top)]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_share, *zip(*[(data, gpus, hw, w, workers, deadline, top)
                                                 for w in range(workers)])))
    found = sorted((x for p in parts for x in p["found"]), key=_rank_key)
    return {"gpus": gpus, "hardware": hw.name, "tried": sum(p["tried"] for p in parts),
            "invalid": sum(p["invalid"] for p in parts), "out_of_memory": sum(p["over"] for p in parts),
            "fitting": sum(p["fitting"] for p in parts), "seconds": time.perf_counter() - t0,
            "complete": all(p["complete"] for p in parts), "top": found[:top]}
