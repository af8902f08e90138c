// Fused causal / non-causal attention, forward and backward (issues #9, #25). No torch headers: plain
// `nvcc -gencode=arch=compute_90a,code=sm_90a -c` (or compute_80,code=sm_80) compiles this file; csrc/attn_ops.cpp
// binds it.
//
// FlashAttention-2 scheme: the T x T score matrix never exists in memory and S / P stay in registers.
// Tiles of BR = 64 queries and BC = 64 keys; 4 warps, a warp owns 16 rows of a tile. Every product is an
// `mma.sync.m16n8k16` (fp16 / bf16 in, fp32 accumulate) whose operands come from shared memory through
// `ldmatrix` (16-byte rows, padded by kPad elements so the 8 rows of one 8x8 matrix fall in 8 different bank
// groups) or straight from the accumulators of the previous product: the fp32 accumulator of two adjacent
// n8 tiles holds, lane by lane, exactly the elements of one m16k16 A operand, so P (forward) and P^T / dS^T
// (backward) feed the next mma without a trip through memory. K / V (forward) and Q / dO (backward) tiles are
// double-buffered with `cp.async` (zero-filled past the sequence end), so tile j+1 loads while tile j computes.
// Softmax runs online in fp32 in the log2 domain (exp2f).
//
// Layouts (contiguous): q, o, dq [B, H, T, D]; k, v, dk, dv [B, Hkv, T, D] (grouped-query attention: query
// head h reads kv head h / (H / Hkv)); lse, delta [B, H, T] fp32. D is 64 or 128. T is any length.
//
//   forward   one block per (64-query tile, b*H + h); causal grids start with the last (heaviest) query
//             tile. Q fragments are loaded once into registers; writes o (16-byte stores through shared
//             memory) and the natural-log log-sum-exp of each row's scaled scores, which backward reuses.
//   backward  delta = rowsum(dO * O); then one block per (64-key tile, b*H + h): query heads are a parallel
//             dimension, so GQA with a small batch still fills the GPU. A warp owns 16 key rows and computes
//             S^T = K Q^T and dP^T = V dO^T for every query tile that can see its keys (the first key tiles,
//             the heaviest under a causal mask, have the lowest block index); P^T and dS^T feed dV += P^T dO
//             and dK += dS^T Q from registers. dS goes through shared memory once for dQ += dS K, which is
//             added to an fp32 buffer with atomics. With one query head per kv head dK / dV are written
//             directly; with GQA each block writes its head's fp32 partial and a reduction kernel sums a
//             group's heads in head order (no atomics: the same bits every run).
//             Deterministic mode: that kernel leaves dQ out and a second one, a block per (64-query tile,
//             b*H + h), recomputes S, P and dS from registers over the key tiles in increasing order and
//             keeps dQ in registers: the same bits on every run (atomics add in arrival order).
//
// mma.sync m16n8k16 fragments (g = lane / 4, t = lane % 4; "r" a 32-bit register holding two 16-bit values,
// the lower column in the low half):
//   A 16x16 (row-major): a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B 16x8  (k x n)    : b0 = (k 2t..2t+1, n g)  b1 = (k 2t+8.., n g)
//   C 16x8  (fp32)     : c0, c1 = (g, 2t), (g, 2t+1)   c2, c3 = (g+8, 2t), (g+8, 2t+1)
// ldmatrix.x4: lane l supplies the address of one 16-byte row; lanes 8i..8i+7 the rows of matrix i, which lands
// in register i (lm_row / lm_col below). tests/test_kernel_emulation.py reads these lane maps from this file
// and emulates ldmatrix and mma lane by lane.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace moetrain_attn {

