"""MoE layer forward+backward: moetrain vs DeepSpeed-MoE and Tutel, side by side on the same ranks and shapes.

Shapes are CPU-scaled versions of the MoE models people train now (d_model / expert hidden / experts top-k):

    mixtral   512 / 1024 / 8 top-2
    olmoe     512 / 256 / 64 top-8
    qwen3     512 / 128 / 128 top-8
    deepseek  512 / 128 / 128 top-8, plus one shared expert of hidden 256

or ``DxFxExK[+S]`` (S: a shared expert's hidden size). Every layer: GELU experts without bias (d -> f -> d),
an fp32 gate, expert parallelism over every rank, gloo on CPU; a shared expert is the same plain torch MLP
added to each layer's output. Capacity: a factor (moetrain ``drop_policy: position``; DeepSpeed top-1/2
position drops, top-k > 2 its only policy, ``probs``; Tutel its own) or ``none`` for dropless, each peer in
its dropless mode (DeepSpeed ``drop_tokens=False``, which pads every expert to the largest load; Tutel
``capacity_factor=0``, likewise; moetrain exact uneven splits).

Each timed iteration is forward, a scalar loss and backward; the time is the slowest rank's, median over
iterations after warm-up, the layers alternating iteration by iteration so machine drift hits all alike.
The compute floor is the useful expert FLOPs (every token's k assignments and the shared expert, forward
+ backward: 3 x 4 * T * (k * f + S) * d per rank) over the matmul rate (512^3, fp32) measured on each rank
in the same run; "of floor" = floor / layer time. Per row also moetrain's time split from one profiled
iteration (rank 0): each stage's forward and backward, by the moment the gradient reaches its boundary.

    DS_ACCELERATOR=cpu python benchmarks/moe_layer.py [--ranks 2] [--tokens 1024,4096]
        [--capacity 1.25,none] [--shapes mixtral,olmoe,qwen3,deepseek] [--iters 5]
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 [--kernels fused] [--tokens 4096]

Peers: DeepSpeed is a dependency of moetrain's dev install; Tutel is not (install it from ../shared/peers:
``mkdir -p .peers && tar xzf ../shared/peers/tutel-82af7aa.tar.gz -C .peers && NO_CUDA=1 .venv/bin/pip install
--no-build-isolation .peers/tutel``). A peer that is not installed is skipped with a message.

``--device cuda`` is the single-GPU row (one rank, EP = 1, no all-to-all on any side); ``--dtype bfloat16``
casts the experts (the gates stay fp32) and the input. ``--compare-wgrad-overlap`` adds moetrain's layer
with ``moe.overlap_wgrad`` set the other way from its default as one more interleaved layer;
``--compare-token-once`` adds it with ``moe.token_once: false`` (one row per assignment each way).
On CPU every layer runs with glibc malloc keeping freed memory (``--system-malloc`` leaves its defaults), the
peers' best form there: their fresh capacity buffers otherwise fault their pages in every step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

SHAPES = {  # name: (d_model, d_expert, experts, top-k, shared expert hidden or 0)
    "mixtral": (512, 1024, 8, 2, 0),
    "olmoe": (512, 256, 64, 8, 0),
    "qwen3": (512, 128, 128, 8, 0),
    "deepseek": (512, 128, 128, 8, 256),
}
STAGES = ("gate", "order", "dispatch", "experts", "combine", "unorder")


def _time_interleaved(steps: list[tuple], iters: int, warmup: int, sync=lambda: None) -> list[tuple[float, float]]:
    """(wall, CPU) median of each ``(fn, args)``, run alternately so machine drift hits all of them alike.

    Wall: the slowest rank's. CPU: the process's CPU time (all its threads, gloo's included) on the
    busiest rank, the work a layer costs whatever the other rank and the machine's neighbours are doing."""
    import torch
    import torch.distributed as dist

    times: list[list[float]] = [[] for _ in steps]
    cpus: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + iters):
        for j, (fn, args) in enumerate(steps):
            dist.barrier()
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(*args)
            sync()
            t = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time, the busiest rank's CPU
            if i >= warmup:
                times[j].append(float(t[0]))
                cpus[j].append(float(t[1]))
    return [(statistics.median(t), statistics.median(c)) for t, c in zip(times, cpus)]


