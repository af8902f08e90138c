"""csrc kernels: plain-nvcc compile check (CPU), the torch reference contracts against the MoE layer's
own ops (CPU), and kernel == reference (GPU, skipped without CUDA)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moetrain.moe.kernels import (
    CSRC,
    combine_rows_ref,
    pack_rows_ref,
    positions_ref,
    rank_in_expert_ref,
    route_topk_ref,
)
from moetrain.moe.routers import capacity_keep


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["compute_90a,code=sm_90a", "compute_80,code=sm_80"], ids=["hopper", "ampere"])
def test_kernels_compile_with_plain_nvcc(tmp_path, arch):
    """Every kernel compiles with the flags its extension is built with, and ptxas reports no register spills in
    any of them (nor any local memory in the attention kernels, whose fragments must all live in registers)."""
    from moetrain.moe.kernels import _EXT as moe_ext
    from moetrain.parallel.fused_attention import _EXT as attn_ext

    fast_math = {src: ext.fast_math for ext in (moe_ext, attn_ext) for src in ext.sources}  # as they are built
    for cu in sorted(CSRC.glob("*.cu")):
        flags = ["-O3", "-std=c++17"] + (["--use_fast_math"] if fast_math[cu.name] else [])
        out = subprocess.run(["nvcc", f"-gencode=arch={arch}", *flags, "-Xptxas", "-v", "-c", str(cu),
                              "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cu.name}:\n{out.stderr[-4000:]}"
        assert (tmp_path / "k.o").stat().st_size > 10_000
        usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
        assert len(usage) >= 10, out.stderr[-2000:]  # one line per kernel instantiation
        assert all(st == "0" and ld == "0" for _, st, ld in usage), f"{cu.name} spills:\n{out.stderr}"
        if cu.name == "flash_attn.cu":
            assert all(frame == "0" for frame, _, _ in usage), f"{cu.name} uses local memory:\n{out.stderr}"


# the CUDA library headers torch's CUDA headers include, which a CPU machine's toolkit may lack: only their
# handle and status types are needed to type-check the bindings
_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
                  "const char* cusparseGetErrorString(cusparseStatus_t);\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                   "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nvcc") is None, reason="g++ / CUDA headers missing")
def test_bindings_type_check_against_torch_headers(tmp_path):
    """The torch bindings (csrc/*.cpp: argument checks included) compile against this torch's headers; the
    CUDA library headers they pull in are stubbed where this machine's toolkit lacks them."""
    import os
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    nvcc_home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", nvcc_home]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip("no CUDA toolkit headers found (CUDA_HOME, /usr/local/cuda)")
    cuda_include = found[0]
    for name, text in _STUBS.items():
        if not (cuda_include / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("#pragma once\n" + text)
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path}",
                                                   f"-I{cuda_include}", "-DTORCH_EXTENSION_NAME=moetrain_check"]
    # one compiler per binding file, side by side (each takes ~20 s of a core)
    procs = {cpp: subprocess.Popen(["g++", "-std=c++17", "-fsyntax-only", *flags, str(cpp)], text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for cpp in sorted(CSRC.glob("*.cpp"))}
    assert procs
    for cpp, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{cpp.name}:\n{err[-4000:]}"


def test_argument_contract_names_the_problem():
    """The checks the bindings make (device, dtype, shapes, the experts' shared memory), stated once in
    moe/kernels.py and run by the references too, so they are tested here on CPU."""
    from moetrain.moe.kernels import (
        KernelArgumentError,
        check_rank_args,
        combine_rows_ref,
        pack_rows_ref,
        rank_in_expert_ref,
    )

    logits = torch.randn(8, 4)
    with pytest.raises(KernelArgumentError, match=r"route_topk: k=5 must be in \[1, E=4\]"):
        route_topk_ref(logits, None, 5, False, True)
    with pytest.raises(KernelArgumentError, match="bias must be"):
        route_topk_ref(logits, torch.zeros(3), 2, False, True)
    with pytest.raises(KernelArgumentError, match="must be \\[T, E\\]"):
        route_topk_ref(torch.randn(8), None, 1, False, True)
    with pytest.raises(KernelArgumentError, match="must be integers"):
        rank_in_expert_ref(torch.zeros(8, 2), None, 4, 0)
    with pytest.raises(KernelArgumentError, match="order=2"):
        rank_in_expert_ref(torch.zeros(8, 2, dtype=torch.int32), None, 4, 2)
    with pytest.raises(KernelArgumentError, match="keep"):
        rank_in_expert_ref(torch.zeros(8, 2, dtype=torch.int32), torch.ones(8, 3, dtype=torch.bool), 4, 0)
    with pytest.raises(KernelArgumentError, match="20000 experts need 80000 bytes of shared memory"):
        check_rank_args(torch.zeros(8, 2, dtype=torch.int32), None, 20000, 0, shared_bytes_limit=48 * 1024)
    with pytest.raises(KernelArgumentError, match="positions must be int32"):
        pack_rows_ref(torch.randn(8, 4), torch.zeros(8, 2, dtype=torch.int64), 16)
    with pytest.raises(KernelArgumentError, match="gates"):
        combine_rows_ref(torch.randn(16, 4), torch.zeros(8, 2, dtype=torch.int32), torch.ones(8, 3))
    with pytest.raises(KernelArgumentError, match="different devices"):
        pack_rows_ref(torch.randn(8, 4), torch.zeros(8, 2, dtype=torch.int32, device="meta"), 16)


def test_nan_logits_route_to_valid_experts_on_the_torch_path():
    """A NaN logit makes its token's scores NaN: its keys rank below every real score (the lowest ids win,
    as the kernel does), every chosen id stays in [0, E), positions and packing stay in bounds, and only that
    token's output is not finite."""
    from moetrain.moe.kernels import combine_rows, pack_rows, positions, select_experts

    T, E, K, D = 12, 6, 2, 8
    logits = torch.randn(T, E)
    logits[3, 2] = float("nan")
    logits[7] = float("nan")
    for sigmoid in (False, True):
        expert = select_experts(logits, None, K, sigmoid)
        assert int(expert.min()) >= 0 and int(expert.max()) < E
        if not sigmoid:  # softmax spreads the NaN over the whole row: the lowest ids
            assert expert[3].tolist() == [0, 1] and expert[7].tolist() == [0, 1]
        else:  # sigmoid keeps it in one column: that expert is never chosen for token 3
            assert 2 not in expert[3].tolist()
        pos, counts = positions(expert, None, E)
        assert int(counts.sum()) == T * K and int(pos.max()) < T * K and int(pos.min()) >= 0
        x = torch.randn(T, D)
        rows = pack_rows(x, pos, int(counts.sum()))
        gates = route_topk_ref(logits, None, K, sigmoid, True)[1]
        y = combine_rows(rows, pos, gates.to(rows.dtype))
        finite = torch.isfinite(y).all(dim=1)
        assert not finite[7] and finite[[t for t in range(T) if t not in (3, 7)]].all()


def _routing(T=300, E=16, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    expert, gate, psum = route_topk_ref(logits, None, K, sigmoid=False, renormalize=True)
    return logits, expert, gate, psum


def test_reference_routing_equals_topk_router_math():
    logits, expert, gate, psum = _routing()
    prob = logits.softmax(-1)
    top_p, top_e = prob.topk(4, dim=-1)
    assert torch.equal(expert.long(), top_e)
    torch.testing.assert_close(gate, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(psum, prob.sum(0))
    # ties go to the lower expert id; the selection bias changes the choice, not the gate values
    tied = torch.zeros(2, 8)
    assert route_topk_ref(tied, None, 3, False, False)[0].tolist() == [[0, 1, 2], [0, 1, 2]]
    bias = torch.zeros(8)
    bias[5] = 1.0
    e, g, _ = route_topk_ref(tied, bias, 1, sigmoid=True, renormalize=False)
    assert e.tolist() == [[5], [5]] and torch.allclose(g, torch.full((2, 1), 0.5))


def test_reference_ranks_reproduce_position_capacity_and_the_expert_sort():
    logits, expert, gate, _ = _routing(T=257, E=8, K=2, seed=1)
    cap = 40
    rank_cm, total = rank_in_expert_ref(expert, None, 8, order=1)
    keep = rank_cm < cap
    assert torch.equal(keep, capacity_keep(expert.long(), gate, cap, "position"))
    assert torch.equal(total.long(), torch.bincount(expert.reshape(-1).long(), minlength=8))
    pos, counts = positions_ref(expert, keep, 8)
    # the expert stage sorts the kept assignments (token-major) by expert, stably
    expert_A = expert[keep].long()
    perm = torch.argsort(expert_A, stable=True)
    slot = torch.empty_like(perm)
    slot[perm] = torch.arange(perm.numel())
    assert torch.equal(pos[keep].long(), slot) and torch.equal(counts.long(), torch.bincount(expert_A, minlength=8))
    assert bool((pos[~keep] == -1).all())


def test_reference_pack_and_combine_equal_gather_and_weighted_sum():
    logits, expert, gate, _ = _routing(T=65, E=8, K=2, seed=2)
    keep = rank_in_expert_ref(expert, None, 8, order=1)[0] < 12
    pos, counts = positions_ref(expert, keep, 8)
    x = torch.randn(65, 37, dtype=torch.float64)
    rows = pack_rows_ref(x, pos, int(counts.sum()))
    token_A = torch.arange(65).unsqueeze(1).expand(65, 2)[keep]
    perm = torch.argsort(expert[keep].long(), stable=True)
    assert torch.equal(rows, x[token_A][perm])
    y = combine_rows_ref(rows, pos, gate.double())
    want = torch.zeros(65, 37, dtype=torch.float64).index_add(0, token_A, x[token_A] * gate.double()[keep].unsqueeze(1))
    torch.testing.assert_close(y, want)


# ------------------------------------------------------------------ GPU: kernels == reference
@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,D,dtype", [(4097, 64, 8, 1000, torch.bfloat16), (64 * 1024, 256, 8, 128, torch.float16),
                                           (1000, 8, 1, 77, torch.float32), (513, 128, 2, 4096, torch.bfloat16)])
def test_kernels_equal_reference_on_gpu(T, E, K, D, dtype):
    from moetrain.moe.kernels import load

    ext = load()
    assert ext is not None, "CUDA present but the kernels did not build"
    g = torch.Generator(device="cuda").manual_seed(T + E)
    logits = torch.randn(T, E, device="cuda", generator=g).to(dtype)
    for sigmoid, bias in ((False, None), (True, torch.randn(E, device="cuda", generator=g) * 0.1)):
        e, gt, ps = ext.route_topk(logits, bias, K, sigmoid, True)
        re, rg, rps = route_topk_ref(logits, bias, K, sigmoid, True)
        # the same experts, except where two keys tie to float rounding (then the same key values)
        scores = logits.float().sigmoid() if sigmoid else logits.float().softmax(-1)
        key = scores if bias is None else scores + bias
        differ = (e != re).any(1)
        assert float(differ.float().mean()) < 1e-3, f"{int(differ.sum())} tokens chose other experts"
        torch.testing.assert_close(key.gather(1, e.long()), key.gather(1, re.long()), rtol=1e-6, atol=1e-7)
        gt, rg = gt[~differ], rg[~differ]
        torch.testing.assert_close(gt, rg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ps, rps, rtol=1e-4, atol=1e-3)
    for order in (0, 1):
        keep = torch.rand(T, K, device="cuda", generator=g) < 0.8
        r, tot = ext.rank_in_expert(e, keep, E, order)
        rr, rtot = rank_in_expert_ref(e, keep, E, order)
        assert torch.equal(r, rr) and torch.equal(tot, rtot)
    pos, counts = positions_ref(e, keep, E)
    x = torch.randn(T, D, device="cuda", generator=g).to(dtype).requires_grad_()
    rows = ext.pack_rows(x.detach(), pos, int(counts.sum()))
    assert torch.equal(rows, pack_rows_ref(x.detach(), pos, int(counts.sum())))
    y = ext.combine_rows(rows, pos, gt)
    torch.testing.assert_close(y.float(), combine_rows_ref(rows, pos, gt).float(), rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(y)
    d_rows, d_gate = ext.combine_rows_backward(dy, rows, pos, gt)
    rows_ref = rows.detach().float().requires_grad_()
    gate_ref = gt.detach().requires_grad_()
    combine_rows_ref(rows_ref, pos, gate_ref).backward(dy.float())
    torch.testing.assert_close(d_rows.float(), rows_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d_gate, gate_ref.grad, rtol=2e-2, atol=2e-2)
    dx = ext.pack_rows_backward(rows, pos, T)
    x_ref = x.detach().float().requires_grad_()
    pack_rows_ref(x_ref, pos, int(counts.sum())).backward(rows.float())
    torch.testing.assert_close(dx.float(), x_ref.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- the fused stages in the MoE layer (CPU: reference ops)
def test_pack_and_combine_autograd_pass_gradcheck():
    from moetrain.moe.kernels import combine_rows, pack_rows

    g = torch.Generator().manual_seed(5)
    expert = torch.randint(0, 4, (7, 2), generator=g).to(torch.int32)
    expert[:, 1] = (expert[:, 0] + 1) % 4  # k distinct experts per token
    keep = torch.rand(7, 2, generator=g) < 0.7
    pos, counts = positions_ref(expert, keep, 4)
    rows = int(counts.sum())
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(rows, 5, dtype=torch.float64, generator=g, requires_grad=True)
    gate = torch.rand(7, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pack_rows(t, pos, rows), (x,))
    assert torch.autograd.gradcheck(lambda a, b: combine_rows(a, pos, b), (r, gate))


def test_cuda_kernels_refused_without_a_device_and_auto_falls_back():
    from moetrain.config import ConfigError, load_config
    from moetrain.moe.kernels import KernelError, require

    with pytest.raises(ConfigError, match="cluster.device=cuda"):
        load_config(None, ["moe.num_experts=4", "moe.kernels=cuda"])
    assert load_config(None, ["moe.num_experts=4"]).moe.kernels == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(KernelError, match="no CUDA device.*moe.kernels=auto"):
            require()


ROUTERS_SPARSE = ["topk", "switch", "gshard", "sigmoid", "xmoe", "expert_choice"]


@pytest.mark.parametrize("capacity_factor,policy", [(None, "probs"), (1.0, "probs"), (0.75, "position")])
def test_fused_stages_equal_torch_stages_for_every_router(capacity_factor, policy):
    from moetrain.config import MoEConfig
    from moetrain.moe.layer import FusedInverseOrder, FusedOrder, MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    for router in ROUTERS_SPARSE:
        outs = []
        for kern in ("torch", "fused"):
            args = MoEConfig(num_experts=8, topk=1 if router == "switch" else 3, d_expert=12, router=router,
                             capacity_factor=capacity_factor, drop_policy=policy, aux_loss_coef=0.1, z_loss_coef=0.01,
                             n_groups=1)
            layer = MoELayer(args, 0, MoEGroups(), d_model=16, sp=False, dtype=torch.float64,
                             runtime=MoERuntime(fused=kern == "fused"))
            fused = kern == "fused"
            assert isinstance(layer.order, FusedOrder) == isinstance(layer.unorder, FusedInverseOrder) == fused
            x = torch.randn(6, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                            requires_grad=True)
            y = layer(x)
            y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
            outs.append((y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
        (y0, gx0, gp0), (y1, gx1, gp1) = outs
        torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12, msg=router)
        torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12, msg=router)
        assert gp0.keys() == gp1.keys() and any("router" in n for n in gp0), router
        for n in gp0:
            torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-11, atol=1e-12, msg=f"{router} {n}")


def _fused_layer_case(router, forced, k, cf, dispatch):
    from tests.test_moe_dispatch import _layer_case

    return _layer_case(router, forced, k, cf, dispatch, kernels="fused")


def test_fused_stages_under_expert_parallelism_and_degenerate_routings(ranks):
    pool = ranks(4, 2)
    cases = [(r, None, 2, None, "flat") for r in ROUTERS_SPARSE] + [
        ("topk", "all_to_one", 1, None, "hier2d"), ("topk", "empty_rank", 1, None, "hier1d"),
        ("topk", None, 8, 0.25, "flat")]
    for case in cases:
        for rank, ok in enumerate(pool.run(_fused_layer_case, *case)):
            assert all(ok.values()), (case, rank, {n: v for n, v in ok.items() if not v})


def _train_fused(overrides: list[str]) -> dict | None:
    """The whole trainer with the layer's fused stages on CPU (reference ops), counting packing calls."""
    from moetrain.launch import trainer as trainer_mod
    from moetrain.moe import kernels
    from tests.test_model_parallel import _train

    calls = {"pack": 0}
    pack, choose = kernels.pack_rows, trainer_mod.kernels.use_fused

    def counting_pack(*a):
        calls["pack"] += 1
        return pack(*a)

    kernels.pack_rows, trainer_mod.kernels.use_fused = counting_pack, lambda choice, device: True
    try:
        out = _train(overrides)
    finally:
        kernels.pack_rows, trainer_mod.kernels.use_fused = pack, choose
    return out if out is None else {**out, "pack_calls": calls["pack"]}


def test_fused_stages_in_the_whole_model_under_tp_sp_ep_capacity_and_wtacrs(ranks):
    from tests.test_model_parallel import _compare
    from tests.test_moe_model import MOE, POOL, _layout, _reference

    extra = ("moe.capacity_factor=1.0", "moe.drop_policy=position", "wtacrs.enabled=true", "wtacrs.keep_ratio=0.3",
             "wtacrs.min_rows=2", "wtacrs.layers=[mlp_up,mlp_down]")
    got = ranks(*POOL[8]).run(_train_fused, _layout(2, 4, 4, True) + MOE + list(extra))[0]
    assert got.pop("pack_calls") > 0
    _compare(got, _reference(extra))


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["topk", "sigmoid", "expert_choice"])
def test_fused_layer_equals_torch_layer_on_gpu(router):
    """The layer with the csrc kernels (fp32 on CUDA) against its torch stages: output and every gradient."""
    from moetrain.config import MoEConfig
    from moetrain.moe.kernels import load
    from moetrain.moe.layer import MoEGroups, MoELayer
    from moetrain.moe.runtime import MoERuntime

    assert load() is not None, "CUDA present but the kernels did not build"
    outs = []
    for kern in ("torch", "fused"):
        args = MoEConfig(num_experts=64, topk=8, d_expert=128, router=router, capacity_factor=1.25, aux_loss_coef=0.01)
        layer = MoELayer(args, 0, MoEGroups(), d_model=256, sp=False, dtype=torch.float32,
                         runtime=MoERuntime(fused=kern == "fused")).cuda()
        x = torch.randn(512, 4, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3),
                        requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------- the first-use self-check (CPU: stand-in extensions)
def _reference_ext(**broken):
    from types import SimpleNamespace

    from moetrain.moe.kernels import combine_rows_backward_ref, pack_rows_backward_ref

    ops = dict(route_topk=route_topk_ref, rank_in_expert=rank_in_expert_ref, pack_rows=pack_rows_ref,
               pack_rows_backward=pack_rows_backward_ref, combine_rows=combine_rows_ref,
               combine_rows_backward=combine_rows_backward_ref)
    ops.update(broken)
    return SimpleNamespace(**ops)


def test_self_check_passes_the_contract_and_names_the_first_broken_kernel():
    from moetrain.moe.kernels import self_check

    assert self_check(_reference_ext(), "cpu") is None

    def swapped_rows(x, pos, rows):
        out = pack_rows_ref(x, pos, rows)
        return out[torch.arange(rows).roll(1)]

    def ties_to_higher_id(logits, bias, k, sigmoid, renorm):
        e, g, s = route_topk_ref(logits, bias, k, sigmoid, renorm)
        return e.flip(1), g.flip(1), s  # same set, other order: positions would differ

    def off_by_one_rank(e, keep, E, order):
        r, t = rank_in_expert_ref(e, keep, E, order)
        return torch.where(r >= 0, r + 1, r), t

    assert self_check(_reference_ext(pack_rows=swapped_rows), "cpu") == "pack_rows (torch.float32)"
    assert self_check(_reference_ext(route_topk=ties_to_higher_id), "cpu").startswith("route_topk")
    assert self_check(_reference_ext(rank_in_expert=off_by_one_rank), "cpu").startswith("rank_in_expert")

    # a kernel broken in one dtype only (a bad instantiation) is caught: every dtype the kernels take is checked
    def fp16_combine_wrong(rows, pos, gate):
        y = combine_rows_ref(rows, pos, gate)
        return y * 1.5 if rows.dtype == torch.float16 else y

    def fp16_route_wrong(logits, bias, k, sigmoid, renorm):
        e, g, s = route_topk_ref(logits, bias, k, sigmoid, renorm)
        return (e.flip(1) if logits.dtype == torch.float16 else e), g, s

    assert self_check(_reference_ext(combine_rows=fp16_combine_wrong), "cpu") == "combine_rows (torch.float16)"
    assert self_check(_reference_ext(route_topk=fp16_route_wrong), "cpu") == \
        "route_topk (torch.float16, sigmoid=False)"


def test_a_failed_self_check_keeps_the_torch_path_and_says_why(monkeypatch, caplog):
    import logging

    import torch.utils.cpp_extension as cpp

    from moetrain.moe.kernels import self_check
    from moetrain.parallel.cuda_ext import Extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    broken = _reference_ext(combine_rows=lambda rows, pos, gate: 2 * combine_rows_ref(rows, pos, gate))
    monkeypatch.setattr(cpp, "load", lambda **kw: broken)
    ext = Extension("stand_in", ["x.cu"], check=lambda module, device: self_check(module, "cpu"))
    with caplog.at_level(logging.WARNING, logger="moetrain.kernels"):
        assert ext.get() is None and ext.get() is None
    assert ext.reason == "self-check failed: combine_rows (torch.float32)"
    assert sum("self-check failed" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(cpp, "load", lambda **kw: _reference_ext())
    good = Extension("stand_in_ok", ["x.cu"], check=lambda module, device: self_check(module, "cpu"))
    assert good.get() is not None and good.reason is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """``make gpu-check``'s script: without a CUDA device, exit 2 with one line saying so, nothing built."""
    import sys

    out = tmp_path / "gpu_check.md"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr and not out.exists()


def test_gpu_check_names_what_it_cannot_install(monkeypatch, tmp_path):
    """The GPU machines reach no registry: a module the checks need, missing with no wheels carried, is named
    with the way to carry it (and nothing is installed)."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "NEEDED", {"yaml": "pyyaml", "no_such_module_xyz": "no-such-package"})
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / ".gpu_wheels")
    lines, why = gpu_check.prepare()
    assert lines == [] and "no-such-package" in why and "make gpu-wheels" in why and "pyyaml" not in why
