"""``moetrain plan --calibrate``: measure this machine and write a hardware file for the planner.

Measured with one thread per rank, as the local launcher runs its simulated ranks: GEMM rates by shape for
each dtype (a rate and an operand-traffic rate fitted over sizes 64..1024 and skinny shapes, each in its three
training layouts with cold operands, so ``gemm_efficiency`` is 1 and ``peak_tflops`` is the fitted rate),
causal SDPA against that rate (``attention_efficiency``), copy bandwidth (``hbm_gbps``), gloo all-reduce latency
and bandwidth between two local ranks over 127.0.0.1, each all-reduce timed after a burst of compute as in a
training step (both link classes: simulated nodes share the loopback), and how much slower compute and
memory-bound work run when every core runs a rank. Fitted on reference models: moetrain's host time per block,
the elementwise factor (a dense model) and the MoE routing cost (an MoE model beside its dense twin). Device
memory is this machine's RAM divided by its cores. Every measuring rank allocates as the trainer's CPU ranks
do (``cluster.keep_freed_memory``, launch/host_memory.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import time

from moetrain.launch.host_memory import keep_freed_memory

__all__ = ["calibrate"]


def _typical_time(fn, reps: int = 5, rounds: int = 3) -> float:
    """The mean of ``rounds`` x ``reps`` timings without the slowest tenth: a step is the sum of many such
    operations, so it pays their mean, and the mean sits above the median of this machine's right-skewed
    timings (runs here measured 15-40% slower than a median-based calibration predicted; this alone did not
    close that, see RESULTS.md); the slowest tenth (a preemption landing on one call) is what a median step
    leaves out too."""
    fn()
    times = []
    for _ in range(rounds * reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.fmean(times[: max(len(times) - len(times) // 10, 1)])


def _gemm_fit(dtype) -> tuple[float, float, float]:
    """(seconds per call, FLOP/s, bytes/s) of ``t = a + 2mnk / R + (mk + kn + mn) e / B`` fitted (non-negative
    least squares) over square and skinny GEMMs: the skinny ones (few rows, as experts see) run below the
    square rate, which the bytes term captures. Each shape is timed as a training step runs it: in its three
    layouts (forward ``x W^T``, input gradient ``g W``, weight gradient ``g^T x``) and with cold operands
    (a pool of distinct operand sets twice the size of a large L3, cycled), since a step's weights and
    activations stream from memory; hot, repeated operands measured 5-20% above the rate a step's GEMMs get."""
    import itertools

    import torch

    shapes = [(n, n, n) for n in (64, 128, 256, 512, 1024)]
    shapes += [(m, n, k) for m in (8, 32, 128) for n, k in ((1024, 256), (256, 1024), (2048, 512))]
    e = torch.empty((), dtype=dtype).element_size()
    layouts = (lambda x, w, g: x @ w.t(), lambda x, w, g: g @ w, lambda x, w, g: g.t() @ x)
    rows, times = [], []
    for m, n, k in shapes:
        size = (m * k + k * n + m * n) * e
        pool = min(max(1, (64 << 20) // size), 256)
        xs = [torch.randn(m, k, dtype=dtype) for _ in range(pool)]
        ws = [torch.randn(n, k, dtype=dtype) for _ in range(pool)]
        gs = [torch.randn(m, n, dtype=dtype) for _ in range(pool)]
        for f in layouts:
            turn = itertools.cycle(range(pool))

            def call(f=f, turn=turn, xs=xs, ws=ws, gs=gs):
                i = next(turn)
                return f(xs[i], ws[i], gs[i])

            times.append(_typical_time(call, reps=3 if m * n * k >= 2**28 else 5))
            rows.append([1.0, 2.0 * m * n * k, float(size)])
    cols = [1, 2]  # on a CPU the per-call cost is below what these timings resolve
    while True:
        A = torch.tensor([[r[c] for c in cols] for r in rows], dtype=torch.float64)
        scale = A.abs().max(dim=0).values
        sol = torch.linalg.lstsq(A / scale, torch.tensor(times, dtype=torch.float64).unsqueeze(1)).solution
        coef = (sol.squeeze(1) / scale).tolist()
        neg = [c for c, v in zip(cols, coef) if v < 0]
        if not neg:
            break
        cols = [c for c in cols if c != neg[0]]
    full = dict(zip(cols, coef))
    per_call, per_flop, per_byte = full.get(0, 0.0), full.get(1, 0.0), full.get(2, 0.0)
    rate = 1.0 / per_flop if per_flop > 0 else max(r[1] / t for r, t in zip(rows, times))
    return per_call, rate, (1.0 / per_byte if per_byte > 0 else 0.0)


_SHARED = ["model.d_model=256", "model.heads=4", "model.seq_len=128", "model.vocab_size=512", "model.layers=3",
           "train.micro_batch_size=2", "moe.num_experts=8", "moe.topk=2", "moe.d_expert=512", "moe.every=1"]
"""A model whose weights and activations (~30 MiB) do not stay in a shared L3, as a training step's do not."""


def _shared_work() -> tuple[float, float]:
    """(compute, memory-bound) seconds on this rank while the node's other ranks run the same, all started
    together: a forward + backward of :data:`_SHARED` (median of 3), and a foreach AdamW step over 8M float32
    parameters (memory-bound: it streams 16 bytes per parameter). The second slows down far more when the
    ranks share the memory bus (1.44-1.59x on 2 cores here, the model 1.06-1.10x)."""
    import torch
    import torch.distributed as dist

    keep_freed_memory()
    torch.set_num_threads(1)
    _fwd_bwd(_SHARED)
    dist.barrier()
    compute = statistics.median(_fwd_bwd(_SHARED) for _ in range(3))
    _, opt = _adamw_8m()
    opt.step()
    dist.barrier()
    return compute, _typical_time(opt.step, reps=5)


def _allreduce() -> list[tuple[int, float]]:
    """(bytes, mean seconds) of gloo all-reduces, each after a few ms of GEMMs on every rank, as a training
    step issues them: a rank that computed until the collective pays for the other rank's late arrival and for
    waking gloo's threads, about 3 ms here where back-to-back all-reduces take 0.4-0.8 ms. The mean, not the
    median: a step pays the sum of its many collectives, and their cost has a long tail."""
    import torch
    import torch.distributed as dist

    a, b = torch.randn(256, 512), torch.randn(512, 256)
    out = []
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 21, 1 << 23):
        x = torch.ones(n // 4, dtype=torch.float32)
        dist.barrier()
        times = []
        for _ in range(41):
            for _ in range(8):
                torch.mm(a, b)
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out.append((n, statistics.fmean(times[1:])))
    return out


_TINY = ["model.d_model=16", "model.heads=2", "model.seq_len=8", "model.vocab_size=64", "train.micro_batch_size=1",
         "moe.d_expert=16", "moe.num_experts=8", "moe.topk=2"]


def _fwd_bwd(overrides: list[str]) -> float:
    """Seconds of one forward + backward of the model ``overrides`` describe (built in this process)."""
    import torch

    from moetrain import build_model, load_config

    cfg = load_config(None, overrides)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len))

    def run():
        model.zero_grad(set_to_none=True)
        model(tokens, tokens).backward()

    for _ in range(2):
        run()
    return _typical_time(run, reps=7)


