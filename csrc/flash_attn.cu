// Fused causal / non-causal attention, forward and backward (issue #9). No torch headers: plain
// `nvcc -gencode=arch=compute_90a,code=sm_90a -c` compiles this file; csrc/attn_ops.cpp binds it.
//
// Flash-attention scheme: the T x T score matrix never exists in memory. Tiles of BR = 64 queries and
// BC = 64 keys live in shared memory; tensor cores (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate) do
// every matrix product; softmax is computed online per query row in fp32 (log2 domain, exp2f).
//
// Layouts (contiguous): q, o, dq [B, H, T, D]; k, v, dk, dv [B, Hkv, T, D] (grouped-query attention:
// query head h reads kv head h / (H / Hkv)); lse, delta [B, H, T] fp32. D is 64 or 128. T is any length
// (tiles are zero-padded and masked).
//
//   forward   one block per (64-query tile, b*H + h); 4 warps, a warp owns 16 query rows. Writes o
//             and the natural-log log-sum-exp of each row's scaled scores, which backward reuses.
//   backward  delta = rowsum(dO * O) (one warp per row); then one block per (64-key tile, b*Hkv + kv
//             head) walks every query head of its group and every query tile that can see its keys,
//             recomputing P = exp(S - lse): dV += P^T dO and dK += dS^T Q stay in the block's
//             registers (so GQA needs no atomics for dK/dV), dQ += dS K is added to an fp32 buffer with
//             atomics and converted at the end. Deterministic mode: that kernel leaves dQ out and a second
//             one, a block per (64-query tile, b*H + h), recomputes S, P and dS over the key tiles in a fixed
//             order and keeps dQ in registers: the same bits on every run (atomics add in arrival order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

namespace moetrain_attn {

using namespace nvcuda;

constexpr int BR = 64;         // query rows per tile
constexpr int BC = 64;         // key rows per tile
constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr int kPad = 8;        // 16-bit elements of padding per shared row (bank spread, keeps 32 B alignment)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Shared-memory strides: 16-bit tiles [rows][D + kPad], probability tiles [rows][BC + kPad], fp32 scratch
// [rows][max(D, BC) + 4]. Every WMMA pointer used below starts at a multiple of 16 rows and 16 columns,
// which keeps it 32-byte aligned for these strides.
template <int D> struct Strides {
  static constexpr int kTile = D + kPad;
  static constexpr int kProb = BC + kPad;
  static constexpr int kScratch = (D > BC ? D : BC) + 4;
};

// rows [row0, row0 + 64) of a [seqlen, D] matrix into shared memory; rows past seqlen are zero.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int row0, int seqlen) {
  constexpr int kVec = 8;  // 8 x 16-bit = one 16-byte transaction
  constexpr int kPerRow = D / kVec;
  for (int i = threadIdx.x; i < 64 * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < seqlen) val = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(row0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * Strides<D>::kTile + c) = val;
  }
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;  // a transposed operand
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // b = X^T for row-major X
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out[16 x 64] (fp32, stride ldo) = A[16 x D] (row-major, stride lda) * X^T where X is [64 x D] row-major.
template <typename T, int D>
__device__ __forceinline__ void mm_abt(float* out, int ldo, const T* a, int lda, const T* x, int ldx) {
#pragma unroll
  for (int n = 0; n < BC / 16; ++n) {
    FragC c;
    wmma::fill_fragment(c, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      FragA<T> fa;
      FragBT<T> fb;
      wmma::load_matrix_sync(fa, a + kk, lda);
      wmma::load_matrix_sync(fb, x + n * 16 * ldx + kk, ldx);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + n * 16, c, ldo, wmma::mem_row_major);
  }
}

// out[16 x D] (fp32, stride ldo) = A[16 x 64] (row-major, stride lda) * X where X is [64 x D] row-major.
template <typename T, int D>
__device__ __forceinline__ void mm_ab(float* out, int ldo, const T* a, int lda, const T* x, int ldx) {
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    FragC c;
    wmma::fill_fragment(c, 0.0f);
#pragma unroll
    for (int kk = 0; kk < BC; kk += 16) {
      FragA<T> fa;
      FragB<T> fb;
      wmma::load_matrix_sync(fa, a + kk, lda);
      wmma::load_matrix_sync(fb, x + kk * ldx + n * 16, ldx);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + n * 16, c, ldo, wmma::mem_row_major);
  }
}

