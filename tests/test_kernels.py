"""csrc kernels: plain-nvcc compile check (CPU), the torch reference contracts against the MoE layer's
own ops (CPU), and kernel == reference (GPU, skipped without CUDA)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from moe.kernels import CSRC, combine_rows_ref, pack_rows_ref, positions_ref, rank_in_expert_ref, route_topk_ref
from moe.routers import capacity_keep


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_with_plain_nvcc_for_hopper(tmp_path):
    for cu in sorted(CSRC.glob("*.cu")):
        out = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "k.o")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cu.name}:\n{out.stderr[-4000:]}"
        assert (tmp_path / "k.o").stat().st_size > 10_000


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
    from moe.kernels import load

    ext = load()
    assert ext is not None, "CUDA present but the kernels did not build"
    g = torch.Generator(device="cuda").manual_seed(T + E)
    logits = torch.randn(T, E, device="cuda", generator=g).to(dtype)
    for sigmoid, bias in ((False, None), (True, torch.randn(E, device="cuda", generator=g) * 0.1)):
        e, gt, ps = ext.route_topk(logits, bias, K, sigmoid, True)
        re, rg, rps = route_topk_ref(logits, bias, K, sigmoid, True)
        assert torch.equal(e, re)
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