def _ds_step(layer, x, shared=None):
    xi = x.detach().requires_grad_()
    out, aux, _ = layer(xi.transpose(0, 1))
    out = out.transpose(0, 1)
    if shared is not None:
        out = out + shared(xi)
    (out.pow(2).mean() + 0.01 * aux).backward()
    layer.zero_grad(set_to_none=True)
    if shared is not None:
        shared.zero_grad(set_to_none=True)


def _tutel_step(layer, x, shared=None):
    xi = x.detach().requires_grad_()
    out = layer(xi)
    if shared is not None:
        out = out + shared(xi)
    (out.pow(2).mean() + 0.01 * layer.l_aux).backward()
    layer.zero_grad(set_to_none=True)
    if shared is not None:
        shared.zero_grad(set_to_none=True)


def _our_step(layer, x):
    xi = x.detach().requires_grad_()
    layer(xi).pow(2).mean().backward()  # the aux loss enters through the layer's output (moe.aux_loss_coef)
    layer.zero_grad(set_to_none=True)


def _mlp(d: int, f: int):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(d, f, bias=False), torch.nn.GELU(), torch.nn.Linear(f, d, bias=False))


def _split(layer, x) -> dict[str, float]:
    """One profiled iteration of moetrain's layer: each stage's forward (hooks around it) and backward (from
    the moment the gradient reaches the stage's output to the moment it reaches its input), in ms."""
    import torch

    stamps: dict[str, float] = {}

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, name):
            ctx.name = name
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            stamps[ctx.name] = time.perf_counter()
            return g, None

    fwd: dict[str, float] = {}
    handles = []
    for name in STAGES:
        mod = getattr(layer, name)

        def pre(module, args, name=name):
            fwd[name] = -time.perf_counter()

        def post(module, args, out, name=name):
            fwd[name] += time.perf_counter()
            if name == "gate":
                return out
            if isinstance(out, tuple):
                return (Mark.apply(out[0], name), *out[1:])
            return Mark.apply(out, name)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    handles.append(layer.register_forward_pre_hook(lambda m, args: (Mark.apply(args[0], "input"),)))
    xi = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = layer(xi)
    t1 = time.perf_counter()
    loss = out.pow(2).mean()
    loss.backward()
    layer.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    res = {f"{k} fwd": v * 1e3 for k, v in fwd.items()}
    res["forward total"] = (t1 - t0) * 1e3
    order = ["unorder", "combine", "experts", "dispatch", "order", "input"]
    for a, b in zip(order, order[1:]):
        res[f"{a} bwd"] = (stamps[b] - stamps[a]) * 1e3
    res["order bwd"] = res.pop("order bwd")  # ends when x's gradient is complete: gate's backward included
    res["backward total"] = (stamps["input"] - stamps["unorder"]) * 1e3
    return res


def _expert_rows(step_fns: list[tuple], experts: list) -> list[int]:
    """Rows each layer's expert GEMMs compute on the busiest rank, in one untimed step (capacity slots for a
    padded layer, kept assignments for moetrain's)."""
    import torch
    import torch.distributed as dist

    rows = torch.zeros(len(step_fns), dtype=torch.long)
    for i, ((fn, args), mods) in enumerate(zip(step_fns, experts)):
        def count(module, inputs, i=i):
            if len(inputs) > 1 and hasattr(inputs[1], "counts"):  # moetrain's token-once stage: tokens in, rows
                rows[i] += sum(inputs[1].counts)
                return
            t = inputs[0]
            rows[i] += t.numel() // t.shape[-1]
        handles = [m.register_forward_pre_hook(count) for m in mods]
        fn(*args)
        for h in handles:
            h.remove()
    dist.all_reduce(rows, op=dist.ReduceOp.MAX)
    return rows.tolist()


def _peers_available() -> dict[str, str | None]:
    """Peer -> None when importable, else why it is skipped."""
    import importlib.util

    out: dict[str, str | None] = {}
    out["deepspeed"] = None if importlib.util.find_spec("deepspeed") else "not installed (pip install -e '.[dev]')"
    out["tutel"] = None if importlib.util.find_spec("tutel") else (
        "not installed: mkdir -p .peers && tar xzf ../shared/peers/tutel-82af7aa.tar.gz -C .peers && "
        "NO_CUDA=1 .venv/bin/pip install --no-build-isolation .peers/tutel")
    return out