// ------------------------------------------------------------------------------------ forward
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                             const T* __restrict__ v, T* __restrict__ o,
                                                             float* __restrict__ lse, int H, int Hkv, int seqlen,
                                                             int causal, float scale) {
  using S = Strides<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BR * S::kTile;
  T* sV = sK + BC * S::kTile;
  T* sP = sV + BC * S::kTile;
  float* sS = reinterpret_cast<float*>(sP + BR * S::kProb);

  const int q0 = blockIdx.x * BR;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int kvh = b * Hkv + h / (H / Hkv);
  const T* qb = q + static_cast<int64_t>(bh) * seqlen * D;
  const T* kb = k + static_cast<int64_t>(kvh) * seqlen * D;
  const T* vb = v + static_cast<int64_t>(kvh) * seqlen * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + (lane >> 1);  // two lanes per query row, each owns half of its columns
  const int half = lane & 1;
  const int qi = q0 + row;
  const float scale_log2 = scale * kLog2e;

  load_tile<T, D>(sQ, qb, q0, seqlen);
  float m = -INFINITY, l = 0.0f;
  float acc[D / 2];
#pragma unroll
  for (int c = 0; c < D / 2; ++c) acc[c] = 0.0f;

  const int kv_end = causal ? min(seqlen, q0 + BR) : seqlen;
  for (int k0 = 0; k0 < kv_end; k0 += BC) {
    __syncthreads();  // the previous tile's K, V are no longer read
    load_tile<T, D>(sK, kb, k0, seqlen);
    load_tile<T, D>(sV, vb, k0, seqlen);
    __syncthreads();

    float* s_w = sS + warp * 16 * S::kScratch;
    mm_abt<T, D>(s_w, S::kScratch, sQ + warp * 16 * S::kTile, S::kTile, sK, S::kTile);
    __syncwarp();

    // online softmax on this lane's 32 columns of its row
    const float* srow = sS + row * S::kScratch + half * (BC / 2);
    float sv[BC / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < BC / 2; ++c) {
      const int kj = k0 + half * (BC / 2) + c;
      const bool ok = kj < seqlen && (!causal || kj <= qi);
      sv[c] = ok ? srow[c] * scale_log2 : -INFINITY;
      mx = fmaxf(mx, sv[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays at zero
    const float alpha = exp2f(m - m_use);
    float rs = 0.0f;
    T* prow = sP + row * S::kProb + half * (BC / 2);
#pragma unroll
    for (int c = 0; c < BC / 2; ++c) {
      const float p = exp2f(sv[c] - m_use);
      rs += p;  // fp32, as backward recomputes P from the log-sum-exp
      prow[c] = from_f<T>(p);
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    l = l * alpha + rs;
    m = m_new;
    __syncwarp();

    // this tile's P V for the warp's 16 rows, through the scratch, into the lanes' accumulators
    mm_ab<T, D>(s_w, S::kScratch, sP + warp * 16 * S::kProb, S::kProb, sV, S::kTile);
    __syncwarp();
    const float* orow = sS + row * S::kScratch + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; ++c) acc[c] = acc[c] * alpha + orow[c];
    __syncwarp();
  }

  if (qi < seqlen) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* og = o + (static_cast<int64_t>(bh) * seqlen + qi) * D + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; ++c) og[c] = from_f<T>(acc[c] * inv);
    if (half == 0) lse[static_cast<int64_t>(bh) * seqlen + qi] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
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

// For the warp's 16 query rows of (query tile q0, key tile k0), with Q, dO, K, V and the row stats in shared
// memory: P = exp(S * scale - lse) (also stored to sP with kStoreP), dP = dO V^T and dS = P * (dP - delta) into
// sdS. Both backward kernels form dS here, so the atomic and the ordered dQ sum the same terms.
template <typename T, int D, bool kStoreP>
__device__ __forceinline__ void form_ds(float* s_w, const T* sQ, const T* sdO, const T* sK, const T* sV,
                                        const float* sLse, const float* sDelta, T* sP, T* sdS, int q0, int k0,
                                        int seqlen, int causal, float scale_log2) {
  using S = Strides<D>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + (lane >> 1);
  const int half = lane & 1;
  mm_abt<T, D>(s_w, S::kScratch, sQ + warp * 16 * S::kTile, S::kTile, sK, S::kTile);
  __syncwarp();
  const int qi = q0 + row;
  const float row_lse = sLse[row];
  float pv[BC / 2];
#pragma unroll
  for (int c = 0; c < BC / 2; ++c) {
    const int kj = k0 + half * (BC / 2) + c;
    const bool ok = qi < seqlen && kj < seqlen && (!causal || kj <= qi);
    pv[c] = ok ? exp2f(s_w[(lane >> 1) * S::kScratch + half * (BC / 2) + c] * scale_log2 - row_lse) : 0.0f;
    if (kStoreP) sP[row * S::kProb + half * (BC / 2) + c] = from_f<T>(pv[c]);
  }
  __syncwarp();
  mm_abt<T, D>(s_w, S::kScratch, sdO + warp * 16 * S::kTile, S::kTile, sV, S::kTile);
  __syncwarp();
  const float row_delta = sDelta[row];
#pragma unroll
  for (int c = 0; c < BC / 2; ++c) {
    const float dp = s_w[(lane >> 1) * S::kScratch + half * (BC / 2) + c];
    sdS[row * S::kProb + half * (BC / 2) + c] = from_f<T>(pv[c] * (dp - row_delta));
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                             const T* __restrict__ v, const T* __restrict__ d_o,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ delta, float* __restrict__ dq_acc,
                                                             T* __restrict__ dk, T* __restrict__ dv, int H, int Hkv,
                                                             int seqlen, int causal, float scale, int atomic_dq) {
  using S = Strides<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BC * S::kTile;
  T* sQ = sV + BC * S::kTile;
  T* sdO = sQ + BR * S::kTile;
  T* sP = sdO + BR * S::kTile;
  T* sdS = sP + BR * S::kProb;
  float* sS = reinterpret_cast<float*>(sdS + BR * S::kProb);
  float* sLse = sS + BR * S::kScratch;  // log2-domain lse of the tile's rows (+inf past seqlen: P = 0)
  float* sDelta = sLse + BR;

  const int k0 = blockIdx.x * BC;
  const int bkv = blockIdx.y, b = bkv / Hkv, kvh = bkv % Hkv;
  const int group = H / Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;

  load_tile<T, D>(sK, k + static_cast<int64_t>(bkv) * seqlen * D, k0, seqlen);
  load_tile<T, D>(sV, v + static_cast<int64_t>(bkv) * seqlen * D, k0, seqlen);

  FragC acc_dk[D / 16], acc_dv[D / 16];  // rows [warp*16, +16) of this key tile, all D columns
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.0f);
    wmma::fill_fragment(acc_dv[n], 0.0f);
  }

  const int q_first = causal ? (k0 / BR) * BR : 0;  // earlier query tiles cannot see these keys
  for (int hq = 0; hq < group; ++hq) {
    const int bh = b * H + kvh * group + hq;
    const T* qb = q + static_cast<int64_t>(bh) * seqlen * D;
    const T* dob = d_o + static_cast<int64_t>(bh) * seqlen * D;
    for (int q0 = q_first; q0 < seqlen; q0 += BR) {
      __syncthreads();  // every warp is done with the previous tile's Q, dO, P, dS
      load_tile<T, D>(sQ, qb, q0, seqlen);
      load_tile<T, D>(sdO, dob, q0, seqlen);
      load_row_stats(sLse, sDelta, lse, delta, bh, q0, seqlen);
      __syncthreads();
      float* s_w = sS + warp * 16 * S::kScratch;
      form_ds<T, D, true>(s_w, sQ, sdO, sK, sV, sLse, sDelta, sP, sdS, q0, k0, seqlen, causal, scale_log2);
      __syncthreads();  // dV and dK below read every query row of P and dS

      // dV += P^T dO and dK += dS^T Q for the warp's 16 key rows
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
#pragma unroll
        for (int kk = 0; kk < BR; kk += 16) {
          FragAT<T> fa;
          FragB<T> fb;
          wmma::load_matrix_sync(fa, sP + kk * S::kProb + warp * 16, S::kProb);
          wmma::load_matrix_sync(fb, sdO + kk * S::kTile + n * 16, S::kTile);
          wmma::mma_sync(acc_dv[n], fa, fb, acc_dv[n]);
          wmma::load_matrix_sync(fa, sdS + kk * S::kProb + warp * 16, S::kProb);
          wmma::load_matrix_sync(fb, sQ + kk * S::kTile + n * 16, S::kTile);
          wmma::mma_sync(acc_dk[n], fa, fb, acc_dk[n]);
        }
      }
      if (!atomic_dq) continue;  // deterministic mode: flash_bwd_dq_kernel computes dQ
      // dQ[warp's 16 query rows] += scale * dS K, through the warp's scratch rows, into fp32 global
      mm_ab<T, D>(s_w, S::kScratch, sdS + warp * 16 * S::kProb, S::kProb, sK, S::kTile);
      __syncwarp();
      for (int i = lane; i < 16 * D; i += 32) {
        const int r = i / D, c = i % D;
        const int qr = q0 + warp * 16 + r;
        if (qr < seqlen) atomicAdd(dq_acc + (static_cast<int64_t>(bh) * seqlen + qr) * D + c,
                                   scale * s_w[r * S::kScratch + c]);
      }
    }
  }

  // dK (times the softmax scale) and dV for the key rows that exist
  __syncthreads();
  float* out_w = sS + warp * 16 * S::kScratch;
  for (int which = 0; which < 2; ++which) {
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
      wmma::store_matrix_sync(out_w + n * 16, which == 0 ? acc_dk[n] : acc_dv[n], S::kScratch, wmma::mem_row_major);
    __syncwarp();
    T* dst = which == 0 ? dk : dv;
    const float mul = which == 0 ? scale : 1.0f;
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = i / D, c = i % D;
      const int kr = k0 + warp * 16 + r;
      if (kr < seqlen) dst[(static_cast<int64_t>(bkv) * seqlen + kr) * D + c] = from_f<T>(mul * out_w[r * S::kScratch + c]);
    }
    __syncwarp();
  }
}