constexpr int BR = 64;         // query rows per tile
constexpr int BC = 64;         // key rows per tile
constexpr int kWarps = 4;      // a warp owns 16 rows of a tile
constexpr int kThreads = 128;  // kWarps x 32
constexpr int kPad = 8;        // 16-bit elements of padding per shared row: ldmatrix rows in distinct bank groups
constexpr int kStages = 2;     // cp.async buffers of the streamed tiles
static_assert(kThreads == kWarps * 32 && BR == kWarps * 16 && BC == kWarps * 16, "a warp owns 16 rows of a tile");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ldmatrix.x4 address maps (lane -> row / column of the 16-byte row it points at, relative to the 16x16 block):
//   A operand, or B operand from [n][k] memory (two n8 tiles stacked by rows: registers 0, 1 = tile 0; 2, 3 = tile 1)
__device__ __forceinline__ int lm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int lm_a_col(int lane) { return (lane >> 4) * 8; }
__device__ __forceinline__ int lm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int lm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }
//   B operand from [k][n] memory with .trans (registers 0, 1 = n columns 0..7; 2, 3 = n columns 8..15)
__device__ __forceinline__ int lm_bt_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int lm_bt_col(int lane) { return (lane >> 4) * 8; }
// the row / column of accumulator element i (0..3) of an m16n8 tile
__device__ __forceinline__ int c_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
__device__ __forceinline__ int c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// two fp32 values rounded to 16 bits in one register, lo in the low half (the lower column of a fragment)
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c += a b, m16n8k16, fp32 accumulate
template <typename T> __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// 16 bytes global -> shared without registers; bytes = 0 writes zeros (rows past the sequence end)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// rows [row0, row0 + ROWS) of a [seqlen, D] matrix into shared memory (row stride D + kPad), asynchronously
template <typename T, int D, int ROWS>
__device__ __forceinline__ void async_tile(T* dst, const T* __restrict__ src, int row0, int seqlen) {
  constexpr int kPerRow = D / 8;  // 8 x 16-bit = one 16-byte copy
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * 8;
    const bool in = row0 + r < seqlen;
    cp_async16(dst + r * (D + kPad) + c, src + static_cast<int64_t>(in ? row0 + r : 0) * D + c, in ? 16 : 0);
  }
}

// acc[m16 x (8 NT)] += a * B for one k16 step kk, where B's [n][k] rows are in shared memory at sB (row stride ld)
template <typename T, int NT>
__device__ __forceinline__ void mma_step_nk(float (&acc)[NT][4], const uint32_t (&a)[4], const T* sB, int kk, int ld) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t b[4];
    ldsm_x4(b, sB + (np * 16 + lm_b_row(lane)) * ld + kk * 16 + lm_b_col(lane));
    mma<T>(acc[2 * np], a, b[0], b[1]);
    mma<T>(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// acc[m16 x (8 NT)] += A[16 x 16 KT] (A fragments in registers) * B, B's [n][k] rows in shared memory:
// S = Q K^T (forward), S = Q K^T in the deterministic dQ kernel
template <typename T, int KT, int NT>
__device__ __forceinline__ void mm_regA_smemBnk(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* sB, int ld) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) mma_step_nk<T, NT>(acc, a[kk], sB, kk, ld);
}

// the same with A's 16 rows also read from shared memory, one k16 step at a time (sA row stride ld): keeps
// the registers of the backward kernel, which holds dK and dV, below the spill point (S^T = K Q^T,
// dP^T = V dO^T; and dP = dO V^T in the deterministic dQ kernel)
template <typename T, int KT, int NT>
__device__ __forceinline__ void mm_smemA_smemBnk(float (&acc)[NT][4], const T* sA, const T* sB, int ld) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, sA + lm_a_row(lane) * ld + kk * 16 + lm_a_col(lane));
    mma_step_nk<T, NT>(acc, a, sB, kk, ld);
  }
}

// acc[m16 x (8 NT)] += A * B where A is 16 x (16 KT) from registers and B's [k][n] rows are in shared memory
// (transposed by ldmatrix): O = P V, dV = P^T dO, dK = dS^T Q, dQ = dS K
template <typename T, int KT, int NT>
__device__ __forceinline__ void mm_regA_smemBkn(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* sB, int ld) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4_t(b, sB + (kk * 16 + lm_bt_row(lane)) * ld + np * 16 + lm_bt_col(lane));
      mma<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// A fragments of a warp's 16 rows x (16 KT) columns from shared memory
template <int KT, typename T> __device__ __forceinline__ void load_a(uint32_t (&a)[KT][4], const T* s, int ld) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) ldsm_x4(a[kk], s + lm_a_row(lane) * ld + kk * 16 + lm_a_col(lane));
}