def _bench(cases, iters: int, warmup: int, device: str, dtype_name: str, kernels: str, compare_overlap: bool,
           peers: list[str], compare_token_once: bool = False, malloc: bool = True) -> list[dict]:
    import torch
    import torch.distributed as dist

    from moetrain.launch.host_memory import keep_freed_memory

    # the peers allocate their capacity buffers fresh each step: with glibc's defaults each would fault its pages
    # in again (a 64 MiB index_select took 42 ms instead of 15-17 ms here), so every layer runs with freed memory
    # kept, as moetrain's CPU ranks do by default
    kept = keep_freed_memory() if malloc and device == "cpu" else False

    from moetrain.config import MoEConfig
    from moetrain.launch.metrics import measure_matmul_flops
    from moetrain.moe.layer import MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    if "deepspeed" in peers:
        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    if "tutel" in peers:
        from tutel import moe as tutel_moe
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    rate_n = 4096 if cuda else 512
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = []
    for (name, (d, f, E, k, S)), tokens, cf in cases:
        dist.barrier()
        rate = measure_matmul_flops(dtype, n=rate_n, device=device)
        rate = float(min(torch.tensor([rate]).tolist()))
        torch.manual_seed(0)
        shared = _mlp(d, S).to(device, dtype) if S else None
        x = torch.randn(tokens // 8, 8, d, generator=torch.Generator().manual_seed(rank)).to(device, dtype)
        layers: dict[str, tuple] = {}
        notes: dict[str, str] = {}
        margs = MoEConfig(num_experts=E, topk=k, d_expert=f, router="topk" if k > 1 else "switch",
                          capacity_factor=cf, drop_policy="position", activation="gelu", aux_loss_coef=0.01)
        groups = MoEGroups(ep=dist.group.WORLD if world > 1 else None)
        layer_kw = dict(d_model=d, sp=False, dtype=dtype, runtime=MoERuntime(fused=kernels == "fused"), shared=shared)
        ours = MoELayer(margs, 0, groups, **layer_kw).to(device)
        layers["moetrain"] = ((_our_step, (ours, x)), [ours.experts if ours.token_once else ours.experts.experts])
        if "deepspeed" in peers:
            if cf is None and world > 1:
                notes["deepspeed"] = ("dropless with EP > 1 aborts on gloo (its ranks pad to different "
                                      "capacities), see RESULTS.md")
            else:
                ds = DSMoE(hidden_size=d, expert=_mlp(d, f), num_experts=E, ep_size=world, k=k,
                           capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0, min_capacity=1,
                           drop_tokens=cf is not None, use_rts=False, top2_2nd_expert_sampling=False).to(device)
                ds.deepspeed_moe.experts.to(dtype)  # its gate keeps fp32, as ours does
                layers["deepspeed"] = ((_ds_step, (ds, x, shared)), list(ds.deepspeed_moe.experts.deepspeed_experts))
        if "tutel" in peers:
            tl = tutel_moe.moe_layer(
                gate_type={"type": "top", "k": k, "capacity_factor": 0 if cf is None else cf, "fp32_gate": True},
                model_dim=d, experts={"type": "ffn", "num_experts_per_device": E // world, "hidden_size_per_expert": f,
                                      "activation_fn": torch.nn.functional.gelu, "has_fc1_bias": False,
                                      "has_fc2_bias": False},
                scan_expert_func=None, group=dist.group.WORLD if world > 1 else None).to(device, dtype)
            layers["tutel"] = ((_tutel_step, (tl, x, shared)), [tl.experts])
        steps = [v[0] for v in layers.values()]
        if compare_overlap:  # the default is on for CUDA, off on CPU (moe.overlap_wgrad: auto)
            flipped = MoELayer(margs, 0, groups, **layer_kw).to(device)
            flipped.overlap_weight_grads = not cuda
            steps.append((_our_step, (flipped, x)))
        if compare_token_once:  # moetrain with one row per assignment each way (moe.token_once: false)
            rows_layer = MoELayer(margs.model_copy(update={"token_once": False}), 0, groups, **layer_kw).to(device)
            steps.append((_our_step, (rows_layer, x)))
        timed = _time_interleaved(steps, iters, warmup, sync)
        rows = _expert_rows([v[0] for v in layers.values()], [v[1] for v in layers.values()])
        split = _split(ours, x)
        flops = 3 * 4 * tokens * (k * f + S) * d
        results.append({"name": name, "shape": (d, f, E, k, S), "tokens": tokens, "cf": cf, "world": world,
                        "ms": {n: t[0] * 1e3 for n, t in zip(layers, timed)},
                        "cpu_ms": {n: t[1] * 1e3 for n, t in zip(layers, timed)},
                        "rows": dict(zip(layers, rows)), "notes": notes, "split": split,
                        "floor_ms": flops / rate * 1e3, "rate_gflops": rate / 1e9, "rate_n": rate_n,
                        "flipped_ms": timed[len(layers)][0] * 1e3 if compare_overlap else None,
                        "rows_ms": timed[-1][0] * 1e3 if compare_token_once else None,
                        "token_once": ours.token_once, "malloc_kept": kept})
        del layers, steps, ours
    return results if rank == 0 else []


def _parse_shape(text: str) -> tuple[str, tuple[int, int, int, int, int]]:
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        body, _, shared = text.lower().partition("+")
        d, f, e, k = (int(v) for v in body.split("x"))
        s = int(shared) if shared else 0
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is neither a name ({', '.join(SHAPES)}) nor DxFxExK[+S] "
                         "(e.g. 512x128x128x8+256)") from None
    if min(d, f, e, k) < 1 or k > e or s < 0:
        raise SystemExit(f"--shapes: {text!r} needs positive sizes and k <= experts")
    return text, (d, f, e, k, s)