// Deterministic dQ: one block per (64-query tile, b*H + h); each warp keeps dQ for its 16 query rows in
// registers while the key tiles go by in increasing order, so the sum's order (and bits) never change.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                const T* __restrict__ v, const T* __restrict__ d_o,
                                                                const float* __restrict__ lse,
                                                                const float* __restrict__ delta, T* __restrict__ dq,
                                                                int H, int Hkv, int seqlen, int causal, float scale) {
  using S = Strides<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BR * S::kTile;
  T* sK = sdO + BR * S::kTile;
  T* sV = sK + BC * S::kTile;
  T* sdS = sV + BC * S::kTile;
  float* sS = reinterpret_cast<float*>(sdS + BR * S::kProb);
  float* sLse = sS + BR * S::kScratch;
  float* sDelta = sLse + BR;

  const int q0 = blockIdx.x * BR;
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int bkv = b * Hkv + h / (H / Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;

  load_tile<T, D>(sQ, q + static_cast<int64_t>(bh) * seqlen * D, q0, seqlen);
  load_tile<T, D>(sdO, d_o + static_cast<int64_t>(bh) * seqlen * D, q0, seqlen);
  load_row_stats(sLse, sDelta, lse, delta, bh, q0, seqlen);
  FragC acc_dq[D / 16];  // the warp's 16 query rows, all D columns
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc_dq[n], 0.0f);

  const T* kb = k + static_cast<int64_t>(bkv) * seqlen * D;
  const T* vb = v + static_cast<int64_t>(bkv) * seqlen * D;
  const int k_end = causal ? (q0 + BR < seqlen ? q0 + BR : seqlen) : seqlen;  // later keys are masked
  float* s_w = sS + warp * 16 * S::kScratch;
  for (int k0 = 0; k0 < k_end; k0 += BC) {
    __syncthreads();  // every warp is done with the previous key tile
    load_tile<T, D>(sK, kb, k0, seqlen);
    load_tile<T, D>(sV, vb, k0, seqlen);
    __syncthreads();
    form_ds<T, D, false>(s_w, sQ, sdO, sK, sV, sLse, sDelta, nullptr, sdS, q0, k0, seqlen, causal, scale_log2);
    __syncwarp();
    // dQ += dS K for the warp's rows: A = dS [16 x 64], B = K [64 x D], both row-major in shared memory
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
#pragma unroll
      for (int kk = 0; kk < BC; kk += 16) {
        FragA<T> fa;
        FragB<T> fb;
        wmma::load_matrix_sync(fa, sdS + warp * 16 * S::kProb + kk, S::kProb);
        wmma::load_matrix_sync(fb, sK + kk * S::kTile + n * 16, S::kTile);
        wmma::mma_sync(acc_dq[n], fa, fb, acc_dq[n]);
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(s_w + n * 16, acc_dq[n], S::kScratch, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * D; i += 32) {
    const int r = i / D, c = i % D;
    const int qr = q0 + warp * 16 + r;
    if (qr < seqlen) dq[(static_cast<int64_t>(bh) * seqlen + qr) * D + c] = from_f<T>(scale * s_w[r * S::kScratch + c]);
  }
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f<T>(src[i]);
}

template <int D> constexpr size_t fwd_smem_bytes() {
  using S = Strides<D>;
  return 2 * ((BR + 2 * BC) * S::kTile + BR * S::kProb) + 4 * BR * S::kScratch;
}
template <int D> constexpr size_t bwd_smem_bytes() {
  using S = Strides<D>;
  return 2 * ((2 * BC + 2 * BR) * S::kTile + 2 * BR * S::kProb) + 4 * (BR * S::kScratch + 2 * BR);
}
template <int D> constexpr size_t dq_smem_bytes() {
  using S = Strides<D>;
  return 2 * ((2 * BC + 2 * BR) * S::kTile + BR * S::kProb) + 4 * (BR * S::kScratch + 2 * BR);
}

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
                     float* delta, float* dq_acc, void* dq, void* dk, void* dv, int B, int H, int Hkv, int seqlen,
                     int causal, float scale, int deterministic, cudaStream_t stream) {
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
  dim3 grid((seqlen + BC - 1) / BC, B * Hkv);
  flash_bwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(d_o), lse,
      delta, dq_acc, static_cast<T*>(dk), static_cast<T*>(dv), H, Hkv, seqlen, causal, scale, deterministic ? 0 : 1);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
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
  const int64_t n = rows * D;
  const unsigned blocks = static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535);
  cast_kernel<T><<<blocks, 256, 0, stream>>>(dq_acc, static_cast<T*>(dq), n);
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

