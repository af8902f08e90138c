"""``moetrain`` command line: validate, topology, plan, train, profile, checkpoint, data prepare.

Exit codes: 0 success; 1 the job failed while running; 2 bad input (config, flags, launcher
environment), reported as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from moetrain.config import ConfigError, JobConfig, TrainConfig, load_config, load_config_data
from moetrain.errors import UserError
from moetrain.launch.signals import JobStopped
from moetrain.models.spec import get_model_spec

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}P"


def _token_once(cfg) -> str:
    """``moe.token_once`` as set, and for ``auto`` what it resolves to at this EP degree (uniform routing)."""
    from moetrain.moe.token_once import token_once_on
    from moetrain.registry import ROUTERS

    moe = cfg.moe
    if moe.token_once != "auto":
        return str(moe.token_once).lower()
    k = getattr(ROUTERS.get(moe.router), "fixed_topk", None) or moe.topk
    return "auto (on)" if token_once_on("auto", moe.num_experts, k, cfg.parallel.ep) else "auto (off)"


def describe(cfg: JobConfig) -> str:
    c, p, m, moe, t = cfg.cluster, cfg.parallel, cfg.model, cfg.moe, cfg.train
    facts = get_model_spec(cfg).facts()
    total, active = facts.total_params, facts.active_params
    edp = (p.tp * cfg.dp) // (p.ep * p.etp)
    lines = [
        f"world    {cfg.world_size} ranks = {c.nodes} node(s) x {c.ranks_per_node} (launcher={c.launcher}, "
        f"device={c.device})",
        f"layout   tp={p.tp} pp={p.pp} dp={cfg.dp} ep={p.ep} etp={p.etp} edp={edp} sp={str(p.sp).lower()} "
        f"vpp={p.vpp} schedule={p.schedule}",
        f"model    {m.family}{' from ' + m.hf_config if m.hf_config else ''}: "
        f"{m.layers} layers, d_model={m.d_model}, heads={m.heads}/{cfg.kv_heads} kv"
        f"{'' if m.head_dim * m.heads == m.d_model else f' x {m.head_dim}'}, d_ffn={cfg.d_ffn}, "
        f"vocab={m.vocab_size}, seq={m.seq_len}, attention={m.attention}; params {_human(total)} "
        f"({_human(active)} active), {_human(facts.flops_per_token)}FLOP/token (training)",
    ]
    if moe.num_experts:
        if moe.router == "expert_choice":  # experts pick ceil(T * k * cf / E) tokens each; cf defaults to 1
            cap = f"expert capacity {moe.capacity_factor or 1.0}"
        elif moe.router == "softmoe":
            cap = f"{moe.slots_per_expert} slot(s) per expert"
        else:
            cap = "dropless" if moe.capacity_factor is None else f"capacity {moe.capacity_factor} ({moe.drop_policy})"
        lines.append(
            f"moe      {moe.num_experts} experts top-{moe.topk} router={moe.router} {cap} dispatch={moe.dispatch} "
            f"every={moe.every} degrees={moe.pipeline_degree}/{moe.bwd_pipeline_degree} "
            f"overlap_wgrad={str(moe.overlap_wgrad).lower()} token_once={_token_once(cfg)}"
        )
    else:
        lines.append("moe      off (dense model)")
    lines.append(
        f"train    {t.steps} steps, micro={t.micro_batch_size} global={cfg.global_batch_size} "
        f"(accum {cfg.grad_accum_steps}), dtype={t.dtype}, lr={t.lr}, zero={t.optimizer.zero_stage}, "
        f"data={cfg.data.source}"
    )
    if cfg.wtacrs.enabled:
        lines.append(f"wtacrs   keep_ratio={cfg.wtacrs.keep_ratio} layers={','.join(cfg.wtacrs.layers)}")
    return "\n".join(lines)


def _grid(cfg: JobConfig):
    from moetrain.dist.topology import build_rank_grid

    return build_rank_grid(cfg.layout, ranks_per_node=cfg.cluster.ranks_per_node)


def _cmd_validate(args) -> int:
    from moetrain.launch.preflight import check_network, check_paths

    cfg = load_config(args.config, args.overrides)
    check_network(cfg)  # the local launcher makes the namespaces here
    try:
        check_paths(cfg, create=False)
    except UserError as exc:
        if cfg.cluster.launcher == "local":  # the ranks run here: their files must be here
            raise
        # torchrun / MPI / Ray ranks run on the cluster's nodes, whose files this machine may not see
        print(f"warning: {exc} (on this machine; the ranks of cluster.launcher={cfg.cluster.launcher} check "
              "their own at start)", file=sys.stderr)
    print(f"ok: {args.config}")
    print(describe(cfg))
    return 0


def _cmd_topology(args) -> int:
    cfg = load_config(args.config, args.overrides)
    grid = _grid(cfg)
    if args.json:
        print(json.dumps(grid.to_json()))
        return 0
    print(f"world_size {grid.world_size}")
    for i, ranks in enumerate(grid.nodes):
        print(f"node {i:<3} ranks {list(ranks)}")
    for family, groups in grid.groups.items():
        print(f"{family:<9} {' '.join(str(list(g)) for g in groups)}")
    return 0


def _is_rank0(cfg: JobConfig) -> bool:
    """This process speaks for the job: always, except on ranks 1.. of a torchrun / Slurm / MPI job."""
    import os

    if cfg.cluster.launcher not in ("mpi", "env"):
        return True
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", "0")))) == 0


def _finish(cfg: JobConfig, summary: dict) -> int:
    """The run's last line(s) and the exit code: 0 done, 128 + signal after a signal stop, 124 at the time
    limit (each with where it saved)."""
    from moetrain.launch.signals import exit_code

    speak = _is_rank0(cfg)
    stopped = summary.get("stopped")
    if summary.get("already_done"):
        if speak:
            print(f"already at step {summary['steps']} = train.steps in {summary['resumed_from']}: nothing to do; "
                  "raise train.steps or set checkpoint.resume=never", file=sys.stderr)
        return 0
    if stopped:
        why = stopped["signal"] or f"train.time_limit={cfg.train.time_limit}"
        where = (f"saved {stopped['checkpoint']}" if stopped.get("checkpoint") else
                 "nothing saved (set checkpoint.dir to keep the progress)")
        if speak:
            print(f"stopped by {why} after step {stopped['step']}: {where}", file=sys.stderr)
        if stopped["signal"]:
            _ignore_late_stops()
        return exit_code(stopped)
    if speak and summary.get("final_loss") is not None:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"{summary['tokens_per_s']:.0f} tokens/s")
    return 0


def _cmd_train(args) -> int:
    from moetrain.launch.job import run_job

    cfg = load_config(args.config, args.overrides)
    return _finish(cfg, run_job(cfg, args.summary))


def _cmd_eval(args) -> int:
    from moetrain.launch.job import run_job

    # an evaluation writes nothing into the training run's directories and never saves a checkpoint
    given = {o.partition("=")[0].strip() for o in args.overrides}
    defaults = {"logging.run_dir": "runs/eval"} if "logging.run_dir" not in given else {}
    cfg = load_config(args.config, [f"{k}={v}" for k, v in defaults.items()] + list(args.overrides)
                      + ["checkpoint.every=0", "fault.max_restarts=0"])
    d = cfg.data
    if d.source != "synthetic" and d.split is None and d.valid is None:
        raise UserError("moetrain eval needs held-out data: set data.split (e.g. [99, 1]) or data.valid")
    summary = run_job(cfg, args.summary, mode="eval")
    if not _is_rank0(cfg):
        return 0
    out = summary["valid"][0]
    if args.json:
        print(json.dumps({**out, "source": summary["source"], "checkpoint_step": summary["step"]}, indent=1))
    else:
        print(f"valid loss {out['loss']:.4f} | ppl {out['ppl']:.2f} | {out['tokens']:,} tokens | weights of "
              f"{summary['source']} (step {summary['step']})")
    return 0


def _cmd_generate(args) -> int:
    from moetrain.launch.generate import GenerateError, generate, generation_config

    base = load_config(args.config, args.overrides)
    cfg = load_config(args.config, list(args.overrides) + generation_config(base))
    tok = None
    if cfg.data.tokenizer:
        from moetrain.launch.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size)
    elif cfg.data.source == "text":  # a byte-level model: its ids are the prompt's bytes
        from moetrain.launch.tokenizer import ByteTokenizer

        tok = ByteTokenizer()
    if args.prompt is not None:
        if tok is None:
            raise GenerateError("--prompt needs data.tokenizer (or give token ids with --ids)")
        prompt = tok.encode(args.prompt)
    else:
        try:
            prompt = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError:
            raise GenerateError(f"--ids {args.ids!r}: expected comma-separated token ids") from None
    stop = tok.eod_id if tok is not None and not args.ignore_eod else None
    if len(prompt) + args.max_new_tokens > cfg.model.seq_len:  # RoPE runs on, but past what the model was taught
        print(f"[moetrain] note: {len(prompt)} prompt + {args.max_new_tokens} new tokens run past model.seq_len="
              f"{cfg.model.seq_len}, the context the model was trained at", file=sys.stderr)
    out = generate(cfg, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, stop_id=stop)
    text = tok.decode(out["new_ids"]) if tok is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "new_ids": out["new_ids"], "text": text, "weights": out["source"]}))
    elif text is not None:
        print((args.prompt or "") + text)
    else:
        print(",".join(map(str, out["ids"])))
    return 0


def _cmd_profile(args) -> int:
    from moetrain.launch.job import run_job
    from moetrain.launch.profile import write_report

    out = Path(args.out)
    # a profile is its own run: its logs and TensorBoard scalars go under --out, it saves no checkpoints and
    # resumes none unless told (never into, or from, the training run's directories by default)
    given = {o.partition("=")[0].strip() for o in args.overrides}
    defaults = {"logging.run_dir": str(out), "logging.tensorboard_dir": str(out / "tb" / "train"),
                "checkpoint.resume": "never"}
    always = {"checkpoint.every": 0, "fault.max_restarts": 0}
    base = [f"{k}={v}" for k, v in defaults.items() if k not in given] + list(args.overrides)
    steps = {}
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        steps = {"train.steps": args.steps}
        train = load_config_data(args.config, base).get("train") or {}
        warmup = train.get("warmup_steps", TrainConfig.model_fields["warmup_steps"].default) \
            if isinstance(train, dict) else None  # a malformed section: the full validation below names it
        if isinstance(warmup, int) and warmup > args.steps and "train.warmup_steps" not in given:
            # a short profile of a long job: its warm-up ends with the profile (one given here must fit, though)
            steps["train.warmup_steps"] = args.steps
    cfg = load_config(args.config, base + [f"{k}={v}" for k, v in {**always, **steps}.items()])
    code = _finish(cfg, run_job(cfg, str(out / "run_summary.json"), profile_dir=str(out)))
    if not _is_rank0(cfg) or code:
        return code
    summary = write_report(str(out), cfg.world_size)

    def fmt(v, unit="s"):
        return "n/a" if v is None else (f"{v * 1e3:.1f} ms" if unit == "s" else f"{v:.1%}")

    print(f"profile: step {fmt(summary['step_s'])} (modeled {fmt(summary['modeled_step_s'])}), communication "
          f"{fmt(summary['comm_s_per_step'])}/step: hidden {fmt(summary['hidden_comm_s_per_step'])}, exposed "
          f"{fmt(summary['exposed_comm_s_per_step'])}, overlap {fmt(summary['overlap_ratio'], '%')}; "
          f"degrees {summary['degrees']}")
    if summary.get("by_kind"):
        print("| kind | communication / step | hidden | exposed | overlap |")
        print("|---|---|---|---|---|")
        for kind, k in summary["by_kind"].items():
            print(f"| {kind} | {fmt(k['comm_s_per_step'])} | {fmt(k['hidden_comm_s_per_step'])} | "
                  f"{fmt(k['exposed_comm_s_per_step'])} | {fmt(k['overlap_ratio'], '%')} |")
    print(f"wrote {out}/summary.json, timeline.png, trace_rank*.json (chrome://tracing, ui.perfetto.dev), tb/")
    return 0


def _cmd_plan(args) -> int:
    from moetrain.plan import default_hardware, format_plan, load_hardware, make_plan

    if args.calibrate:
        from moetrain.plan.calibrate import calibrate

        if not args.out:
            raise UserError("--calibrate needs --out FILE (the hardware file to write)")
        if args.rounds < 1:
            raise UserError(f"--rounds: must be >= 1, got {args.rounds}")
        out = Path(args.out)
        try:  # a path that cannot be written fails now, not after the measurements
            out.parent.mkdir(parents=True, exist_ok=True)
            existed = out.exists()
            with open(out, "a"):
                pass
            if not existed:
                out.unlink()
        except OSError as exc:
            raise UserError(f"--out {args.out}: cannot write there ({exc.strerror or exc})") from None
        print("measuring this machine (about a minute; keep it otherwise idle) ...", file=sys.stderr, flush=True)
        text = calibrate(rounds=args.rounds)
        out.write_text(text)
        print(f"wrote {args.out}; plan with: moetrain plan CONFIG --hardware {args.out}")
        return 0
    if args.config is None:
        raise UserError("moetrain plan needs a CONFIG (or --calibrate --out FILE)")
    cfg = load_config(args.config, args.overrides)
    if args.gpus is not None and not args.search:
        raise UserError("--gpus sets the device count of --search; a plan uses the config's cluster "
                        "(cluster.nodes x cluster.ranks_per_node)")
    if args.search and args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    if args.search and not args.budget > 0:
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    hw_name = args.hardware
    if hw_name is None:
        if cfg.cluster.device == "cpu":
            raise UserError("a CPU job's plan needs this machine's rates: run `moetrain plan --calibrate --out "
                            "hw.yaml`, then pass --hardware hw.yaml (or --hardware h100_sxm to plan it for GPUs)")
        hw_name = default_hardware(cfg)
    hw = load_hardware(hw_name)
    if args.search:
        from moetrain.plan.search import search

        gpus = cfg.world_size if args.gpus is None else args.gpus
        found = search(args.config, args.overrides, gpus, hw, top=args.top, budget_s=args.budget)
        if args.json:
            print(json.dumps(found, indent=1))
            return 0
        done = "all" if found["complete"] else f"the first (search stopped at --budget {args.budget:g} s)"
        print(f"searched {done} {found['tried']} layouts for {gpus} x {hw.name} in {found['seconds']:.1f} s: "
              f"{found['fitting']} fit, {found['out_of_memory']} do not fit in any variant")
        if not found["tried"] and found["complete"]:
            m = cfg.model
            print(f"no layout of {gpus} devices suits this model: tp must divide model.kv_heads ({m.kv_heads}) and "
                  f"the devices per node ({min(gpus, hw.devices_per_node)}), pp at most model.layers ({m.layers}), "
                  f"and dp x train.micro_batch_size must divide train.global_batch_size "
                  f"({cfg.global_batch_size}); pick a device count that factors so")
            return 1
        if not found["top"]:
            print("no layout fits: add devices, shorten model.seq_len or shrink the model")
            return 1
        print(f"{'rank':>4} {'tokens/s':>12} {'MFU':>6} {'memory':>10}  overrides")
        for i, item in enumerate(found["top"], 1):
            plan = item["plan"]
            mem = plan["memory_per_rank"]["total"] / 2**30
            print(f"{i:>4} {plan['tokens_per_s']:>12,.0f} {plan['mfu']:>6.1%} {mem:>6.1f} GiB  "
                  f"{' '.join(item['overrides'])}")
        return 0
    plan = make_plan(cfg, hw)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrain",
        description="Distributed training for Mixture-of-Experts and large transformers.",
        epilog="Overrides are dotted config paths with YAML values, e.g. parallel.tp=2 moe.capacity_factor=null",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", metavar="CONFIG", help="job config YAML file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-path overrides")
        return p

    add("validate", "check a job config and print the resolved summary")
    p = add("topology", "print the rank grid: tp/pp/dp/ep/edp groups and nodes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("train", "run the job with the launcher named by cluster.launcher")
    p.add_argument("--summary", metavar="PATH", help="write a JSON summary of the run here")
    p = add("eval", "validation loss and perplexity of a checkpoint (checkpoint.dir or checkpoint.init_from)")
    p.add_argument("--summary", metavar="PATH", help="write the result as JSON here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("generate", "continue a prompt with a trained model (KV cache, at the config's TP degree)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", metavar="TEXT", help="text, tokenized with data.tokenizer")
    given.add_argument("--ids", metavar="1,2,3", help="token ids")
    p.add_argument("--max-new-tokens", type=int, required=True, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the tokenizer's end-of-document token")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("profile", "run a few steps with timing on: traces, timeline, hidden/exposed communication")
    p.add_argument("--out", metavar="DIR", required=True, help="where traces, timeline.png and summary.json go")
    p.add_argument("--steps", type=int, metavar="N", help="steps to run (default: train.steps)")
    p = sub.add_parser("plan", help="predict memory per rank, step time and throughput; --search ranks layouts",
                       description="Predict a job's memory per rank (exact for parameters, gradients and "
                                   "optimizer state), step time and throughput on a hardware file, before launch.")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="job config YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-path overrides")
    p.add_argument("--hardware", metavar="NAME|FILE",
                   help="a file from --calibrate, or a name in cluster_configs/hardware (default for CUDA jobs: "
                        "h100_sxm)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--search", action="store_true", help="rank every valid layout that fits by predicted tokens/s")
    p.add_argument("--gpus", type=int, metavar="N", help="devices for --search (default: the config's world size)")
    p.add_argument("--top", type=int, default=10, metavar="K", help="layouts --search prints (default 10)")
    p.add_argument("--budget", type=float, default=120.0, metavar="S", help="seconds --search may take (default 120)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and write a hardware file")
    p.add_argument("--out", metavar="FILE", help="where --calibrate writes the hardware file")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="--calibrate: single-rank rates as the mean of N rounds (default 3, ~70 s; 1: ~35 s, less "
                        "steady on a machine whose speed drifts)")
    dt = sub.add_parser("data", help="prepare a corpus: tokenize local files into Megatron's indexed format",
                        description="prepare a corpus: tokenize local files into Megatron's indexed format")
    dts = dt.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = dts.add_parser("prepare", help="tokenize .jsonl / .parquet / .txt files into PREFIX.bin + PREFIX.idx")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories (.jsonl, .json, .parquet, .txt)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="an HF tokenizer directory, a tokenizer.json or a SentencePiece .model")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    p.add_argument("--field", default="text", help="the text field of .jsonl / .parquet records (default text)")
    p.add_argument("--eod-token", default=None, metavar="TOKEN",
                   help="end-of-document token (default: the tokenizer's eos token)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    ck = sub.add_parser("checkpoint", help="inspect, convert, import from or export to Hugging Face",
                        description="inspect a checkpoint, convert it to one safetensors file, or move it to and "
                                    "from a Hugging Face model directory")
    cks = ck.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = cks.add_parser("inspect", help="what a checkpoint holds and at what layout it was saved")
    p.add_argument("dir", metavar="DIR", help="a step_* directory, or a checkpoint.dir (its newest complete step)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = cks.add_parser("convert", help="export the consolidated (unsharded) model as one safetensors file")
    p.add_argument("dir", metavar="DIR", help="a step_* directory, or a checkpoint.dir (its newest complete step)")
    p.add_argument("--out", metavar="FILE", required=True, help="the .safetensors file to write")
    p.add_argument("--optimizer", action="store_true", help="also export AdamW moments (optim/... names)")
    p = cks.add_parser("import-hf", help="a Hugging Face model directory as a moetrain checkpoint (step 0)")
    p.add_argument("dir", metavar="HF_DIR", help="a local HF model directory (config.json + safetensors)")
    p.add_argument("--out", metavar="CKPT_DIR", required=True, help="a new directory for the checkpoint")
    p = cks.add_parser("export-hf", help="a moetrain checkpoint as a Hugging Face model directory")
    p.add_argument("dir", metavar="CKPT", help="a step_* directory, or a checkpoint.dir (its newest complete step)")
    p.add_argument("--out", metavar="HF_DIR", required=True, help="a new directory for the HF model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="tensor dtype of the export (default: as saved)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, metavar="GB", help="largest safetensors shard")
    return parser


def _cmd_checkpoint(args) -> int:
    from moetrain.launch.ckpt_tools import convert, export_hf, format_inspect, import_hf, inspect

    if args.action == "inspect":
        info = inspect(args.dir)
        print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    elif args.action == "import-hf":
        done = import_hf(args.dir, args.out)
        print(f"imported {done['family']} ({done['parameters']:,} parameters in {done['tensors']} tensors) to "
              f"{done['path']}; its model sections: {done['config']}")
    elif args.action == "export-hf":
        if args.max_shard_gb <= 0:
            raise UserError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
        done = export_hf(args.dir, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb)
        print(f"exported {done['family']} at step {done['step']} ({done['tensors']} tensors in {done['shards']} "
              f"shards, {done['bytes'] / 2**20:.1f} MiB) to {done['path']}")
    else:
        done = convert(args.dir, args.out, optimizer=args.optimizer)
        print(f"wrote {done['tensors']} tensors ({done['bytes'] / 2**20:.1f} MiB) to {done['path']}")
    return 0


def _cmd_data(args) -> int:
    from moetrain.launch.prepare import prepare

    done = prepare(args.inputs, args.tokenizer, args.out, workers=args.workers, field=args.field,
                   eod_token=args.eod_token)
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        print(f"prepared {done['documents']:,} documents, {done['tokens']:,} tokens ({done['dtype']}) from "
              f"{done['files']} file(s) in {done['seconds']:.1f} s ({done['docs_per_s']:,.0f} documents/s, "
              f"{done['tokens_per_s']:,.0f} tokens/s) -> {done['bin']}, {done['idx']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # Overrides may stand before or after options: argparse leaves the later ones unparsed.
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    stray = [x for x in rest if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + rest
    if args.command in ("checkpoint", "data") and args.overrides:
        parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
    handler = {"validate": _cmd_validate, "topology": _cmd_topology, "train": _cmd_train,
               "profile": _cmd_profile, "checkpoint": _cmd_checkpoint, "plan": _cmd_plan,
               "data": _cmd_data, "eval": _cmd_eval, "generate": _cmd_generate}[args.command]
    # train / profile / eval run jobs that stop at a step on SIGTERM (launch/signals.py); the other commands
    # unwind like Ctrl-C, so their rank pools, worker pools and half-written files are cleaned up
    terminate = args.command not in ("train", "profile", "eval") and \
        threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if terminate else None
    try:
        return handler(args)
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ConfigError as exc:
        print(f"config error: {exc.path}: {exc.reason}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobStopped as exc:
        print(str(exc), file=sys.stderr)
        _ignore_late_stops()
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moetrain validate ... | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        from moetrain.launch.local import RankFailure

        if isinstance(exc, RankFailure):
            user = exc.user_errors()
            if user:  # the same mistake seen by the ranks: say it once
                print(f"error: {user[0].message}", file=sys.stderr)
                return 2
            print(f"job failed: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        if terminate:
            signal.signal(signal.SIGTERM, previous)


def _ignore_late_stops() -> None:
    """This process exits with a signal stop's code: a late copy of the signal (sent to the process group and
    forwarded by a parent such as make) must not kill it while the interpreter shuts down."""
    from moetrain.launch.signals import STOP_SIGNALS

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class _Terminated(BaseException):
    """SIGTERM in a command that is not a job: unwinds like KeyboardInterrupt (not caught as an Exception)."""


def _terminated(signum, frame) -> None:
    raise _Terminated()

if __name__ == "__main__":
    sys.exit(main())