// the accumulators of 2 KT adjacent n8 tiles, rounded to 16 bits, as the A fragments of a k = 16 KT product
template <typename T, int KT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[KT][4], const float (&c)[2 * KT][4]) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int NT> __device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// a warp's 16 x D accumulator times mul, rounded, to rows [row0, row0 + 16) of a [seqlen, D] matrix: staged in
// the warp's 16 rows of shared memory (stride D + kPad), then 16-byte stores
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float (&c)[D / 8][4], float mul, T* stage,
                                           int row0, int seqlen) {
  const int lane = threadIdx.x & 31;
  constexpr int ld = D + kPad;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    *reinterpret_cast<uint32_t*>(stage + c_row(lane, 0) * ld + n * 8 + c_col(lane, 0)) =
        pack2<T>(c[n][0] * mul, c[n][1] * mul);
    *reinterpret_cast<uint32_t*>(stage + c_row(lane, 2) * ld + n * 8 + c_col(lane, 2)) =
        pack2<T>(c[n][2] * mul, c[n][3] * mul);
  }
  __syncwarp();
  for (int i = lane; i < 16 * (D / 8); i += 32) {
    const int r = i / (D / 8), c8 = (i % (D / 8)) * 8;
    if (row0 + r < seqlen)
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(row0 + r) * D + c8) =
          *reinterpret_cast<const uint4*>(stage + r * ld + c8);
  }
  __syncwarp();
}

// ------------------------------------------------------------------------------------ forward
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                             const T* __restrict__ v, T* __restrict__ o,
                                                             float* __restrict__ lse, int H, int Hkv, int seqlen,
                                                             int causal, float scale) {
  constexpr int ld = D + kPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // later the output's staging rows
  T* sK = sQ + BR * ld;                // kStages tiles
  T* sV = sK + kStages * BC * ld;

  const int qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // heaviest causal tiles first
  const int q0 = qt * BR;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int kvh = b * Hkv + h / (H / Hkv);
  const T* qb = q + static_cast<int64_t>(bh) * seqlen * D;
  const T* kb = k + static_cast<int64_t>(kvh) * seqlen * D;
  const T* vb = v + static_cast<int64_t>(kvh) * seqlen * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;
  const int kv_end = causal ? min(seqlen, q0 + BR) : seqlen;
  const int n_kt = (kv_end + BC - 1) / BC;

  async_tile<T, D, BR>(sQ, qb, q0, seqlen);
  async_tile<T, D, BC>(sK, kb, 0, seqlen);
  async_tile<T, D, BC>(sV, vb, 0, seqlen);
  cp_async_commit();

  uint32_t qf[D / 16][4];
  float oacc[D / 8][4];
  zero(oacc);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows c_row(lane, 0) and c_row(lane, 2)
  const int r_lo = q0 + warp * 16 + c_row(lane, 0);

  for (int j = 0; j < n_kt; ++j) {
    const int st = j % kStages;
    if (j + 1 < n_kt) {  // the next tile into the buffer the previous iteration released
      const int nst = (j + 1) % kStages;
      async_tile<T, D, BC>(sK + nst * BC * ld, kb, (j + 1) * BC, seqlen);
      async_tile<T, D, BC>(sV + nst * BC * ld, vb, (j + 1) * BC, seqlen);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) load_a<D / 16>(qf, sQ + warp * 16 * ld, ld);

    float s[BC / 8][4];
    zero(s);
    mm_regA_smemBnk<T, D / 16, BC / 8>(s, qf, sK + st * BC * ld, ld);

    const int k0 = j * BC;
    const bool masked = k0 + BC > seqlen || (causal && k0 + BC - 1 > q0);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kj = k0 + n * 8 + c_col(lane, i), qi = r_lo + (i >> 1) * 8;
        const bool ok = !masked || (kj < seqlen && (!causal || kj <= qi));
        s[n][i] = ok ? s[n][i] * scale_log2 : -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // a row's 64 columns sit in the 4 lanes of a quad
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays at zero
      alpha[r] = exp2f(m[r] - m_use[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - m_use[i >> 1]);
        l[i >> 1] += s[n][i];  // fp32, unrounded: backward recomputes P from the log-sum-exp
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      oacc[n][0] *= alpha[0];
      oacc[n][1] *= alpha[0];
      oacc[n][2] *= alpha[1];
      oacc[n][3] *= alpha[1];
    }
    uint32_t pf[BC / 16][4];
    acc_to_a<T, BC / 16>(pf, s);  // P rounded to 16 bits, straight from the score registers
    mm_regA_smemBkn<T, BC / 16, D / 8>(oacc, pf, sV + st * BC * ld, ld);
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float inv0 = l[0] > 0.0f ? 1.0f / l[0] : 0.0f, inv1 = l[1] > 0.0f ? 1.0f / l[1] : 0.0f;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    oacc[n][0] *= inv0;
    oacc[n][1] *= inv0;
    oacc[n][2] *= inv1;
    oacc[n][3] *= inv1;
  }
  store_rows<T, D>(o + static_cast<int64_t>(bh) * seqlen * D, oacc, 1.0f, sQ + warp * 16 * ld, q0 + warp * 16,
                   seqlen);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = r_lo + r * 8;
      if (qi < seqlen) lse[static_cast<int64_t>(bh) * seqlen + qi] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------------ backward
// delta[row] = sum_d dO[row, d] * O[row, d]; one warp per row.
template <typename T, int D>
__global__ void flash_bwd_delta_kernel(const T* __restrict__ o, const T* __restrict__ d_o, float* __restrict__ delta,
                                       int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  float s = 0.0f;
  for (int c = lane; c < D; c += 32) s += to_f<T>(o[r * D + c]) * to_f<T>(d_o[r * D + c]);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) delta[r] = s;
}