// Workspaces: delta [B*H*T] fp32, dq_acc [B*H*T*D] fp32 (unused when deterministic: dQ then comes from a
// second kernel that sums the key tiles in a fixed order).
cudaError_t moe_flash_attn_bwd(int dtype, const void* q, const void* k, const void* v, const void* o, const void* d_o,
                               const float* lse, float* delta, float* dq_acc, void* dq, void* dk, void* dv, int B, int H,
                               int Hkv, int seqlen, int D, int causal, float scale, int deterministic,
                               cudaStream_t stream) {
  using namespace moetrain_attn;
  if (Hkv < 1 || H % Hkv != 0 || seqlen < 1 || B < 1 || B * H > 65535) return cudaErrorInvalidValue;
#define MOE_BWD(TYPE, DIM)                                                                                         \
  return backward<TYPE, DIM>(q, k, v, o, d_o, lse, delta, dq_acc, dq, dk, dv, B, H, Hkv, seqlen, causal, scale, \
                             deterministic, stream)
  if (dtype == 1 && D == 64) MOE_BWD(__half, 64);
  if (dtype == 1 && D == 128) MOE_BWD(__half, 128);
  if (dtype == 2 && D == 64) MOE_BWD(__nv_bfloat16, 64);
  if (dtype == 2 && D == 128) MOE_BWD(__nv_bfloat16, 128);
#undef MOE_BWD
  return cudaErrorInvalidValue;
}

}  // extern "C"
