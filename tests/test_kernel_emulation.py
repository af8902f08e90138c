"""The CUDA kernels' algorithms, step by step in PyTorch on CPU, against float64 references.

Each emulation follows its kernel's algorithm with the kernel's own constants, read from the .cu source (so a
tile size or constant changed there changes the emulation too): the flash-attention forward (BR x BC tiles,
log2-domain online softmax, P rounded to the storage dtype before P V, the natural-log log-sum-exp) and
backward (P recomputed from that log-sum-exp, dS rounded before its products, dK / dV per key tile, dQ either
added per key tile in arrival order as the atomic path does or summed per query tile in a fixed order as the
deterministic kernel does; dK / dV per query head, summed per kv group in head order), with GQA's head map,
causal masks and ragged last tiles. Below that, the attention kernels' tile products are emulated lane by lane:
ldmatrix and mma.sync m16n8k16 after the PTX ISA's fragment layouts, driven by the kernel's own lane maps (parsed
from flash_attn.cu), on padded shared-memory tiles whose padding is NaN. The GPU tests check the kernels against
the same references; these check the algorithms without a GPU.
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
    """flash_bwd_delta_kernel + flash_bwd_kernel (+ flash_bwd_reduce_kernel with GQA, + flash_bwd_dq_kernel when
    deterministic): (dq, dk, dv)."""
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
                part_dk, part_dv = torch.zeros(group, BC, D), torch.zeros(group, BC, D)
                q_first = (k0 // BR) * BR if causal else 0
                for hq in range(group):  # one block per (key tile, query head)
                    h = kvh * group + hq
                    for q0 in range(q_first, T, BR):
                        p, ds, Q, dO, K = ds_tile(b, h, q0, k0)
                        part_dv[hq] += p.float().t() @ dO
                        part_dk[hq] += ds.float().t() @ Q
                        if not deterministic:  # added to the fp32 buffer as each key tile's block gets there
                            rows = slice(q0, min(T, q0 + BR))
                            dq_acc[b, h, rows] += (scale * (ds.float() @ K))[: rows.stop - rows.start]
                acc_dk, acc_dv = part_dk[0].clone(), part_dv[0].clone()
                for hq in range(1, group):  # flash_bwd_reduce_kernel: the group's fp32 partials in head order
                    acc_dk += part_dk[hq]
                    acc_dv += part_dv[hq]
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


# ------------------------------------------------------------------------------ mma.sync fragments, lane by lane
# The PTX ISA's layouts of mma.m16n8k16 (16-bit A and B, fp32 C) and of ldmatrix, written here from the ISA and
# not from the kernel; the kernel's lane maps (lm_*, c_row, c_col) are read from flash_attn.cu and must produce
# them. g = lane / 4, t = lane % 4; a register holds two 16-bit values ("half" 0 is the low one).
KPAD, KWARPS, KSTAGES = int(_const("kPad")), int(_const("kWarps")), int(_const("kStages"))


def _lane_map(name: str):
    m = re.search(rf"int {name}\(int lane(, int i)?\) {{ return ([^;]+); }}", FLASH)
    assert m, f"{name} not found in the kernel source"
    expr = m.group(2)
    # names, numbers, parentheses, *, +, >> and &: C and Python rank these four operators alike
    assert re.fullmatch(r"[\w\s()&>*+]+", expr), expr
    return eval(f"lambda lane, i=0: {expr}")  # noqa: S307 - the kernel's own expression


LM = {n: _lane_map(n) for n in ("lm_a_row", "lm_a_col", "lm_b_row", "lm_b_col", "lm_bt_row", "lm_bt_col",
                                  "c_row", "c_col")}
LANES = range(32)


def spec_a(lane, reg, half):  # A 16x16: (row, col)
    return lane // 4 + 8 * (reg & 1), 2 * (lane % 4) + half + 8 * (reg >> 1)


def spec_b(lane, reg, half):  # B 16x8: (k, n)
    return 2 * (lane % 4) + half + 8 * reg, lane // 4


def spec_c(lane, i):  # C 16x8: (row, col)
    return lane // 4 + 8 * (i >> 1), 2 * (lane % 4) + (i & 1)


def ldmatrix_x4(smem: torch.Tensor, addrs, trans: bool) -> torch.Tensor:
    """ldmatrix.sync.aligned.m8n8.x4[.trans].b16: lanes 8i..8i+7 give the rows of matrix i (8 elements from
    each address); lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix i (of its transpose with .trans)
    in register i. -> [32 lanes, 4 registers, 2 halves]."""
    out = torch.empty(32, 4, 2)
    for i in range(4):
        mat = torch.stack([smem[r, c:c + 8] for r, c in addrs[8 * i:8 * i + 8]])
        assert mat.shape == (8, 8)
        if trans:
            mat = mat.t()
        for lane in LANES:
            out[lane, i] = mat[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
    return out


def mma(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c [32, 4] += A B for a [32, 4, 2] and b [32, 2, 2] fragments (fp32 accumulate)."""
    A, B = torch.full((16, 16), math.nan), torch.full((16, 8), math.nan)
    for lane in LANES:
        for half in range(2):
            for reg in range(4):
                A[spec_a(lane, reg, half)] = a[lane, reg, half]
            for reg in range(2):
                B[spec_b(lane, reg, half)] = b[lane, reg, half]
    C = A @ B  # every element of both operands came from a register
    for lane in LANES:
        for i in range(4):
            c[lane, i] += C[spec_c(lane, i)]


