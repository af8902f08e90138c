"""The CUDA kernels' algorithms, step by step in PyTorch on CPU, against float64 references.

Each emulation follows its kernel's algorithm with the kernel's own constants, read from the .cu source (so a
tile size or constant changed there changes the emulation too): the flash-attention forward (BR x BC tiles,
log2-domain online softmax, P rounded to the storage dtype before P V, the natural-log log-sum-exp) and
backward (P recomputed from that log-sum-exp, dS rounded before its products, dK / dV per key tile, dQ either
added per key tile in arrival order as the atomic path does or summed per query tile in a fixed order as the
deterministic kernel does), with GQA's head map, causal masks and ragged last tiles. The GPU tests check the
kernels against the same references; these check the algorithms without a GPU.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from moetrain.parallel.cuda_ext import CSRC
from moetrain.parallel.fused_attention import HEAD_DIMS, KERNEL_DTYPES, attention_ref

FLASH = (CSRC / "flash_attn.cu").read_text()


def _const(name: str, source: str = FLASH) -> float:
    m = re.search(rf"constexpr (?:int|float) {name} = ([0-9.]+)f?;", source)
    assert m, f"{name} not found in the kernel source"
    return float(m.group(1))


BR, BC = int(_const("BR")), int(_const("BC"))
LOG2E, LN2 = _const("kLog2e"), _const("kLn2")


def test_emulation_constants_are_the_kernels():
    assert (BR, BC) == (64, 64) and abs(LOG2E - 1 / math.log(2)) < 1e-9 and abs(LN2 - math.log(2)) < 1e-9
    dispatched = {int(d) for d in re.findall(r"D == (\d+)", FLASH.split('extern "C"')[1])}
    assert dispatched == set(HEAD_DIMS)  # the head dims the Python side offers are the ones the kernel has
    codes = {int(c) for c in re.findall(r"dtype == (\d)", FLASH.split('extern "C"')[1])}
    assert {{1: torch.float16, 2: torch.bfloat16}[c] for c in codes} == set(KERNEL_DTYPES)


# ------------------------------------------------------------------------------ the kernels' algorithms
def flash_forward(q, k, v, causal: bool):
    """flash_fwd_kernel: (o in q's dtype, lse fp32)."""
    B, H, T, D = q.shape
    Hkv, dt = k.shape[1], q.dtype
    scale_log2 = (1.0 / math.sqrt(D)) * LOG2E
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32)
    for b in range(B):
        for h in range(H):
            kvh = h // (H // Hkv)
            for q0 in range(0, T, BR):
                qi = torch.arange(q0, q0 + BR)
                Q = _tile(q[b, h], q0, BR)
                m = torch.full((BR,), -math.inf)
                l = torch.zeros(BR)
                acc = torch.zeros(BR, D)
                kv_end = min(T, q0 + BR) if causal else T
                for k0 in range(0, kv_end, BC):
                    K, V = _tile(k[b, kvh], k0, BC), _tile(v[b, kvh], k0, BC)
                    kj = torch.arange(k0, k0 + BC)
                    ok = (kj[None, :] < T) & (~torch.tensor(causal) | (kj[None, :] <= qi[:, None]))
                    sv = torch.where(ok, (Q @ K.t()) * scale_log2, torch.tensor(-math.inf))
                    m_new = torch.maximum(m, sv.max(dim=1).values)
                    m_use = torch.where(m_new == -math.inf, torch.zeros(()), m_new)
                    alpha = torch.exp2(m - m_use)
                    p = torch.exp2(sv - m_use[:, None])
                    l = l * alpha + p.sum(dim=1)  # fp32 sums: backward recomputes P from the lse
                    m = m_new
                    acc = acc * alpha[:, None] + p.to(dt).float() @ V  # P is rounded to the storage type
                rows = slice(q0, min(T, q0 + BR))
                n = rows.stop - rows.start
                inv = torch.where(l > 0, 1.0 / l, torch.zeros(()))
                o[b, h, rows] = (acc * inv[:, None])[:n].to(dt)
                lse[b, h, rows] = torch.where(l > 0, (m + torch.log2(l)) * LN2, torch.tensor(-math.inf))[:n]
    return o, lse