// The log2-domain lse and delta of a query tile's rows into shared memory (+inf / 0 past seqlen: P = 0).
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const float* __restrict__ lse,
                                               const float* __restrict__ delta, int bh, int q0, int seqlen) {
  for (int r = threadIdx.x; r < BR; r += kThreads) {
    const bool in = q0 + r < seqlen;
    sLse[r] = in ? lse[static_cast<int64_t>(bh) * seqlen + q0 + r] * kLog2e : INFINITY;
    sDelta[r] = in ? delta[static_cast<int64_t>(bh) * seqlen + q0 + r] : 0.0f;
  }
}

// Per (key tile, query head): dK / dV of the head for these keys (fp32 partials with GQA), dQ by atomics.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                             const T* __restrict__ v, const T* __restrict__ d_o,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ delta, float* __restrict__ dq_acc,
                                                             float* __restrict__ dkv_acc, T* __restrict__ dk,
                                                             T* __restrict__ dv, int H, int Hkv, int seqlen, int causal,
                                                             float scale, int atomic_dq) {
  constexpr int ld = D + kPad, lds = BC + kPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BC * ld;
  T* sQ = sV + BC * ld;              // kStages tiles
  T* sdO = sQ + kStages * BR * ld;   // kStages tiles
  T* sdS = sdO + kStages * BR * ld;  // [BR][BC + kPad]: dS of the current tile, query-major, for dQ
  uint16_t* sdS16 = reinterpret_cast<uint16_t*>(sdS);
  float* sLse = reinterpret_cast<float*>(sdS + BR * lds);  // kStages x BR, log2 domain
  float* sDelta = sLse + kStages * BR;                     // kStages x BR

  const int k0 = blockIdx.x * BC;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int group = H / Hkv;
  const int bkv = b * Hkv + h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;
  const T* qb = q + static_cast<int64_t>(bh) * seqlen * D;
  const T* dob = d_o + static_cast<int64_t>(bh) * seqlen * D;
  const int q_first = causal ? (k0 / BR) * BR : 0;  // earlier query tiles cannot see these keys
  const int n_qt = (seqlen - q_first + BR - 1) / BR;

  async_tile<T, D, BC>(sK, k + static_cast<int64_t>(bkv) * seqlen * D, k0, seqlen);
  async_tile<T, D, BC>(sV, v + static_cast<int64_t>(bkv) * seqlen * D, k0, seqlen);
  async_tile<T, D, BR>(sQ, qb, q_first, seqlen);
  async_tile<T, D, BR>(sdO, dob, q_first, seqlen);
  cp_async_commit();
  load_row_stats(sLse, sDelta, lse, delta, bh, q_first, seqlen);

  float dk_acc[D / 8][4], dv_acc[D / 8][4];  // the warp's 16 key rows, all D columns
  zero(dk_acc);
  zero(dv_acc);
  const int kr_lo = k0 + warp * 16 + c_row(lane, 0);  // this lane's key rows: kr_lo and kr_lo + 8
  constexpr int QS = D > 64 ? 16 : 64;

  for (int j = 0; j < n_qt; ++j) {
    const int st = j % kStages, q0 = q_first + j * BR;
    if (j + 1 < n_qt) {
      const int nst = (j + 1) % kStages;
      async_tile<T, D, BR>(sQ + nst * BR * ld, qb, q0 + BR, seqlen);
      async_tile<T, D, BR>(sdO + nst * BR * ld, dob, q0 + BR, seqlen);
      cp_async_commit();
      load_row_stats(sLse + nst * BR, sDelta + nst * BR, lse, delta, bh, q0 + BR, seqlen);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tQ = sQ + st * BR * ld;
    const T* tdO = sdO + st * BR * ld;
    const float* tLse = sLse + st * BR;
    const float* tDelta = sDelta + st * BR;

    // in query slices of QS columns (16 at D = 128, so P^T and dS^T fit beside dK and dV in registers)
#pragma unroll 1
    for (int qs = 0; qs < BR; qs += QS) {
      // P^T = exp(S^T * scale - lse) for the warp's 16 keys x QS queries
      float p[QS / 8][4];
      zero(p);
      mm_smemA_smemBnk<T, D / 16, QS / 8>(p, sK + warp * 16 * ld, tQ + qs * ld, ld);
#pragma unroll
      for (int n = 0; n < QS / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int qc = qs + n * 8 + c_col(lane, i), kr = kr_lo + (i >> 1) * 8;
          const bool ok = kr < seqlen && q0 + qc < seqlen && (!causal || kr <= q0 + qc);
          p[n][i] = ok ? exp2f(p[n][i] * scale_log2 - tLse[qc]) : 0.0f;
        }
      }
      {
        uint32_t pa[QS / 16][4];
        acc_to_a<T, QS / 16>(pa, p);
        mm_regA_smemBkn<T, QS / 16, D / 8>(dv_acc, pa, tdO + qs * ld, ld);  // dV += P^T dO
      }
      // dS^T = P^T * (dP^T - delta), dP^T = V dO^T
      float ds[QS / 8][4];
      zero(ds);
      mm_smemA_smemBnk<T, D / 16, QS / 8>(ds, sV + warp * 16 * ld, tdO + qs * ld, ld);
#pragma unroll
      for (int n = 0; n < QS / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[n][i] = p[n][i] * (ds[n][i] - tDelta[qs + n * 8 + c_col(lane, i)]);
      }
      uint32_t dsa[QS / 16][4];
      acc_to_a<T, QS / 16>(dsa, ds);  // dS rounded once, for both dK and dQ
      mm_regA_smemBkn<T, QS / 16, D / 8>(dk_acc, dsa, tQ + qs * ld, ld);  // dK += dS^T Q
      if (atomic_dq) {  // dS to shared memory query-major for dQ below
#pragma unroll
        for (int kk = 0; kk < QS / 16; ++kk) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // register i of A fragment kk: key row c_row(lane, 2 * (i & 1))
            const int kr = warp * 16 + c_row(lane, 2 * (i & 1));
            const int qc = qs + kk * 16 + (i >> 1) * 8 + c_col(lane, 0);
            sdS16[qc * lds + kr] = static_cast<uint16_t>(dsa[kk][i] & 0xffffu);  // the lower query column
            sdS16[(qc + 1) * lds + kr] = static_cast<uint16_t>(dsa[kk][i] >> 16);
          }
        }
      }
    }

    if (atomic_dq) {  // dQ[64 queries] += scale * dS K, a warp per 16 queries
      __syncthreads();
      uint32_t dsq[BC / 16][4];
      load_a<BC / 16>(dsq, sdS + warp * 16 * lds, lds);
      float* dqb = dq_acc + (static_cast<int64_t>(bh) * seqlen + q0 + warp * 16) * D;
#pragma unroll
      for (int c0 = 0; c0 < D; c0 += 64) {  // 64 columns at a time: dK and dV hold most registers
        float dq[8][4];
        zero(dq);
        mm_regA_smemBkn<T, BC / 16, 8>(dq, dsq, sK + c0, ld);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = c_row(lane, i);
            if (q0 + warp * 16 + r < seqlen) atomicAdd(dqb + r * D + c0 + n * 8 + c_col(lane, i), scale * dq[n][i]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this tile's buffers (and sdS) before they are refilled
  }

  // dK (times the softmax scale) and dV for the key rows that exist
  T* stage = sQ + warp * 16 * ld;
  if (group == 1) {
    store_rows<T, D>(dk + static_cast<int64_t>(bkv) * seqlen * D, dk_acc, scale, stage, k0 + warp * 16, seqlen);
    store_rows<T, D>(dv + static_cast<int64_t>(bkv) * seqlen * D, dv_acc, 1.0f, stage, k0 + warp * 16, seqlen);
    return;
  }
  // GQA: this head's unscaled fp32 partials [2][B*H][T][D]; flash_bwd_reduce_kernel sums a group in head order
  const int64_t plane = static_cast<int64_t>(gridDim.y) * seqlen * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      const int kr = kr_lo + (i >> 1) * 8;
      if (kr >= seqlen) continue;
      const int64_t at = (static_cast<int64_t>(bh) * seqlen + kr) * D + n * 8 + c_col(lane, i);
      *reinterpret_cast<float2*>(dkv_acc + at) = make_float2(dk_acc[n][i], dk_acc[n][i + 1]);
      *reinterpret_cast<float2*>(dkv_acc + plane + at) = make_float2(dv_acc[n][i], dv_acc[n][i + 1]);
    }
  }
}