def _host_overheads() -> dict[str, float]:
    """moetrain's host time per block (forward + backward of one micro-batch) at shapes so small that the
    arithmetic is nothing: what the framework itself costs per dense block, per MoE block and per model
    (embedding, head, loss); on this machine it does not overlap with compute."""
    dense1, dense5 = _fwd_bwd(_TINY + ["model.layers=1"]), _fwd_bwd(_TINY + ["model.layers=5"])
    moe1, moe5 = (_fwd_bwd(_TINY + ["model.layers=1", "moe.every=1"]),
                  _fwd_bwd(_TINY + ["model.layers=5", "moe.every=1"]))
    dense = max((dense5 - dense1) / 4, 0.0)
    moe = max((moe5 - moe1) / 4, 0.0)
    return {"dense_block": dense, "moe_block": moe, "model": max(dense1 - dense, 0.0)}


_ROUTE = ["model.d_model=128", "model.heads=2", "model.seq_len=256", "model.vocab_size=64", "model.layers=3",
          "train.micro_batch_size=2"]
_ROUTE_MOE = ["moe.num_experts=4", "moe.topk=2", "moe.d_expert=256", "moe.every=1"]
_ROUTE_DENSE = ["model.d_ffn=512"]  # the same active FLOPs as two experts of 256