def flash_backward(q, k, v, o, lse, d_o, causal: bool, deterministic: bool):
    """flash_bwd_delta_kernel + flash_bwd_kernel (+ flash_bwd_dq_kernel when deterministic): (dq, dk, dv)."""
    B, H, T, D = q.shape
    Hkv, dt = k.shape[1], q.dtype
    group = H // Hkv
    scale = 1.0 / math.sqrt(D)
    scale_log2 = scale * LOG2E
    delta = (o.float() * d_o.float()).sum(-1)
    dq_acc = torch.zeros(B, H, T, D)
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def ds_tile(b, h, q0, k0):
        """(P rounded, dS rounded) of one query tile x key tile, exactly as both backward kernels form them."""
        qi, kj = torch.arange(q0, q0 + BR), torch.arange(k0, k0 + BC)
        Q, dO = _tile(q[b, h], q0, BR), _tile(d_o[b, h], q0, BR)
        K, V = _tile(k[b, h // group], k0, BC), _tile(v[b, h // group], k0, BC)
        row_lse = torch.where(qi < T, _pad(lse[b, h], q0, BR) * LOG2E, torch.tensor(math.inf))
        ok = (qi[:, None] < T) & (kj[None, :] < T) & (~torch.tensor(causal) | (kj[None, :] <= qi[:, None]))
        pv = torch.where(ok, torch.exp2((Q @ K.t()) * scale_log2 - row_lse[:, None]), torch.zeros(()))
        dp = dO @ V.t()
        ds = (pv * (dp - _pad(delta[b, h], q0, BR)[:, None])).to(dt)  # from the fp32 P, rounded once
        return pv.to(dt), ds, Q, dO, K

    for b in range(B):
        for kvh in range(Hkv):
            for k0 in range(0, T, BC):
                acc_dk, acc_dv = torch.zeros(BC, D), torch.zeros(BC, D)
                q_first = (k0 // BR) * BR if causal else 0
                for hq in range(group):
                    h = kvh * group + hq
                    for q0 in range(q_first, T, BR):
                        p, ds, Q, dO, K = ds_tile(b, h, q0, k0)
                        acc_dv += p.float().t() @ dO
                        acc_dk += ds.float().t() @ Q
                        if not deterministic:  # added to the fp32 buffer as each key tile's block gets there
                            rows = slice(q0, min(T, q0 + BR))
                            dq_acc[b, h, rows] += (scale * (ds.float() @ K))[: rows.stop - rows.start]
                rows = slice(k0, min(T, k0 + BC))
                n = rows.stop - rows.start
                dk[b, kvh, rows] = (scale * acc_dk)[:n].to(dt)
                dv[b, kvh, rows] = acc_dv[:n].to(dt)
    if not deterministic:
        return dq_acc.to(dt), dk, dv
    dq = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for q0 in range(0, T, BR):
                acc = torch.zeros(BR, D)
                k_end = min(q0 + BR, T) if causal else T
                for k0 in range(0, k_end, BC):  # the fixed order: every run sums the same way
                    _, ds, _, _, K = ds_tile(b, h, q0, k0)
                    acc += ds.float() @ K
                rows = slice(q0, min(T, q0 + BR))
                dq[b, h, rows] = (scale * acc)[: rows.stop - rows.start].to(dt)
    return dq, dk, dv


def _tile(x, r0: int, rows: int) -> torch.Tensor:
    """load_tile: rows [r0, r0 + rows) in fp32, zero past the end."""
    return _pad(x, r0, rows).float()


def _pad(x, r0: int, rows: int) -> torch.Tensor:
    out = x.new_zeros((rows, *x.shape[1:]))
    part = x[r0:r0 + rows]
    out[: part.shape[0]] = part
    return out


def _err(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-2))  # T=1: dQ is 0; rounding noise


# ------------------------------------------------------------------------------ against float64 references
CASES = [(1, 4, 4, 64), (63, 4, 2, 64), (65, 2, 1, 64), (130, 4, 2, 64), (70, 2, 2, 128)]  # T, H, Hkv, D


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,H,Hkv,D", CASES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flash_algorithm_equals_float64_reference(dtype, T, H, Hkv, D, causal):
    g = torch.Generator().manual_seed(T * D + H)
    q, k, v, d_o = (torch.randn(1, n, T, D, generator=g).to(dtype) for n in (H, Hkv, Hkv, H))
    o, lse = flash_forward(q, k, v, causal)
    dq, dk, dv = flash_backward(q, k, v, o, lse, d_o, causal, deterministic=False)
    dq_det, dk_det, dv_det = flash_backward(q, k, v, o, lse, d_o, causal, deterministic=True)

    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, lse_ref = attention_ref(qr, kr, vr, causal)
    o_ref.backward(d_o.double())
    # the same computation by torch in this dtype bounds what rounding to it costs
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o_t = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=Hkv != H)
    o_t.backward(d_o)
    eps = torch.finfo(dtype).eps
    bound = {"o": _err(o_t, o_ref), "dq": _err(qs.grad, qr.grad), "dk": _err(ks.grad, kr.grad),
             "dv": _err(vs.grad, vr.grad)}
    got = {"o": _err(o, o_ref), "dq": _err(dq, qr.grad), "dk": _err(dk, kr.grad), "dv": _err(dv, vr.grad),
           "dq_det": _err(dq_det, qr.grad)}
    for name, err in got.items():
        assert err <= 3 * bound[name.removesuffix("_det")] + 4 * eps, (name, err, bound)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)  # fp32 scores, no rounding
    # dK and dV do not depend on the dQ path; the two dQ sums differ only in their order: the GPU test's
    # tolerance (2 eps relative to the largest element) must hold between them
    assert torch.equal(dk, dk_det) and torch.equal(dv, dv_det)
    torch.testing.assert_close(dq.float(), dq_det.float(), rtol=2 * eps, atol=2 * eps * float(dq_det.abs().max()))