// dk[b, kvh] = scale * sum over the group's heads (in head order) of the partials; dv the same without scale
template <typename T>
__global__ void flash_bwd_reduce_kernel(const float* __restrict__ dkv_acc, T* __restrict__ dk, T* __restrict__ dv,
                                        int Hkv, int group, int64_t per_head, int64_t kv_elems, float scale) {
  const int64_t plane = kv_elems * group;  // B*H*T*D
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < kv_elems;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bkv = i / per_head, off = i % per_head;
    const int64_t first = (bkv / Hkv * Hkv * group + bkv % Hkv * group) * per_head + off;
    float sk = 0.0f, sv = 0.0f;
    for (int g = 0; g < group; ++g) {
      sk += dkv_acc[first + g * per_head];
      sv += dkv_acc[plane + first + g * per_head];
    }
    dk[i] = from_f<T>(scale * sk);
    dv[i] = from_f<T>(sv);
  }
}

// Deterministic dQ: one block per (64-query tile, b*H + h); each warp keeps dQ for its 16 query rows in
// registers while the key tiles go by in increasing order, so the sum's order (and bits) never change.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) flash_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                const T* __restrict__ v, const T* __restrict__ d_o,
                                                                const float* __restrict__ lse,
                                                                const float* __restrict__ delta, T* __restrict__ dq,
                                                                int H, int Hkv, int seqlen, int causal, float scale) {
  constexpr int ld = D + kPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // later the output's staging rows
  T* sdO = sQ + BR * ld;
  T* sK = sdO + BR * ld;  // kStages tiles
  T* sV = sK + kStages * BC * ld;
  float* sLse = reinterpret_cast<float*>(sV + kStages * BC * ld);
  float* sDelta = sLse + BR;

  const int qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // heaviest causal tiles first
  const int q0 = qt * BR;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int bkv = b * Hkv + h / (H / Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;
  const T* kb = k + static_cast<int64_t>(bkv) * seqlen * D;
  const T* vb = v + static_cast<int64_t>(bkv) * seqlen * D;
  const int k_end = causal ? min(q0 + BR, seqlen) : seqlen;  // later keys are masked
  const int n_kt = (k_end + BC - 1) / BC;

  async_tile<T, D, BR>(sQ, q + static_cast<int64_t>(bh) * seqlen * D, q0, seqlen);
  async_tile<T, D, BR>(sdO, d_o + static_cast<int64_t>(bh) * seqlen * D, q0, seqlen);
  async_tile<T, D, BC>(sK, kb, 0, seqlen);
  async_tile<T, D, BC>(sV, vb, 0, seqlen);
  cp_async_commit();
  load_row_stats(sLse, sDelta, lse, delta, bh, q0, seqlen);

  uint32_t qf[D / 16][4];
  float dq_acc[D / 8][4];
  zero(dq_acc);
  const int r_lo = warp * 16 + c_row(lane, 0);  // this lane's query rows in the tile: r_lo and r_lo + 8
  float row_lse[2], row_delta[2];

  for (int j = 0; j < n_kt; ++j) {
    const int st = j % kStages, k0 = j * BC;
    if (j + 1 < n_kt) {
      const int nst = (j + 1) % kStages;
      async_tile<T, D, BC>(sK + nst * BC * ld, kb, k0 + BC, seqlen);
      async_tile<T, D, BC>(sV + nst * BC * ld, vb, k0 + BC, seqlen);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
      load_a<D / 16>(qf, sQ + warp * 16 * ld, ld);
      row_lse[0] = sLse[r_lo];
      row_lse[1] = sLse[r_lo + 8];
      row_delta[0] = sDelta[r_lo];
      row_delta[1] = sDelta[r_lo + 8];
    }
    float p[BC / 8][4];
    zero(p);
    mm_regA_smemBnk<T, D / 16, BC / 8>(p, qf, sK + st * BC * ld, ld);
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kj = k0 + n * 8 + c_col(lane, i), qi = q0 + r_lo + (i >> 1) * 8;
        const bool ok = qi < seqlen && kj < seqlen && (!causal || kj <= qi);
        p[n][i] = ok ? exp2f(p[n][i] * scale_log2 - row_lse[i >> 1]) : 0.0f;
      }
    }
    float ds[BC / 8][4];
    zero(ds);
    mm_smemA_smemBnk<T, D / 16, BC / 8>(ds, sdO + warp * 16 * ld, sV + st * BC * ld, ld);  // dP = dO V^T
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) ds[n][i] = p[n][i] * (ds[n][i] - row_delta[i >> 1]);
    }
    uint32_t dsa[BC / 16][4];
    acc_to_a<T, BC / 16>(dsa, ds);
    mm_regA_smemBkn<T, BC / 16, D / 8>(dq_acc, dsa, sK + st * BC * ld, ld);  // dQ += dS K
    __syncthreads();
  }
  store_rows<T, D>(dq + static_cast<int64_t>(bh) * seqlen * D, dq_acc, scale, sQ + warp * 16 * ld, q0 + warp * 16,
                   seqlen);
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f<T>(src[i]);
}