_BLOCKS = ["model.d_model=384", "model.heads=6", "model.seq_len=256", "model.vocab_size=256", "model.layers=2",
           "model.d_ffn=1024", "train.micro_batch_size=1"]
"""A dense reference model (not a shape the planner's validation runs) whose forward + backward fits the
planner's elementwise factor: what its GEMM, attention and host terms leave unexplained."""


def _routing_cost() -> tuple[float, float]:
    """Measured forward + backward of a 3-block MoE model (4 experts, top-2) and of the dense model with the
    same active FLOPs: their difference is what routing, packing and combining cost beyond the FLOPs."""
    return _fwd_bwd(_ROUTE + _ROUTE_MOE), _fwd_bwd(_ROUTE + _ROUTE_DENSE)


def _adamw_8m():
    """(parameters, optimizer): 8M float32 parameters in four tensors of an expert weight's size, with random
    gradients, under torch's foreach AdamW as the trainer builds it on CPU."""
    import torch

    params = [torch.nn.Parameter(torch.randn(1 << 21)) for _ in range(4)]
    for q in params:
        q.grad = torch.randn_like(q)
    return params, torch.optim.AdamW(params, lr=1e-3, foreach=True)


def _per_param_costs() -> tuple[float, float]:
    """Seconds per parameter of moetrain's optimizer step (torch's foreach AdamW, as the trainer builds it on
    CPU) and of its gradient clipping (``clip_grad_norm``: the float64 norm pass and the scaling), over 8M
    float32 parameters in tensors of an expert weight's size."""
    from moetrain.parallel.data_parallel import clip_grad_norm

    params, opt = _adamw_8m()
    n = sum(q.numel() for q in params)
    adam = _typical_time(opt.step, reps=5) / n
    replicas = {id(q): 1 for q in params}
    norm = _typical_time(lambda: clip_grad_norm(params, 1e-6, replicas), reps=5) / n
    return adam, norm


