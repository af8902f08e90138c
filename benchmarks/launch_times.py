"""Start-up time to the first finished step, and restart time after an injected failure, for the
local, Ray and MPI launchers on this machine.

Job: the CI model (2 layers, d_model 32) on 4 CPU ranks (2 simulated nodes x 2, TP=2 x DP=2), 6 steps,
checkpoint every step. Start-up = launch call -> rank 0 finished step 1 (wall clock, one machine).
Restart = failure detected (the attempt given up) -> rank 0 finished its first step after resuming;
the fault is ``fault.inject={rank: 3, step: 3, kind: exit}``. mpiexec does not restart jobs (a
scheduler or torchrun does), so MPI has no restart figure. Median of ``--repeats`` runs.

    python benchmarks/launch_times.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray instance on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

JOB = ["parallel.tp=2", "parallel.ep=1", "moe.num_experts=0", "parallel.sp=false", "model.layers=2",
       "model.d_model=32", "model.d_ffn=64", "model.seq_len=16", "train.micro_batch_size=2",
       "train.global_batch_size=4", "train.steps=6", "logging.every=1000", "cluster.nodes=2",
       "cluster.ranks_per_node=2", "checkpoint.every=1"]


def _in_process(launcher: str, tmp: Path, fail: bool) -> tuple[float, float | None]:
    from moetrain.config import load_config
    from moetrain.launch.job import run_job

    extra = [f"cluster.launcher={launcher}", f"checkpoint.dir={tmp / 'ck'}", f"logging.run_dir={tmp / 'run'}"]
    if fail:
        extra += ["fault.max_restarts=1", "fault.inject={rank: 3, step: 3, kind: exit}"]
    cfg = load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), JOB + extra)
    t0 = time.time()
    s = run_job(cfg)
    if fail:
        assert s["restarts"] == 1, s["restarts"]
        return s["first_step_wall"] - t0, s["first_step_wall"] - s["failures_wall"][-1]
    return s["first_step_wall"] - t0, None


def _mpi(tmp: Path) -> float:
    exe = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(exe) if exe.exists() else shutil.which("mpiexec")
    summary = tmp / "summary.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    t0 = time.time()
    subprocess.run([mpiexec, "-n", "4", sys.executable, "-m", "mpi4py", "-m", "moetrain", "train",
                    str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), *JOB, "cluster.launcher=mpi",
                    f"checkpoint.dir={tmp / 'ck'}", f"logging.run_dir={tmp / 'run'}", "--summary", str(summary)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return json.loads(summary.read_text())["first_step_wall"] - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rows = {"local": ([], []), "ray": ([], []), "mpi": ([], [])}
    for _ in range(a.repeats):
        for launcher in ("local", "ray"):
            with tempfile.TemporaryDirectory() as d:
                rows[launcher][0].append(_in_process(launcher, Path(d), fail=False)[0])
            with tempfile.TemporaryDirectory() as d:
                rows[launcher][1].append(_in_process(launcher, Path(d), fail=True)[1])
        with tempfile.TemporaryDirectory() as d:
            rows["mpi"][0].append(_mpi(Path(d)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; 4 CPU ranks (TP=2 x DP=2), "
          f"median of {a.repeats}")
    print("| launcher | start-up to first step (s) | restart: failure detected -> first step again (s) |")
    print("|---|---|---|")
    for name, (start, restart) in rows.items():
        r = f"{statistics.median(restart):.1f}" if restart else "n/a (mpiexec does not restart)"
        print(f"| {name} | {statistics.median(start):.1f} | {r} |")


if __name__ == "__main__":
    main()