template <int D> constexpr size_t fwd_smem_bytes() { return 2 * (BR + 2 * kStages * BC) * (D + kPad); }
template <int D> constexpr size_t bwd_smem_bytes() {
  return 2 * ((2 * BC + 2 * kStages * BR) * (D + kPad) + BR * (BC + kPad)) + 4 * 2 * kStages * BR;
}
template <int D> constexpr size_t dq_smem_bytes() { return 2 * (2 * BR + 2 * kStages * BC) * (D + kPad) + 4 * 2 * BR; }

unsigned grid_1d(int64_t n) { return static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535); }

template <typename T, int D>
cudaError_t forward(const void* q, const void* k, const void* v, void* o, float* lse, int B, int H, int Hkv, int seqlen,
                    int causal, float scale, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<D>();
  cudaError_t err = cudaFuncSetAttribute(flash_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  dim3 grid((seqlen + BR - 1) / BR, B * H);
  flash_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                           static_cast<const T*>(v), static_cast<T*>(o), lse, H, Hkv,
                                                           seqlen, causal, scale);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t backward(const void* q, const void* k, const void* v, const void* o, const void* d_o, const float* lse,
                     float* delta, float* dq_acc, float* dkv_acc, void* dq, void* dk, void* dv, int B, int H, int Hkv,
                     int seqlen, int causal, float scale, int deterministic, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(B) * H * seqlen;
  flash_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const T*>(o), static_cast<const T*>(d_o), delta, rows);
  cudaError_t err = cudaSuccess;
  if (!deterministic) {
    err = cudaMemsetAsync(dq_acc, 0, sizeof(float) * rows * D, stream);
    if (err != cudaSuccess) return err;
  }
  constexpr size_t smem = bwd_smem_bytes<D>();
  err = cudaFuncSetAttribute(flash_bwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  dim3 grid((seqlen + BC - 1) / BC, B * H);
  flash_bwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(d_o), lse,
      delta, dq_acc, dkv_acc, static_cast<T*>(dk), static_cast<T*>(dv), H, Hkv, seqlen, causal, scale,
      deterministic ? 0 : 1);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (H != Hkv) {
    const int64_t kv_elems = static_cast<int64_t>(B) * Hkv * seqlen * D;
    flash_bwd_reduce_kernel<T><<<grid_1d(kv_elems), 256, 0, stream>>>(
        dkv_acc, static_cast<T*>(dk), static_cast<T*>(dv), Hkv, H / Hkv, static_cast<int64_t>(seqlen) * D, kv_elems,
        scale);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (deterministic) {
    constexpr size_t dq_smem = dq_smem_bytes<D>();
    err = cudaFuncSetAttribute(flash_bwd_dq_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(dq_smem));
    if (err != cudaSuccess) return err;
    dim3 dq_grid((seqlen + BR - 1) / BR, B * H);
    flash_bwd_dq_kernel<T, D><<<dq_grid, kThreads, dq_smem, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(d_o), lse,
        delta, static_cast<T*>(dq), H, Hkv, seqlen, causal, scale);
    return cudaGetLastError();
  }
  cast_kernel<T><<<grid_1d(rows * D), 256, 0, stream>>>(dq_acc, static_cast<T*>(dq), rows * D);
  return cudaGetLastError();
}

}  // namespace moetrain_attn