# the kernel's device functions, with its lane maps
def load_a(smem, row0: int, kt: int):
    return [ldmatrix_x4(smem, [(row0 + LM["lm_a_row"](ln), kk * 16 + LM["lm_a_col"](ln)) for ln in LANES], False)
            for kk in range(kt)]


def mm_smemB_nk(acc, a_kk, smem_b, row0: int):
    """mm_regA_smemBnk / mm_smemA_smemBnk (the same fragments, loaded once or per k step): acc[NT] += A B, B's
    [n][k] rows at smem_b rows row0..."""
    for kk, a in enumerate(a_kk):
        for np_ in range(len(acc) // 2):
            b = ldmatrix_x4(smem_b, [(row0 + np_ * 16 + LM["lm_b_row"](ln), kk * 16 + LM["lm_b_col"](ln))
                                     for ln in LANES], False)
            mma(acc[2 * np_], a, b[:, 0:2])
            mma(acc[2 * np_ + 1], a, b[:, 2:4])


def mm_smemB_kn(acc, a, smem_b, row0: int, col0: int):
    """mm_regA_smemBkn: acc[NT] += A B, B's [k][n] rows at smem_b (row0, col0), transposed by ldmatrix."""
    for kk in range(len(a)):
        for np_ in range(len(acc) // 2):
            b = ldmatrix_x4(smem_b, [(row0 + kk * 16 + LM["lm_bt_row"](ln), col0 + np_ * 16 + LM["lm_bt_col"](ln))
                                     for ln in LANES], True)
            mma(acc[2 * np_], a[kk], b[:, 0:2])
            mma(acc[2 * np_ + 1], a[kk], b[:, 2:4])


def acc_to_a(c, dtype):
    """acc_to_a: two adjacent n8 accumulators, rounded to the 16-bit type, as one k16 A operand."""
    r = [torch.stack([c[2 * kk][:, 0:2], c[2 * kk][:, 2:4], c[2 * kk + 1][:, 0:2], c[2 * kk + 1][:, 2:4]], dim=1)
         for kk in range(len(c) // 2)]
    return [x.to(dtype).float() for x in r]


def dense(acc) -> torch.Tensor:
    """A warp's accumulators [NT][32, 4] as the 16 x 8NT tile, through the kernel's c_row / c_col."""
    out = torch.full((16, 8 * len(acc)), math.nan)
    for n, c in enumerate(acc):
        for lane in LANES:
            for i in range(4):
                out[LM["c_row"](lane, i), n * 8 + LM["c_col"](lane, i)] = c[lane, i]
    return out


def _smem(x: torch.Tensor, pad: int = KPAD) -> torch.Tensor:
    """A tile in shared memory: rows of x then kPad NaN columns (a kernel that read them would make NaN)."""
    return torch.cat([x.float(), torch.full((x.shape[0], pad), math.nan)], dim=1)


def _zeros(nt: int):
    return [torch.zeros(32, 4) for _ in range(nt)]


def test_kernel_lane_maps_give_the_ptx_fragments():
    for lane in LANES:
        for i in range(4):
            assert (LM["c_row"](lane, i), LM["c_col"](lane, i)) == spec_c(lane, i)
    tile = torch.arange(16 * 24, dtype=torch.float32).view(16, 24)  # every element distinct
    # A from row-major memory; B pairs from [n][k] memory; B pairs from [k][n] memory with .trans
    a = load_a(tile, 0, 1)[0]
    b_nk = ldmatrix_x4(tile, [(LM["lm_b_row"](ln), LM["lm_b_col"](ln)) for ln in LANES], False)
    b_kn = ldmatrix_x4(tile, [(LM["lm_bt_row"](ln), LM["lm_bt_col"](ln)) for ln in LANES], True)
    for lane in LANES:
        for half in range(2):
            for reg in range(4):
                assert a[lane, reg, half] == tile[spec_a(lane, reg, half)]
                k, n = spec_b(lane, reg % 2, half)
                assert b_nk[lane, reg, half] == tile[n + 8 * (reg // 2), k]  # register pair 2, 3: n tile 1
                assert b_kn[lane, reg, half] == tile[k, n + 8 * (reg // 2)]


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_ldmatrix_rows_of_the_padded_tiles_are_bank_conflict_free(D):
    """Each 8-lane phase of every ldmatrix the kernels issue reads 8 rows in 8 distinct 16-byte bank groups."""
    for ld in (D + KPAD, BC + KPAD):
        for name in ("a", "b", "bt"):
            rows, cols = LM[f"lm_{name}_row"], LM[f"lm_{name}_col"]
            for col0 in range(0, ld - KPAD, 16):
                addr = [2 * (rows(ln) * ld + col0 + cols(ln)) for ln in LANES]  # bytes
                assert all(a % 16 == 0 for a in addr)
                for ph in range(4):
                    assert len({(a // 16) % 8 for a in addr[8 * ph:8 * ph + 8]}) == 8, (ld, name, col0)


@pytest.mark.parametrize("dtype,D", [(KERNEL_DTYPES[0], HEAD_DIMS[0]), (KERNEL_DTYPES[1], HEAD_DIMS[1])],
                         ids=["bf16-64", "fp16-128"])  # both dtypes and both head dims (the lanes do not change)
def test_warp_products_lane_by_lane_equal_the_tile_products(dtype, D):
    """Every product of the three attention kernels, for each of the block's warps, through the emulated
    ldmatrix / mma and the kernel's lane maps, on padded shared-memory tiles: forward S = Q K^T and O = P V (P
    from the score registers), backward S^T = K Q^T, dV += P^T dO, dK += dS^T Q (in the kernel's query slices), the
    query-major dS in shared memory and dQ = dS K (64 columns at a time), deterministic dQ = dS K from
    registers."""
    g = torch.Generator().manual_seed(D)
    Q, K, V, dO = (torch.randn(64, D, generator=g).to(dtype).float() for _ in range(4))
    sQ, sK, sV, sdO = (_smem(x) for x in (Q, K, V, dO))
    wide, narrow = re.search(r"constexpr int QS = D > 64 \? (\d+) : (\d+);", FLASH).groups()
    QS = int(wide) if D > 64 else int(narrow)  # the backward kernel's query slice
    sdS = torch.full((BR, BC + KPAD), math.nan)

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)

    dS_full = torch.randn(BR, BC, generator=g)  # stands for dS^T's values, query-major
    for w in range(KWARPS):
        rows = slice(16 * w, 16 * w + 16)
        # forward
        qf = load_a(sQ, 16 * w, D // 16)
        s = _zeros(BC // 8)
        mm_smemB_nk(s, qf, sK, 0)
        close(dense(s), Q[rows] @ K.t())
        p = [torch.rand(32, 4, generator=g) for _ in range(BC // 8)]
        o = _zeros(D // 8)
        mm_smemB_kn(o, acc_to_a(p, dtype), sV, 0, 0)
        close(dense(o), dense(p).to(dtype).float() @ V)
        # backward (the warp owns key rows 16w..)
        dk, dv = _zeros(D // 8), _zeros(D // 8)
        for qs in range(0, BR, QS):
            st = _zeros(QS // 8)
            mm_smemB_nk(st, load_a(sK, 16 * w, D // 16), sQ, qs)
            close(dense(st), K[rows] @ Q[qs:qs + QS].t())
            pt = [torch.rand(32, 4, generator=g) for _ in range(QS // 8)]
            mm_smemB_kn(dv, acc_to_a(pt, dtype), sdO, qs, 0)
            dst = [torch.zeros(32, 4) for _ in range(QS // 8)]
            for n in range(QS // 8):  # the warp's dS^T values at the positions its registers hold
                for lane in LANES:
                    for i in range(4):
                        dst[n][lane, i] = dS_full[qs + n * 8 + LM["c_col"](lane, i), 16 * w + LM["c_row"](lane, i)]
            dsa = acc_to_a(dst, dtype)
            mm_smemB_kn(dk, dsa, sQ, qs, 0)
            for kk in range(QS // 16):  # the kernel's query-major store of dS (sdS16)
                for i in range(4):
                    for lane in LANES:
                        kr = 16 * w + LM["c_row"](lane, 2 * (i & 1))
                        qc = qs + kk * 16 + (i >> 1) * 8 + LM["c_col"](lane, 0)
                        sdS[qc, kr], sdS[qc + 1, kr] = dsa[kk][lane, i, 0], dsa[kk][lane, i, 1]
        close(dense(dk), dS_full[:, rows].t().to(dtype).float() @ Q)
    # dQ after every warp stored its keys' dS: a warp per 16 queries, 64 columns at a time
    torch.testing.assert_close(sdS[:, :BC], dS_full.to(dtype).float(), rtol=0, atol=0)
    for w in range(KWARPS):
        dsq = load_a(sdS, 16 * w, BC // 16)
        for c0 in range(0, D, 64):
            dq = _zeros(8)
            mm_smemB_kn(dq, dsq, sK, 0, c0)
            close(dense(dq), dS_full[16 * w:16 * w + 16].to(dtype).float() @ K[:, c0:c0 + 64])


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