def _step_overhead() -> float:
    """A tiny one-rank training step (optimizer, gradient norm, votes, bookkeeping) beyond its forward and
    backward: median step time of a 2-layer tiny run minus its blocks and model overhead."""
    import torch.distributed as dist  # noqa: F401 (the rank has it initialised)

    from moetrain import load_config
    from moetrain.launch.job import setup_groups
    from moetrain.launch.trainer import Trainer

    cfg = load_config(None, _TINY + ["model.layers=2", "train.steps=16", "train.global_batch_size=1",
                                     "data.source=synthetic", "logging.every=1000", "logging.run_dir=/tmp"])
    trainer = Trainer(cfg, setup_groups(cfg))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    times = sorted(trainer.step_times[3:])
    return times[len(times) // 2]


def _copy_gbps() -> float:
    """Memory bandwidth of a 256 MiB float32 copy (read + write)."""
    import torch

    src = torch.empty(256 * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _typical_time(lambda: dst.copy_(src)) / 1e9


def _measure_rank() -> dict:
    """Everything measured on one rank's thread, inside a rank process of the local launcher."""
    import torch
    import torch.nn.functional as F

    keep_freed_memory()
    torch.set_num_threads(1)
    peaks, launch, gemm_bw = {}, [], []
    for key, dtype in (("float32", torch.float32), ("float64", torch.float64), ("bfloat16", torch.bfloat16)):
        alpha, rate, bw = _gemm_fit(dtype)
        peaks[key] = round(rate / 1e12, 6)
        launch.append(alpha)
        if key == "float32":
            gemm_bw.append(bw)
    # causal SDPA: its rate on the causal half of 4 b s^2 h hd, against the float32 GEMM rate
    q = torch.randn(2, 4, 256, 64)
    t = _typical_time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    attention_eff = (0.5 * 4 * 2 * 256 * 256 * 4 * 64 / t) / (peaks["float32"] * 1e12)
    hbm = _copy_gbps()
    host = _host_overheads()
    adam_s, norm_s = _per_param_costs()
    tiny_step = _step_overhead()
    route = _routing_cost()
    blocks = _fwd_bwd(_BLOCKS)
    return {"peaks": peaks, "launch": launch, "gemm_bw": gemm_bw, "attention_eff": attention_eff, "hbm": hbm,
            "host": host, "adam_s": adam_s, "norm_s": norm_s, "route": route, "blocks": blocks,
            "step_overhead": max(tiny_step - 2 * host["dense_block"] - host["model"], 0.0)}


def _mean_of(rounds: list):
    """Element-wise mean of equally shaped nested dicts / lists of numbers (the calibration's rounds)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: _mean_of([r[k] for r in rounds]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_mean_of([r[i] for r in rounds]) for i in range(len(first)))
    return statistics.fmean(rounds)


def calibrate(name: str = "this machine (calibrated)", rounds: int = 3) -> str:
    """The hardware file's YAML text for this machine; the single-rank rates are the mean of ``rounds`` rounds
    (this machine's speed drifts from minute to minute)."""
    import torch

    from moetrain.launch.local import LocalRanks
    from moetrain.moe.perf_model import fit_alpha_beta

    with LocalRanks(1, ranks_per_node=1, timeout=900) as pool:  # measured where the ranks run
        measured = [pool.run(_measure_rank)[0] for _ in range(rounds)]
    rank = _mean_of(measured)
    cores = os.cpu_count() or 1
    with LocalRanks(2, ranks_per_node=2, timeout=300) as pool:
        samples = pool.run(_allreduce)[0]
    with LocalRanks(cores, ranks_per_node=cores, timeout=600) as pool:  # every core busy, as a full node runs
        shared = pool.run(_shared_work)
    with LocalRanks(1, ranks_per_node=1, timeout=600) as pool:
        alone = pool.run(_shared_work)[0]
    slowdown = max(statistics.median(c for c, _ in shared) / alone[0], 1.0)
    memory_slowdown = max(statistics.median(m for _, m in shared) / alone[1], 1.0)
    peaks, launch, gemm_bw = rank["peaks"], rank["launch"], rank["gemm_bw"]
    attention_eff, hbm, host = rank["attention_eff"], rank["hbm"], rank["host"]
    adam_s, norm_s, step_overhead = rank["adam_s"], rank["norm_s"], rank["step_overhead"]
    # ring all-reduce over 2 ranks moves n bytes each way in 2 steps: t = 2 alpha + n / bw
    ab = fit_alpha_beta([n for n, _ in samples], [t for _, t in samples])
    latency_us = ab.alpha / 2 * 1e6
    bandwidth = 1.0 / ab.beta / 1e9 if ab.beta > 0 else 1.0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    link = {"latency_us": round(latency_us, 3), "bandwidth_gbps": round(bandwidth, 4)}
    lines = [
        f"# Measured by `moetrain plan --calibrate` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.processor() or platform.machine()},",
        f"# {cores} cores, torch {torch.__version__}, one thread per rank (the local launcher's ranks).",
        f"name: {name}",
        f"device_memory_gib: {ram / cores / 2**30:.3f}   # RAM / cores",
        "reserved_gib: 0.35               # a rank's start-up memory (torch, gloo) before the model",
        f"devices_per_node: {cores}",
        "peak_tflops:                     # fitted GEMM rate (square 64..1024 and skinny 8..128-row shapes)",
    ] + [f"  {k}: {v}" for k, v in peaks.items()] + [
        "gemm_efficiency: 1.0             # the peak above is already the achieved rate",
        f"gemm_bytes_gbps: {gemm_bw[0] / 1e9:.4f}   # fitted operand traffic rate (additive GEMM model on CPU)",
        f"gemm_launch_us: {statistics.median(launch) * 1e6:.3f}   # fitted per-call cost",
        f"hbm_gbps: {hbm:.3f}              # 256 MiB copy, read + write",
        f"attention_efficiency: {attention_eff:.4f}   # causal SDPA [2,4,256,64] vs the float32 GEMM rate",
        "intra:                           # gloo all-reduce between 2 ranks over 127.0.0.1",
        f"  latency_us: {link['latency_us']}",
        f"  bandwidth_gbps: {link['bandwidth_gbps']}",
        "inter:                           # the same loopback (simulated nodes share it)",
        f"  latency_us: {link['latency_us']}",
        f"  bandwidth_gbps: {link['bandwidth_gbps']}",
        f"host_copy_gbps: {hbm:.3f}",
        f"host_adam_gparams_per_s: {1e-9 / adam_s:.4f}   # torch's foreach AdamW, measured",
        f"optimizer_ns_per_param: {adam_s * 1e9:.4f}   # the same AdamW step on the device (here: this CPU)",
        f"grad_norm_ns_per_param: {norm_s * 1e9:.4f}   # moetrain's gradient clipping (float64 norm + scaling)",
        f"shared_node_slowdown: {slowdown:.3f}   # compute when every core runs a rank / one rank alone",
        f"shared_node_memory_slowdown: {memory_slowdown:.3f}   # the same for memory-bound work (AdamW)",
        "host_overhead_us:                # moetrain's own host time per micro-batch (fwd + bwd), tiny shapes",
        f"  dense_block: {host['dense_block'] * 1e6:.1f}",
        f"  moe_block: {host['moe_block'] * 1e6:.1f}",
        f"  model: {host['model'] * 1e6:.1f}",
        f"  step: {step_overhead * 1e6:.1f}",
        "source: measured",
    ]
    text = "\n".join(lines) + "\n"
    factor = _elementwise_factor(text, rank["blocks"])
    text = text.replace("source: measured", f"elementwise_factor: {factor:.3f}   # per-block elementwise passes, "
                                            "fitted on a dense reference model\nsource: measured")
    per_element = _route_residual(text, *rank["route"])
    return text.replace("source: measured", f"moe_route_ns_per_element: {per_element * 1e9:.4f}   "
                                            "# MoE routing beyond the model above, per routed row x d_model\n"
                                            "source: measured")


def _hardware_from(text: str):
    import tempfile

    from moetrain.plan.hardware import load_hardware

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(text)
        fh.flush()
        return load_hardware(fh.name)


def _elementwise_factor(text: str, measured: float) -> float:
    """How many times the modeled per-block elementwise traffic the dense reference model :data:`_BLOCKS`
    needs for its forward + backward to take the ``measured`` seconds (at least 1): norms, RoPE, activation
    functions, residual adds and their backward run as many small passes, each slower than a streaming copy."""
    from moetrain import load_config
    from moetrain.models.spec import get_model_spec
    from moetrain.plan.timing import chunk_cost

    hw = _hardware_from(text)
    cfg = load_config(None, _BLOCKS)
    c = chunk_cost(cfg, get_model_spec(cfg), hw, range(cfg.model.layers), pre=True, post=True, stage=0)
    f, bi, bw = c.by_part.get("elementwise", (0.0, 0.0, 0.0))
    modeled = f + bi + bw
    if modeled <= 0:
        return 1.0
    return max(1.0, 1.0 + (measured - (c.forward + c.backward)) / modeled)


def _route_residual(text: str, t_moe: float, t_dense: float) -> float:
    """Seconds per routed row-element that the planner, with this hardware file, misses on the MoE model of
    :func:`_routing_cost` relative to its dense twin (0 when it misses nothing)."""
    from moetrain import load_config
    from moetrain.models.spec import get_model_spec
    from moetrain.plan.timing import chunk_cost

    hw = _hardware_from(text)
    predicted = []
    for extra in (_ROUTE_MOE, _ROUTE_DENSE):
        cfg = load_config(None, _ROUTE + extra)
        c = chunk_cost(cfg, get_model_spec(cfg), hw, range(cfg.model.layers), pre=True, post=True, stage=0)
        predicted.append(c.forward + c.backward)
    cfg = load_config(None, _ROUTE + _ROUTE_MOE)
    elements = cfg.model.layers * cfg.model.seq_len * cfg.train.micro_batch_size * cfg.moe.topk * cfg.model.d_model
    missed = (t_moe - t_dense) - (predicted[0] - predicted[1])
    return max(missed, 0.0) / elements