// dtype: 1 = float16, 2 = bfloat16 (the codes of csrc/moe_kernels.cu). Returns cudaErrorInvalidValue for
// shapes the kernels do not take (D not 64/128, H not a multiple of Hkv), so callers fall back.
extern "C" {

cudaError_t moe_flash_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int B,
                               int H, int Hkv, int seqlen, int D, int causal, float scale, cudaStream_t stream) {
  using namespace moetrain_attn;
  if (Hkv < 1 || H % Hkv != 0 || seqlen < 1 || B < 1 || B * H > 65535) return cudaErrorInvalidValue;
  if (dtype == 1 && D == 64) return forward<__half, 64>(q, k, v, o, lse, B, H, Hkv, seqlen, causal, scale, stream);
  if (dtype == 1 && D == 128) return forward<__half, 128>(q, k, v, o, lse, B, H, Hkv, seqlen, causal, scale, stream);
  if (dtype == 2 && D == 64)
    return forward<__nv_bfloat16, 64>(q, k, v, o, lse, B, H, Hkv, seqlen, causal, scale, stream);
  if (dtype == 2 && D == 128)
    return forward<__nv_bfloat16, 128>(q, k, v, o, lse, B, H, Hkv, seqlen, causal, scale, stream);
  return cudaErrorInvalidValue;
}

