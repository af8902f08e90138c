"""``moetrain profile``: what communication costs and how much of it the schedule hides.

Each rank, at the end of a profiled run, writes ``trace_rank{r}.json`` (Chrome / Perfetto trace
format: one process per rank, tracks ``steps``, ``compute`` (MoE expert chunks), ``intra link``,
``inter link`` and ``waiting on comm``) and ``metrics_rank{r}.json``. The driver then writes
``summary.json`` (means over ranks), ``timeline.png`` (the last measured step of every rank) and
TensorBoard scalars under ``tb/``.

Definitions, over the measured steps (after the degree-profiling steps; the first step is warm-up):
- communication time: the time at least one link of the rank is busy (union of transfer spans);
- exposed: the part of it during which the training thread waits for a transfer;
- hidden = communication - exposed; overlap ratio = hidden / communication;
- the same per kind of transfer (link class and what it carries: MoE all-to-all, DP gradient all-reduce),
  in ``by_kind``; a wait while two kinds are in flight counts as exposed for both;
- modeled step time: measured step time with each MoE section's measured time replaced by the α-β
  model's time at the chosen degrees.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["write_rank_records", "write_report"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(xs, ys) -> float:
    total = 0.0
    for a, b in xs:
        for c, d in ys:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                total += hi - lo
    return total


def _comm_and_exposed(spans, waits, measured) -> tuple[float, float]:
    """Communication time (union of ``spans``) and the part of it spent waiting, summed over ``measured``."""
    comm = exposed = 0.0
    for _, a, b, _ in measured:
        busy = _union([(sp.start, sp.end) for sp in spans if a <= sp.start < b])
        comm += _length(busy)
        exposed += _intersect(busy, _union([(x, y) for x, y in waits if a <= x < b]))
    return comm, exposed


def _kind(sp) -> str:
    """A transfer's kind for the per-kind table: its link and what it carries."""
    what = "DP gradient all-reduce" if sp.tag == "grad" else \
        ("MoE all-to-all" if sp.op == "a2a" else f"{sp.op} {sp.tag}".strip())
    return f"{sp.link}: {what}"


