"""Rank environments: torchrun and Slurm variables, MPI through a real mpiexec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.dist.env import LaunchEnvError, RankEnv, free_port, from_env, under_mpi

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_variables():
    env = from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "GROUP_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"})
    assert env == RankEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, num_nodes=2,
                          master_addr="127.0.0.1", master_port=29400, launcher="env")
    assert env.init_method == "tcp://127.0.0.1:29400"


def test_slurm_variables():
    env = from_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                    "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
                    "SLURM_JOB_ID": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.launcher) == (1, 2, "gpu07", "slurm")


@pytest.mark.parametrize("environ,fragment", [
    ({}, "no launcher environment found"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside world"),
])
def test_bad_environments_are_clear_errors(environ, fragment):
    with pytest.raises(LaunchEnvError, match=fragment):
        from_env(environ)


def test_mpi_detection_does_not_import_mpi4py():
    assert under_mpi({"PMI_RANK": "0"}) and under_mpi({"OMPI_COMM_WORLD_RANK": "1"})
    assert not under_mpi({"RANK": "0"})
    assert "mpi4py.MPI" not in sys.modules or os.environ.get("PMI_RANK")


@pytest.fixture
def mpich_shm():
    """MPICH leaves its shared-memory segment (/dev/shm/mpich_shm_*) behind when a job is aborted: remove
    the ones this test's jobs made."""
    shm = Path("/dev/shm")
    before = set(shm.glob("mpich_shm_*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for leftover in set(shm.glob("mpich_shm_*")) - before:
            leftover.unlink(missing_ok=True)


def _mpiexec() -> str | None:
    cand = Path(sys.executable).with_name("mpiexec")
    return str(cand) if cand.exists() else shutil.which("mpiexec")


@pytest.mark.launcher
@pytest.mark.skipif(_mpiexec() is None, reason="mpiexec not installed")
def test_mpiexec_rank_environment_and_training_job(tmp_path, mpich_shm):
    """Four MPI ranks find their environment, rendezvous on 127.0.0.1 and train (TP=2 x DP=2, EP=4)."""
    code = ("import json, os; from dist.env import from_mpi; e = from_mpi(); "
            "os.write(1, ('ENV ' + json.dumps(e.__dict__) + '\\n').encode())")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "-c", code], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    envs = sorted((json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ENV ")),
                  key=lambda e: e["rank"])
    assert [e["rank"] for e in envs] == [0, 1, 2, 3]
    assert {e["world_size"] for e in envs} == {4} and {e["num_nodes"] for e in envs} == {1}
    assert [e["local_rank"] for e in envs] == [0, 1, 2, 3]
    assert len({(e["master_addr"], e["master_port"]) for e in envs}) == 1
    assert envs[0]["master_addr"] == "127.0.0.1"

    summary = tmp_path / "summary.json"
    job = subprocess.run(
        [_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "moetrain", "train",
         str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "cluster.launcher=mpi", "cluster.nodes=1",
         "cluster.ranks_per_node=4", "train.steps=2", "train.warmup_steps=1",
         "train.global_batch_size=8", f"logging.run_dir={tmp_path}", "--summary", str(summary)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("done:") == 1  # one line for the job, not one per rank
    data = json.loads(summary.read_text())
    assert data["world_size"] == 4 and data["layout"] == {"tp": 2, "pp": 1, "ep": 4, "dp": 2}  # MoE, EP=4
    assert data["steps"] == 2 and len(data["losses"]) == 2
    # the same job under the local launcher: the same losses
    from moetrain.config import load_config
    from moetrain.launch.job import run_job

    local = run_job(load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), [
        "cluster.nodes=1", "cluster.ranks_per_node=4", "train.steps=2", "train.warmup_steps=1",
        "train.global_batch_size=8", f"logging.run_dir={tmp_path / 'local'}"]))
    assert data["losses"] == pytest.approx(local["losses"], rel=1e-6)


@pytest.mark.launcher
@pytest.mark.skipif(_mpiexec() is None, reason="mpiexec not installed")
def test_mpiexec_exception_on_one_rank_aborts_the_job(tmp_path, mpich_shm):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    job = subprocess.run(
        [_mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "moetrain", "train",
         str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "cluster.launcher=mpi", "cluster.nodes=1",
         "cluster.ranks_per_node=4", "train.steps=4", "train.warmup_steps=1", "train.global_batch_size=8",
         f"logging.run_dir={tmp_path}",
         "fault.inject={rank: 2, step: 1, kind: exception}"],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert job.returncode != 0 and time.monotonic() - t0 < 120  # aborted, not left waiting in a collective
    assert "injected exception on rank 2 at step 1" in job.stderr


def test_torchrun_job_prints_done_once(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "moetrain", "train",
         str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "cluster.launcher=env", "cluster.nodes=1",
         "cluster.ranks_per_node=2", "parallel.ep=2", "train.steps=2", "train.warmup_steps=1",
         "train.global_batch_size=4", "logging.every=1000", f"logging.run_dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("done: 2 steps") == 1, job.stdout


def test_torchrun_ranks_honour_sigterm_save_and_stop(tmp_path):
    """torchrun forwards SIGTERM to its workers: each rank finishes the step, they save once, rank 0 says where."""
    import signal

    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "moetrain", "train",
           str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"), "cluster.launcher=env", "cluster.nodes=1",
           "cluster.ranks_per_node=2", "parallel.ep=2", "train.steps=100000", "train.warmup_steps=1",
           "train.global_batch_size=4", "logging.every=1", f"logging.run_dir={tmp_path}", f"checkpoint.dir={ck}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step     3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    saved = sorted(p.name for p in ck.glob("step_*"))
    assert saved, "".join(seen) + out
    assert out.count("stopped by SIGTERM after step") == 1
    assert f"stopped by SIGTERM after step {int(saved[-1][5:])}: saved {ck / saved[-1]}" in out
    assert not (ck / ".lock").exists()