// Workspaces: delta [B*H*T] fp32; dq_acc [B*H*T*D] fp32 (unused when deterministic: dQ then comes from a
// second kernel that sums the key tiles in a fixed order); dkv_acc [2*B*H*T*D] fp32, the per-query-head dK / dV
// partials (unused when H == Hkv).
cudaError_t moe_flash_attn_bwd(int dtype, const void* q, const void* k, const void* v, const void* o, const void* d_o,
                               const float* lse, float* delta, float* dq_acc, float* dkv_acc, void* dq, void* dk,
                               void* dv, int B, int H, int Hkv, int seqlen, int D, int causal, float scale,
                               int deterministic, cudaStream_t stream) {
  using namespace moetrain_attn;
  if (Hkv < 1 || H % Hkv != 0 || seqlen < 1 || B < 1 || B * H > 65535) return cudaErrorInvalidValue;
#define MOE_BWD(TYPE, DIM)                                                                                        \
  return backward<TYPE, DIM>(q, k, v, o, d_o, lse, delta, dq_acc, dkv_acc, dq, dk, dv, B, H, Hkv, seqlen, causal, \
                             scale, deterministic, stream)
  if (dtype == 1 && D == 64) MOE_BWD(__half, 64);
  if (dtype == 1 && D == 128) MOE_BWD(__half, 128);
  if (dtype == 2 && D == 64) MOE_BWD(__nv_bfloat16, 64);
  if (dtype == 2 && D == 128) MOE_BWD(__nv_bfloat16, 128);
#undef MOE_BWD
  return cudaErrorInvalidValue;
}

}  // extern "C"