def _parse_capacity(text: str) -> float | None:
    if text.lower() in ("none", "dropless"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise SystemExit(f"--capacity: {text!r} is neither a factor nor 'none'") from None
    if v <= 0:
        raise SystemExit(f"--capacity: {text!r} must be positive (or 'none' for dropless)")
    return v


def _report(res: list[dict], names: list[str], skipped: dict[str, str]) -> None:
    peers = [n for n in names if n != "moetrain"]
    head = "| shape | tokens/rank | capacity | " + " | ".join(f"{n} ms" for n in names) + \
           " | speed-up over best peer | " + " | ".join(f"{n} of floor" for n in names) + " | floor ms | rows " + \
           " / ".join(names) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in res:
        ms = r["ms"]
        best = min((ms[p] for p in peers if p in ms), default=None)
        cells = [f"{ms[n]:.1f}" if n in ms else "—" for n in names]
        frac = [f"{r['floor_ms'] / ms[n]:.0%}" if n in ms else "—" for n in names]
        d, f, E, k, S = r["shape"]
        shape = f"{r['name']} {d}/{f}/{E} top-{k}" + (f" +{S}" if S else "")
        cap = "dropless" if r["cf"] is None else f"{r['cf']:g}"
        up = f"{best / ms['moetrain']:.2f}x" if best else "—"
        rows = " / ".join(str(r["rows"].get(n, "—")) for n in names)
        print(f"| {shape} | {r['tokens']} | {cap} | " + " | ".join(cells) + f" | {up} | " + " | ".join(frac)
              + f" | {r['floor_ms']:.1f} | {rows} |")
    notes = {f"{n}: {why}" for r in res for n, why in r["notes"].items()}
    for n, why in skipped.items():
        notes.add(f"{n}: {why}")
    for line in sorted(notes):
        print(f"- {line}")
    print("\nmoetrain's time split (rank 0, one profiled iteration, ms):")
    keys = [f"{s} fwd" for s in STAGES] + ["forward total"] + \
           [f"{s} bwd" for s in ("unorder", "combine", "experts", "dispatch", "order")] + ["backward total"]
    print("| shape | tokens/rank | capacity | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 3))
    for r in res:
        d, f, E, k, S = r["shape"]
        cap = "dropless" if r["cf"] is None else f"{r['cf']:g}"
        print(f"| {r['name']} | {r['tokens']} | {cap} | " + " | ".join(f"{r['split'][k_]:.1f}" for k_ in keys) + " |")
    print("(order bwd includes the gate's backward: it ends when the input's gradient is complete; dispatch fwd "
          "includes the count exchange; combine / dispatch bwd are the backward all-to-alls)")
    if res[0]["flipped_ms"] is not None:
        for r in res:
            print(f"{r['name']} {r['tokens']}: moetrain with moe.overlap_wgrad flipped {r['flipped_ms']:.1f} ms, "
                  f"default {r['ms']['moetrain']:.1f} ms")
    if res[0].get("rows_ms") is not None:
        for r in res:
            print(f"{r['name']} {r['tokens']}: moetrain with moe.token_once=false (one row per assignment) "
                  f"{r['rows_ms']:.1f} ms, default {r['ms']['moetrain']:.1f} ms "
                  f"(token-once {'on' if r['token_once'] else 'not applicable'})")
    rates = [r["rate_gflops"] for r in res]
    print(f"matmul rate per rank ({res[0]['rate_n']}^3, measured before each row, slowest rank): "
          f"{min(rates):.1f}-{max(rates):.1f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=None, help="gloo ranks (default 2 on CPU; cuda runs one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--kernels", choices=["torch", "fused"], default="torch",
                    help="moetrain's order/inverse-order stages (fused: the csrc kernels, CUDA only)")
    ap.add_argument("--compare-token-once", action="store_true",
                    help="also time moetrain with moe.token_once=false (one row per assignment each way)")
    ap.add_argument("--compare-wgrad-overlap", action="store_true",
                    help="also time moetrain with the expert weight-gradient / all-to-all overlap set the other way")
    ap.add_argument("--tokens", default="1024,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--capacity", default="1.25,none", help="capacity factors, comma-separated; none = dropless")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated names ({', '.join(SHAPES)}) or DxFxExK[+S]")
    ap.add_argument("--peers", default="deepspeed,tutel", help="comma-separated: deepspeed, tutel (or empty)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc malloc's defaults (by default every layer runs with freed memory kept, as "
                         "CPU deployments do with jemalloc / tcmalloc; the peers gain, moetrain does not)")
    args = ap.parse_args()
    shapes = [_parse_shape(s) for s in args.shapes.split(",")]
    caps = [_parse_capacity(c) for c in args.capacity.split(",")]
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise SystemExit(f"--tokens: {args.tokens!r} is not a comma-separated list of integers") from None
    if any(t < 8 or t % 8 for t in tokens):
        raise SystemExit("--tokens: each must be a positive multiple of 8 (the input is [tokens/8, 8, d])")
    avail = _peers_available()
    wanted = [p for p in args.peers.split(",") if p]
    for p in wanted:
        if p not in avail:
            raise SystemExit(f"--peers: unknown peer {p!r} (deepspeed, tutel)")
    skipped = {p: avail[p] for p in wanted if avail[p] is not None}
    peers = [p for p in wanted if avail[p] is None]
    import torch

    ranks = args.ranks if args.ranks is not None else (1 if args.device == "cuda" else 2)
    if args.device == "cuda":
        if ranks != 1:
            raise SystemExit("--device cuda is the single-GPU row (EP = 1): leave --ranks out")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device on this machine")
    elif ranks < 1:
        raise SystemExit(f"--ranks must be at least 1, got {ranks}")
    for _, (_d, _f, E, _k, _S) in shapes:
        if E % ranks:
            raise SystemExit(f"--ranks {ranks}: {E} experts do not split over the ranks")
    from moetrain.launch.local import LocalRanks

    cases = [(s, t, c) for s in shapes for t in tokens for c in caps]
    with LocalRanks(ranks, timeout=7200, env={"DS_ACCELERATOR": args.device}) as pool:  # DeepSpeed's device
        res = pool.run(_bench, cases, args.iters, args.warmup, args.device, args.dtype, args.kernels,
                       args.compare_wgrad_overlap, peers, args.compare_token_once, not args.system_malloc)[0]
    where = (f"{torch.cuda.get_device_name()}, 1 rank (EP = 1)" if args.device == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} cores; {ranks} gloo ranks x 1 thread")
    malloc = ("freed memory kept (glibc mmap / trim thresholds 1 GiB)" if res and res[0]["malloc_kept"]
              else "glibc malloc defaults" if args.device == "cpu" else "CUDA caching allocator")
    print(f"machine: {where}; {args.dtype}; moetrain stages {args.kernels}; expert parallel over all ranks; "
          f"medians of {args.iters} after {args.warmup} warm-up; allocator: {malloc}")
    _report(res, ["moetrain", *peers], skipped)


if __name__ == "__main__":
    main()
