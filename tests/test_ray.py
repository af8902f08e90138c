"""cluster.launcher=ray: equals the local launcher, restarts after failures, node-contiguous ranks on a
2-node Ray cluster (ray.cluster_utils on 127.0.0.1), pre-flight errors. Launcher-level failure tests
(restart after an injected exit, a hang becoming an error) for the local launcher too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from moetrain.config import load_config
from moetrain.launch.job import JobError, run_job
from moetrain.launch.local import RankFailure

pytestmark = pytest.mark.launcher

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["parallel.tp=2", "parallel.ep=1", "moe.num_experts=0", "parallel.sp=false", "model.layers=2",
         "model.d_model=32", "model.d_ffn=64", "model.seq_len=16", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.dtype=float64", "logging.every=1000", "cluster.nodes=2",
         "cluster.ranks_per_node=2", "cluster.collective_timeout_s=20", "train.warmup_steps=1"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(str(ROOT / "cluster_configs/sim_cpu_8rank.yaml"),
                       SMALL + [f"logging.run_dir={tmp_path / 'run'}", *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The local launcher's run of the small job: 6 steps, TP=2 x DP=2."""
    tmp = tmp_path_factory.mktemp("local")
    return run_job(_cfg(tmp, "train.steps=6"))


def test_local_launcher_restarts_after_an_injected_exit(tmp_path, uninterrupted):
    out = run_job(_cfg(tmp_path, "train.steps=6", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=1",
                       "fault.max_restarts=1", "fault.inject={rank: 3, step: 2, kind: exit}"))
    assert out["restarts"] == 1 and out["resumed_from"].endswith("step_00000002")
    assert out["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-12)


def test_hang_becomes_an_error_naming_ranks_and_phase(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_job(_cfg(tmp_path, "train.steps=3", "cluster.collective_timeout_s=5",
                     "fault.inject={rank: 1, step: 1, kind: hang}"))
    assert time.monotonic() - t0 < 90
    text = str(info.value)
    assert "--- rank 1: hung ---" in text and "CollectiveFailure: rank 0: a collective in phase" in text
    assert "of step 1 failed after at most cluster.collective_timeout_s=5s" in text


@pytest.fixture()
def local_ray():
    """One local Ray instance for both runs of a test (run_job reuses a connected driver)."""
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_local_instance_equals_local_launcher_and_restarts(tmp_path, uninterrupted, local_ray, capfd):
    out = run_job(_cfg(tmp_path, "train.steps=6", "cluster.launcher=ray"))
    assert out["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-12)
    assert out["restarts"] == 0 and out["node_of_rank"] == [0, 0, 1, 1] and set(out["ray"]["ips"]) == {"127.0.0.1"}
    out = run_job(_cfg(tmp_path, "train.steps=6", "cluster.launcher=ray", f"checkpoint.dir={tmp_path / 'ck'}",
                       "checkpoint.every=1", "fault.max_restarts=2", "fault.inject={rank: 1, step: 2, kind: exit}"))
    assert out["restarts"] == 1 and out["resumed_from"].endswith("step_00000002")
    assert out["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-12)
    logged = capfd.readouterr().out
    assert "\n[rank 0] step     6/6 | loss" in logged  # one clean prefix: no "(_Rank pid=...)", no colour codes
    assert "pid=" not in logged and "\x1b[" not in logged


def _rank_nodes(run_dir: Path) -> set[str]:
    import json

    return {r["node_id"] for r in json.loads((run_dir / "ray_ranks.json").read_text())["ranks"]}


def test_ray_two_nodes_contiguous_ranks_and_node_loss(tmp_path, uninterrupted):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        addr = cluster.address
        first = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        # pre-flight: one node of 2 CPU slots cannot hold 2 nodes x 2 ranks
        t0 = time.monotonic()
        with pytest.raises(JobError, match=r"needs 2 node\(s\) x 2 CPU slot\(s\) = 4 ranks .* but the Ray cluster "
                                           r"has 2 node\(s\) with CPU \[2, 0\]"):
            run_job(_cfg(tmp_path, "cluster.launcher=ray", f"cluster.ray_address={addr}"))
        assert time.monotonic() - t0 < 30
        nodes = [first, cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]  # one spare
        cluster.wait_for_nodes()
        ck = tmp_path / "ck"
        lost: list[str] = []

        def lose_a_node():  # after the second checkpoint, a node holding ranks dies with its processes
            deadline = time.monotonic() + 240
            while not (ck / "step_00000002").is_dir() and time.monotonic() < deadline:
                time.sleep(0.2)
            used = _rank_nodes(tmp_path / "run")
            victim = next(n for n in nodes if n.node_id in used)
            lost.append(victim.node_id)
            cluster.remove_node(victim, allow_graceful=False)

        killer = threading.Thread(target=lose_a_node, daemon=True)
        killer.start()
        # rank 0 stalls at step 3 (first attempt only), so the job cannot finish before the node is gone;
        # the collective timeout is long enough that the node loss, not the stall, ends the attempt
        out = run_job(_cfg(tmp_path, "train.steps=6", "cluster.launcher=ray", f"cluster.ray_address={addr}",
                           f"checkpoint.dir={ck}", "checkpoint.every=1", "fault.max_restarts=1",
                           "fault.inject={rank: 0, step: 3, kind: hang}", "cluster.collective_timeout_s=90"))
        killer.join(timeout=5)
    finally:
        cluster.shutdown()
    placed = out["ray"]["nodes"]  # the restarted attempt's placement
    assert placed[0] == placed[1] and placed[2] == placed[3] and placed[0] != placed[2]  # contiguous per node
    assert lost and lost[0] not in placed
    assert out["node_of_rank"] == [0, 0, 1, 1] and out["restarts"] == 1
    assert out["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-12)


@pytest.mark.parametrize("group", [False, True])
def test_ray_driver_forwards_sigterm_ranks_save_and_stop(tmp_path, group):
    """SIGTERM to the driver reaches every actor (through a method call beside ``run``): one saved checkpoint,
    exit 143, no actor process left, one "[rank r]" prefix on the ranks' lines. ``group``: sent to the driver's
    whole process group, which holds the local Ray instance's GCS, raylet and workers too (they took it as
    death: the driver waited 60 s for the GCS and the stop was lost)."""
    import os
    import signal

    from tests.test_robustness import SMALL as SMALL_CLI
    from tests.test_robustness import _alive, _train_until

    ck = tmp_path / "ck"
    proc, ranks, seen = _train_until(SMALL_CLI + ["cluster.launcher=ray", "train.steps=100000",
                                                  f"checkpoint.dir={ck}", f"logging.run_dir={tmp_path}"],
                                     "[rank 0] step     3/", timeout=180, new_session=group)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, ("".join(seen) + out)[-3000:]
    saved = sorted(p.name for p in ck.glob("step_*"))
    assert saved and f"stopped by SIGTERM after step {int(saved[-1][5:])}: saved {ck / saved[-1]}" in out
    assert not (ck / ".lock").exists()
    assert "pid=" not in "".join(seen) + out and "\x1b[" not in "".join(seen) + out
    deadline = time.monotonic() + 20
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(ranks)