def test_a_row_that_sees_nothing_yet_stays_finite():
    """Causal, the first key tile of a late query tile: rows see keys (never an empty row), and the m_use = 0
    rule for an all-masked tile keeps alpha finite; the lse of a padded row is never written."""
    q, k, v = (torch.randn(1, 1, 66, 64).to(torch.bfloat16) for _ in range(3))
    o, lse = flash_forward(q, k, v, causal=True)
    assert torch.isfinite(o.float()).all() and torch.isfinite(lse).all()


# ------------------------------------------------------------------------------ rank-in-expert (moe_kernels.cu)
MOE = (CSRC / "moe_kernels.cu").read_text()
WARP, CHUNK = int(_const("kWarp", MOE)), int(_const("kChunk", MOE))


def _match_any(values: list[int]) -> list[int]:
    """``__match_any_sync(full mask, v)``: for each lane, the bit mask of lanes holding the same value."""
    return [sum(1 << j for j, w in enumerate(values) if w == v) for v in values]


def rank_in_expert_kernel(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, E: int, order: int):
    """rank_chunks_kernel (a warp per chunk of CHUNK visited assignments, 32 at a time, ranks by
    __match_any_sync and a per-expert counter), scan_chunks_kernel, add_offsets_kernel."""
    T, K = expert_TK.shape
    e_flat, n = expert_TK.reshape(-1).tolist(), T * K
    keep = None if keep_TK is None else keep_TK.reshape(-1).tolist()
    rank = [0] * n
    chunks = max((n + CHUNK - 1) // CHUNK, 1)
    chunk_counts = [[0] * E for _ in range(chunks)]

    def visit(i: int) -> int:
        return i if order == 0 else (i % T) * K + i // T

    for c in range(chunks):
        counter = [0] * E
        begin = c * CHUNK
        for base in range(begin, min(begin + CHUNK, n), WARP):
            lanes = []
            for lane in range(WARP):
                i = base + lane
                valid = i < n and i < begin + CHUNK
                a = visit(i) if valid else 0
                ranked = valid and (keep is None or bool(keep[a]))
                e = e_flat[a] if ranked else -1 - lane
                if ranked and not 0 <= e < E:
                    ranked, e = False, -1 - lane
                lanes.append((valid, a, ranked, e))
            peers = _match_any([e for _, _, _, e in lanes])
            starts = {}
            for lane, (_, _, ranked, e) in enumerate(lanes):
                leader = (peers[lane] & -peers[lane]).bit_length() - 1
                if ranked and lane == leader:
                    starts[e] = counter[e]
            for lane, (valid, a, ranked, e) in enumerate(lanes):
                before = bin(peers[lane] & ((1 << lane) - 1)).count("1")
                if ranked:
                    rank[a] = starts[e] + before
                elif valid:
                    rank[a] = -1
            for lane, (_, _, ranked, e) in enumerate(lanes):
                if ranked and lane == (peers[lane] & -peers[lane]).bit_length() - 1:
                    counter[e] = starts[e] + bin(peers[lane]).count("1")
        chunk_counts[c] = counter
    total = [0] * E
    for e in range(E):  # exclusive scan of each expert's chunk counts
        run = 0
        for c in range(chunks):
            chunk_counts[c][e], run = run, run + chunk_counts[c][e]
        total[e] = run
    for i in range(n):
        a = visit(i)
        if rank[a] >= 0:
            rank[a] += chunk_counts[i // CHUNK][e_flat[a]]
    return torch.tensor(rank, dtype=torch.int32).view(T, K), torch.tensor(total, dtype=torch.int32)


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (33, 5, 2), (700, 16, 3), (1500, 64, 1)])
@pytest.mark.parametrize("order", [0, 1])
def test_rank_in_expert_algorithm_equals_the_reference(T, E, K, order):
    """Chunks of CHUNK assignments across warps of WARP lanes (T*K up to 2 chunks), with dropped assignments
    and ids outside [0, E) (never ranked, as the kernel guards its shared counters)."""
    from moetrain.moe.kernels import rank_in_expert_ref

    g = torch.Generator().manual_seed(T + E + K)
    expert = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    expert[torch.rand(T, K, generator=g) < 0.02] = E + 3  # out of range
    keep = torch.rand(T, K, generator=g) < 0.85
    for kp in (None, keep):
        got = rank_in_expert_kernel(expert, kp, E, order)
        want = rank_in_expert_ref(expert, kp, E, order)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