def write_rank_records(trainer, out_dir: str) -> dict[str, Any]:
    """Trace and metrics of this rank (called by the trainer at the end of a profiled run)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eng = trainer.engine
    steps = trainer.step_spans  # (step, start, end, profiling)
    measured = [s for s in steps if not s[3]][1:] or [s for s in steps if not s[3]] or steps
    t_base = steps[0][1] if steps else 0.0
    events = []

    def span(name, track, a, b, **args):
        events.append({"name": name, "ph": "X", "pid": rank, "tid": track, "ts": (a - t_base) * 1e6,
                       "dur": max(b - a, 0.0) * 1e6, "args": args})

    for step, a, b, prof in steps:
        span(f"step {step}" + (" (profiling)" if prof else ""), "steps", a, b)
    for layer in trainer.moe_layers:
        for phase, rows, secs, start, _ in layer.section_times.compute:
            span(f"moe{layer.layer} experts {phase}", "compute", start, start + secs, rows=rows)
    spans = eng.spans if eng is not None else []
    for sp in spans:
        span(f"{sp.op} {sp.tag}", f"{sp.link} link", sp.start, sp.end, bytes=sp.nbytes)
    waits = eng.waits if eng is not None else []
    for a, b in waits:
        span("wait", "waiting on comm", a, b)
    meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
    (out / f"trace_rank{rank}.json").write_text(json.dumps({"traceEvents": meta + events}))

    comm_s, exposed_s = _comm_and_exposed(spans, waits, measured)
    step_times, modeled = [], []
    for _, a, b, _ in measured:
        step_times.append(b - a)
        sec = sum(e - s for layer in trainer.moe_layers for _, s, e, *_ in layer.section_times.sections if a <= s < b)
        model = 0.0
        for layer in trainer.moe_layers:
            rep = getattr(layer, "overlap_report", None)
            calls = [p for p, s, *_ in layer.section_times.sections if a <= s < b]
            if rep:
                model += sum(rep["modeled_fwd_s"] if p == "fwd" else rep["modeled_bwd_s"] for p in calls)
        modeled.append(b - a - sec + model if any(getattr(m, "overlap_report", None) for m in trainer.moe_layers)
                       else None)
    n = max(len(measured), 1)
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({_kind(sp) for sp in spans}):
        kc, ke = _comm_and_exposed([sp for sp in spans if _kind(sp) == kind], waits, measured)
        by_kind[kind] = {"comm_s_per_step": kc / n, "exposed_comm_s_per_step": ke / n,
                         "hidden_comm_s_per_step": max(kc - ke, 0.0) / n,
                         "overlap_ratio": (max(kc - ke, 0.0) / kc) if kc > 0 else None}
    metrics = {
        "rank": rank, "measured_steps": len(measured),
        "step_s": statistics.median(step_times) if step_times else None,
        "modeled_step_s": statistics.median(modeled) if modeled and modeled[0] is not None else None,
        "comm_s_per_step": comm_s / n, "exposed_comm_s_per_step": exposed_s / n,
        "hidden_comm_s_per_step": max(comm_s - exposed_s, 0.0) / n,
        "overlap_ratio": (max(comm_s - exposed_s, 0.0) / comm_s) if comm_s > 0 else None,
        "degrees": {layer.layer: list(layer.tuner.chosen or (layer.tuner.fwd, layer.tuner.bwd))
                    for layer in trainer.moe_layers if layer.tuner is not None},
        "model": {layer.layer: getattr(layer, "overlap_report", None) for layer in trainer.moe_layers},
        "by_kind": by_kind,
        "last_step": [measured[-1][1] - t_base, measured[-1][2] - t_base] if measured else None,
    }
    (out / f"metrics_rank{rank}.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_report(out_dir: str, world: int) -> dict[str, Any]:
    """summary.json, timeline.png and TensorBoard scalars from every rank's records."""
    out = Path(out_dir)
    ranks = [json.loads((out / f"metrics_rank{r}.json").read_text()) for r in range(world)]
    keys = ("step_s", "modeled_step_s", "comm_s_per_step", "exposed_comm_s_per_step", "hidden_comm_s_per_step",
            "overlap_ratio")
    summary = {k: _mean([m[k] for m in ranks]) for k in keys}
    kinds = sorted({k for m in ranks for k in m.get("by_kind", {})})
    by_kind = {kind: {k: _mean([m["by_kind"][kind][k] for m in ranks if kind in m["by_kind"]]) for k in keys[2:]}
               for kind in kinds}  # means over the ranks that carry that kind
    summary.update(world_size=world, measured_steps=ranks[0]["measured_steps"], degrees=ranks[0]["degrees"],
                   by_kind=by_kind, model=ranks[0]["model"],
                   per_rank={m["rank"]: {k: m[k] for k in keys} for m in ranks})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _timeline_png(out, world, ranks)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as tb:
        for k in keys:
            if summary[k] is not None:
                tb.add_scalar(f"profile/{k}", summary[k], 0)
        for m in ranks:
            if m["overlap_ratio"] is not None:
                tb.add_scalar("profile/overlap_ratio_by_rank", m["overlap_ratio"], m["rank"])
    return summary


def _timeline_png(out: Path, world: int, ranks: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = ["compute", "intra link", "inter link", "waiting on comm"]
    colors = {"compute": "tab:blue", "intra link": "tab:green", "inter link": "tab:orange",
              "waiting on comm": "tab:red"}
    fig, ax = plt.subplots(figsize=(12, 0.5 + 0.9 * world))
    y = 0
    labels = []
    for r in range(world):
        trace = json.loads((out / f"trace_rank{r}.json").read_text())["traceEvents"]
        lo, hi = ranks[r]["last_step"] or (0.0, float("inf"))
        for track in tracks:
            bars = [((e["ts"] / 1e6 - lo), e["dur"] / 1e6) for e in trace
                    if e.get("tid") == track and lo <= e["ts"] / 1e6 < hi]
            ax.broken_barh(bars, (y, 0.8), color=colors[track])
            labels.append(f"rank {r} {track}")
            y += 1
    ax.set_yticks([i + 0.4 for i in range(y)], labels, fontsize=7)
    ax.set_xlabel("seconds into the last measured step")
    ax.set_title("moetrain profile: compute, links, and time the training thread waits on communication")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
