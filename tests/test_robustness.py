"""Runs that survive what real clusters do: every dispatch and degree mode on every node shape, signals,
storage, locks, corrupt and finished checkpoints, config numbers, non-finite steps, token files, pipeline
metrics and launcher output. Each test here failed on main before the fix it covers (issue #27)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ 1. every dispatch x degrees x nodes
MATRIX_BASE = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.d_ffn=48", "model.vocab_size=96",
               "model.seq_len=8", "train.micro_batch_size=2", "train.global_batch_size=8", "data.source=synthetic",
               "logging.every=1000", "moe.num_experts=8", "moe.topk=1", "moe.router=switch", "moe.d_expert=16",
               "moe.capacity_factor=1.25", "moe.profile_steps=1", "logging.collective_check=true",
               "cluster.collective_timeout_s=60"]
NODE_SHAPES = {"one node": (4, 4), "ep inside a node": (2, 2), "ep spanning nodes": (2, 4)}  # (per node, ep)


def _matrix_case(dispatch: str, degrees: str, shape: str) -> dict:
    """One small job on the 4-rank pool with the node map of ``shape`` (NODE_RANK set per case)."""
    import torch.distributed as dist

    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    per_node, ep = NODE_SHAPES[shape]
    world = dist.get_world_size()
    saved = os.environ.get("NODE_RANK")
    os.environ["NODE_RANK"] = str(dist.get_rank() // per_node)
    try:
        cfg = load_config(None, MATRIX_BASE + [
            f"cluster.nodes={world // per_node}", f"cluster.ranks_per_node={per_node}", f"parallel.ep={ep}",
            f"moe.dispatch={dispatch}", f"moe.pipeline_degree={degrees}", f"moe.bwd_pipeline_degree={degrees}",
            "train.steps=4"])
        out = Trainer(cfg, setup_groups(cfg)).fit()
    finally:
        os.environ["NODE_RANK"] = saved if saved is not None else "0"
    return {"steps": out["steps"], "degrees": out["moe_degrees"], "loss": out["final_loss"]}


@pytest.mark.parametrize("dispatch", ["flat", "hier2d", "hier1d"])
def test_every_dispatch_and_degree_mode_on_every_node_shape(ranks, dispatch):
    """hier1d with auto degrees used to hang at the tuner's fit: node leaders all-reduced a (2, 4) tensor, the
    other ranks a (2, 3) one. With the collective checker on, a divergence fails within seconds."""
    pool = ranks(4, 2)
    for shape in NODE_SHAPES:
        for degrees in ("2", "auto"):
            outs = pool.run(_matrix_case, dispatch, degrees, shape, timeout=240)
            assert all(o["steps"] == 4 and np.isfinite(o["loss"]) for o in outs), (dispatch, degrees, shape)
            assert len({json.dumps(o["degrees"], sort_keys=True) for o in outs}) == 1, (dispatch, degrees, shape)
            if degrees == "auto":  # profiled, then chosen: integers
                assert all(isinstance(d, int) for o in outs for pair in o["degrees"].values() for d in pair)


# ------------------------------------------------------------------------------ 7. config numbers and keys
def test_numbers_as_python_writes_them_and_duplicate_keys(tmp_path):
    cfg = load_config(None, ["train.lr=3e-3", "train.steps=1E2", "train.global_batch_size=1_000",
                             "train.micro_batch_size=10", "cluster.ranks_per_node=1", "train.min_lr=1e-5"])
    assert cfg.train.lr == 3e-3 and cfg.train.steps == 100 and cfg.global_batch_size == 1000
    f = tmp_path / "job.yaml"
    f.write_text("train:\n  lr: 3e-3\n  steps: 2e1\n")
    assert load_config(f).train.lr == 0.003 and load_config(f).train.steps == 20
    f.write_text("train:\n  lr: 3e-3\n  steps: 20\n  lr: 1e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.path == str(f) and "duplicate key 'lr' at lines 2 and 4" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=10", "train.warmup_steps=20"])
    assert info.value.path == "train.warmup_steps" and "exceed train.steps=10" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(None, ["checkpoint.resume=latest"])
    assert info.value.path == "checkpoint.resume" and "did you mean auto" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.time_limit=3 hours"])
    assert info.value.path == "train.time_limit"
    assert load_config(None, ["train.time_limit=3h50m"]).train.time_limit_s == 13800


def test_lr_schedule_does_not_climb_back_when_steps_grow_on_resume():
    from moetrain.parallel.optimizer import lr_at

    t = load_config(None, ["train.steps=100", "train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_steps=10"]).train
    longer = t.model_copy(update={"steps": 200})
    first = [lr_at(s, t, 100) for s in range(100)]
    resumed = [lr_at(s, longer, 100) for s in range(100, 200)]  # the horizon the checkpoint carries
    assert all(a >= b for a, b in zip(first[10:], first[11:]))  # decays monotonically
    assert resumed == [pytest.approx(1e-5)] * 100  # past the first run's horizon: min_lr, no jump back up
    assert lr_at(150, longer) > lr_at(99, t)  # what a re-stretched schedule would have done


# ------------------------------------------------------------------------------ 9. token files
def test_token_file_ids_and_dtype_are_checked_before_training(tmp_path):
    from moetrain.launch.data import DataError, check_token_file

    ids = np.random.default_rng(0).integers(1, 1000, size=4096)
    as32 = tmp_path / "tokens32.bin"
    ids.astype(np.uint32).tofile(as32)
    with pytest.raises(DataError, match="looks like a uint32 token file; set data.token_dtype=uint32"):
        check_token_file(str(as32), "uint16", 1000)
    assert check_token_file(str(as32), "uint32", 1000) == ids.max()
    as16 = tmp_path / "tokens16.bin"
    ids.astype(np.uint16).tofile(as16)
    with pytest.raises(DataError, match=r"token id \d+ .* is >= model.vocab_size=1000; .* a uint16 file"):
        check_token_file(str(as16), "uint32", 1000)
    with pytest.raises(DataError, match=">= model.vocab_size=500"):
        check_token_file(str(as16), "uint16", 500)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        check_token_file(str(odd), "uint16", 1000)


# ------------------------------------------------------------------------------ 8. NaN router logits
@pytest.mark.parametrize("router", ["topk", "switch", "gshard", "sigmoid", "xmoe", "expert_choice"])
def test_nan_router_logits_never_give_an_out_of_range_expert(router):
    from moetrain.config import MoEConfig
    from moetrain.moe import kernels
    from moetrain.moe.routers import build_router

    cfg = MoEConfig(num_experts=8, topk=1 if router == "switch" else 2, router=router, aux_loss_coef=0.0)
    x = torch.randn(16, 12, dtype=torch.float64)
    x[3] = float("nan")
    for fused in (False, True):
        r = build_router(cfg, d_model=12, dtype=torch.float64, fused_select=fused)
        routing = r(x, batch=2)
        assert bool((routing.expert_A >= 0).all() and (routing.expert_A < 8).all()), (router, fused)
    logits = torch.randn(16, 8)
    logits[2, 5] = float("nan")
    logits[4] = float("nan")
    for sigmoid in (False, True):
        top, _, _ = kernels.route_topk_ref(logits, None, 2, sigmoid=sigmoid, renormalize=True)
        assert bool((top >= 0).all() and (top < 8).all())
        assert 5 not in top[2].tolist()  # a NaN logit ranks last


# ------------------------------------------------------------------------------ CLI runs (real processes)
SMALL = ["cluster.nodes=1", "cluster.ranks_per_node=2", "parallel.tp=1", "moe.num_experts=0", "parallel.ep=1",
         "model.layers=2", "model.d_model=32", "model.d_ffn=64", "model.seq_len=32", "train.micro_batch_size=2",
         "train.global_batch_size=4", "logging.every=1", "data.source=synthetic", "train.warmup_steps=0"]
CONFIG = str(ROOT / "cluster_configs/sim_cpu_8rank.yaml")


def _cmd() -> list[str]:
    exe = Path(sys.executable).with_name("moetrain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "moetrain"]


def _cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd() + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.add(pid)
    return live


def _train_until(args: list[str], line: str, timeout: float = 120,
                 new_session: bool = False) -> tuple[subprocess.Popen, set[int], list[str]]:
    """Start ``moetrain train`` and return once its output shows ``line`` (and the rank processes)."""
    proc = subprocess.Popen(_cmd() + ["train", CONFIG, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, start_new_session=new_session)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for text in proc.stdout:
        seen.append(text)
        if line in text:
            break
        assert time.monotonic() < deadline, "".join(seen)
    return proc, _descendants(proc.pid), seen


@pytest.mark.parametrize("sig,code,group", [(signal.SIGTERM, 143, False), (signal.SIGUSR1, 138, False),
                                            (signal.SIGTERM, 143, True)])
def test_stop_signal_finishes_the_step_saves_and_exits_with_its_code(tmp_path, sig, code, group):
    """``group``: the signal goes to the whole process group (systemd, scancel, kill -TERM -PGID: the launcher,
    multiprocessing's forkserver and every rank get it) and a parent forwards it to the launcher once more
    (make does): still one stop at a step boundary with a checkpoint, not a crash or an immediate stop."""
    ck = tmp_path / "ck"
    # the group case: steps of ~0.5 s, so that a launcher that lost its forkserver sees its ranks as dead
    # before they report the stop
    slow = ["model.d_model=256", "model.d_ffn=1024", "model.seq_len=256"] if group else []
    proc, ranks, seen = _train_until(SMALL + slow + ["train.steps=100000", f"checkpoint.dir={ck}",
                                                     f"logging.run_dir={tmp_path}"], "step     3/",
                                     new_session=group)
    assert len(ranks) >= 2
    if group:
        os.killpg(proc.pid, sig)
        time.sleep(0.3)  # the parent's copy comes after the launcher handled the first
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    text = "".join(seen) + out
    assert proc.returncode == code, text[-3000:]
    saved = sorted(p.name for p in ck.glob("step_*"))
    assert saved and f"stopped by {sig.name} after step {int(saved[-1][5:])}: saved {ck / saved[-1]}" in text
    deadline = time.monotonic() + 10
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), "rank processes outlived the launcher"
    assert not (ck / ".lock").exists()


def test_sigterm_stops_an_evaluation_at_once(tmp_path):
    """An evaluation has no step boundary to reach and nothing to save: the first SIGTERM ends it, exit 143."""
    ck = tmp_path / "ck"
    trained = _cli(["train", CONFIG, *SMALL, "train.steps=1", f"checkpoint.dir={ck}", "checkpoint.every=1",
                    f"logging.run_dir={tmp_path}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    proc = subprocess.Popen(_cmd() + ["eval", CONFIG, *SMALL, f"checkpoint.dir={ck}", "train.eval_iters=1000000",
                                      f"logging.run_dir={tmp_path / 'eval'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        seen = []
        for text in proc.stdout:  # the ranks have loaded the weights and are evaluating
            seen.append(text)
            if "resumed from" in text:
                break
        ranks = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, ("".join(seen) + out)[-3000:]
    assert "stopped by SIGTERM during the evaluation; nothing was saved" in out
    deadline = time.monotonic() + 10
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks)


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    started = time.time()
    proc, ranks, _ = _train_until(SMALL + ["train.steps=100000", f"logging.run_dir={tmp_path}"], "step     2/")
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), "rank processes outlived a SIGKILLed launcher"
    assert not [d for d in Path(tempfile.gettempdir()).glob("moetrain-ranks-*") if d.stat().st_ctime > started]


def test_time_limit_saves_and_stops_before_the_limit(tmp_path):
    ck = tmp_path / "ck"
    t0 = time.monotonic()
    out = _cli(["train", CONFIG, *SMALL, "train.steps=100000", "train.time_limit=12s", f"checkpoint.dir={ck}",
                f"logging.run_dir={tmp_path}"])
    assert out.returncode == 124, out.stderr[-3000:]
    saved = sorted(ck.glob("step_*"))
    assert saved and "stopped by train.time_limit=12s after step" in out.stderr
    assert time.monotonic() - t0 < 60


def test_output_paths_are_checked_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for key in ("logging.run_dir", "checkpoint.dir", "logging.tensorboard_dir"):
        extra = [] if key == "logging.run_dir" else [f"logging.run_dir={tmp_path / 'run'}"]
        t0 = time.monotonic()
        out = _cli(["train", CONFIG, *SMALL, "train.steps=2", *extra, f"{key}={blocker / 'sub'}"])
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {key}: "), out.stderr
        assert time.monotonic() - t0 < 30  # before any rank starts
        out = _cli(["validate", CONFIG, *SMALL, *extra, f"{key}={blocker / 'sub'}"])
        assert out.returncode == 2 and out.stderr.startswith(f"config error: {key}: ")
    out = _cli(["train", CONFIG, *SMALL, "train.steps=2", f"logging.run_dir={tmp_path / 'run'}",
                "--summary", str(blocker / "summary.json")])
    assert out.returncode == 2 and out.stderr.startswith("config error: --summary: ")
    out = _cli(["validate", CONFIG, *SMALL, f"checkpoint.resume={tmp_path / 'nowhere'}"])
    assert out.returncode == 2 and "checkpoint.resume" in out.stderr and "not a checkpoint directory" in out.stderr


def test_a_second_job_on_one_checkpoint_dir_fails_at_start_naming_the_holder(tmp_path):
    from moetrain.dist.checkpoint import CheckpointLock

    ck = tmp_path / "ck"
    holder = CheckpointLock(ck, log=lambda m: None)
    holder.acquire()  # this test process holds it, alive
    try:
        out = _cli(["train", CONFIG, *SMALL, "train.steps=2", "checkpoint.every=1", f"checkpoint.dir={ck}",
                    f"logging.run_dir={tmp_path}"])
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert f"is in use by pid {os.getpid()} on " in out.stderr
    finally:
        holder.release()
    # a lock left by a dead process on this host is taken over, and a crashed save's .tmp is cleared
    (ck / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 7, "start_ticks": 1,
                                          "since": "yesterday", "command": "moetrain train (killed)"}))
    (ck / "step_00000009.tmp").mkdir()
    out = _cli(["train", CONFIG, *SMALL, "train.steps=2", "checkpoint.every=1", f"checkpoint.dir={ck}",
                f"logging.run_dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "taking over the lock" in out.stdout and "which is no longer running" in out.stdout
    assert not (ck / "step_00000009.tmp").exists() and not (ck / ".lock").exists()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001", "step_00000002"]


def test_unusable_checkpoints_stop_the_run_and_a_finished_run_says_so(tmp_path):
    ck = tmp_path / "ck"
    run = ["train", CONFIG, *SMALL, "checkpoint.every=1", f"checkpoint.dir={ck}", f"logging.run_dir={tmp_path}"]
    assert _cli(run + ["train.steps=2"]).returncode == 0
    again = _cli(run + ["train.steps=2"])
    assert again.returncode == 0 and "done:" not in again.stdout
    assert again.stderr.strip() == (f"already at step 2 = train.steps in {ck / 'step_00000002'}: nothing to do; "
                                    "raise train.steps or set checkpoint.resume=never")
    for manifest in ck.glob("step_*/manifest.json"):
        manifest.write_text("{broken")
    out = _cli(run + ["train.steps=3"])
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
    assert "no usable checkpoint in" in out.stderr and "step_00000002: unreadable manifest" in out.stderr
    assert "step_00000001: unreadable manifest" in out.stderr and "checkpoint.resume=never" in out.stderr
    fresh = _cli(run + ["train.steps=1", "checkpoint.resume=never"])
    assert fresh.returncode == 0 and "done: 1 steps" in fresh.stdout
    job = tmp_path / "job.yaml"  # a training run's config: its TensorBoard and checkpoint directories
    job.write_text(f"logging:\n  tensorboard_dir: {tmp_path / 'train_tb'}\ncheckpoint:\n  dir: {ck}\n  every: 1\n"
                   "train:\n  warmup_steps: 20\n")  # a long job's warm-up: a 2-step profile ends it early
    small = [o for o in SMALL if not o.startswith("train.warmup_steps=")]
    profiled = _cli(["profile", str(job), *small, "--out", str(tmp_path / "prof"), "--steps", "2"])
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    assert "warmup_steps: 2\n" in (tmp_path / "prof" / "config.resolved.yaml").read_text()
    bad = _cli(["profile", str(job), *small, "--out", str(tmp_path / "prof0"), "--steps", "0"])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --steps must be at least 1, got 0"
    assert json.loads((tmp_path / "prof" / "run_summary.json").read_text())["resumed_from"] is None
    assert not (tmp_path / "train_tb").exists() and list((tmp_path / "prof" / "tb").rglob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------ 8. non-finite steps
NAN_BASE = ["cluster.ranks_per_node=2", "model.layers=2", "model.d_model=32", "model.seq_len=16",
            "train.steps=5", "train.micro_batch_size=2", "logging.every=1000", "data.source=synthetic"]


def _nonfinite_case(extra: list[str], what: str, step: int, bad_rank: int) -> dict:
    """Train with ``what`` (loss | grad) made non-finite on ``bad_rank`` at 0-based ``step``; report whether the
    parameters moved in that step and how the run ended."""
    import torch.distributed as dist

    from moetrain.launch.faults import TrainError
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, NAN_BASE + extra)
    trainer = Trainer(cfg, setup_groups(cfg))
    local, train_step, snaps = trainer._local_step, trainer.train_step, {}

    def poisoned(s, accum, stats):
        bad = s == step and dist.get_rank() == bad_rank
        hook = trainer.params[0].register_hook(lambda g: torch.full_like(g, float("inf"))) \
            if bad and what == "grad" else None
        total, nbytes = local(s, accum, stats)
        if hook is not None:
            hook.remove()
        if bad and what == "loss":
            total = total * float("nan")
        return total, nbytes

    def watched():
        s = trainer.step
        snaps.setdefault(s, [p.detach().clone() for p in trainer.params])
        try:
            return train_step()
        finally:  # also when the step raises
            snaps[f"{s}+"] = [p.detach().clone() for p in trainer.params]

    trainer._local_step, trainer.train_step = poisoned, watched
    try:
        out = trainer.fit()
        error = None
    except TrainError as exc:
        out, error = None, str(exc)
    moved = {s: not all(torch.equal(a, b) for a, b in zip(snaps[s], snaps[f"{s}+"]))
             for s in range(cfg.train.steps) if f"{s}+" in snaps}
    return {"error": error, "moved": moved, "skipped": out and out["skipped_nonfinite_steps"],
            "losses": out and out["losses"]}


def test_non_finite_steps_never_update_and_stop_or_skip(ranks, tmp_path):
    pool = ranks(2, 2)
    got = pool.run(_nonfinite_case, [], "loss", 2, 1)[0]
    assert got["error"] == ("step 3: the loss on rank(s) [1] not finite; the update was not applied (0 such step(s) "
                            "skipped before, train.skip_nonfinite_steps=0); last good checkpoint: none "
                            "(checkpoint.dir is not set)")
    assert got["moved"] == {0: True, 1: True, 2: False}  # the bad step changed nothing
    ck = [f"checkpoint.dir={tmp_path}", "checkpoint.every=1"]
    got = pool.run(_nonfinite_case, ck, "grad", 1, 0)[0]
    # the bad gradient was averaged over data parallelism before the check: every replica holds it
    assert got["error"].startswith("step 2: the gradient norm (inf) on rank(s) [0, 1] not finite; the update was")
    assert got["error"].endswith(f"last good checkpoint: {tmp_path / 'step_00000001'}")
    got = pool.run(_nonfinite_case, ["train.skip_nonfinite_steps=1", "checkpoint.resume=never"], "loss", 2, 0)[0]
    assert got["error"] is None and got["skipped"] == [3]
    assert got["moved"] == {0: True, 1: True, 2: False, 3: True, 4: True}
    assert np.isnan(got["losses"][2]) and np.isfinite(got["losses"][3:]).all()


# ------------------------------------------------------------------------------ 10. pipeline stages' MoE metrics
def _pp_moe(tb: str) -> dict:
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, ["cluster.ranks_per_node=2", "parallel.pp=2", "model.layers=4", "model.d_model=32",
                             "model.seq_len=16", "moe.num_experts=4", "moe.every=1", "train.steps=2",
                             "train.micro_batch_size=1", "train.global_batch_size=2", "logging.every=1000",
                             f"logging.tensorboard_dir={tb}"])
    return Trainer(cfg, setup_groups(cfg)).fit()["moe"]


def test_every_pipeline_stage_reaches_rank0s_metrics(ranks, tmp_path):
    moe = ranks(2, 2).run(_pp_moe, str(tmp_path / "tb"))[0]
    assert {k.split("/")[1] for k in moe} == {"layer0", "layer1", "layer2", "layer3"}, moe  # layers 2, 3: stage 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(next((tmp_path / "tb").glob("events.*")))).Reload().Tags()["scalars"]
    assert "moe/layer3/load_cv" in tags and "moe/layer0/load_cv" in tags
