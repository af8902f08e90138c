// MoE routing and all-to-all packing kernels (issue #8). No torch headers: plain `nvcc -arch=sm_90 -c`
// compiles this file; csrc bindings (later) pass raw device pointers and a stream.
//
// Conventions: T tokens, E experts, K choices per token, D hidden size. "Assignment" a = t*K + k
// (token-major). Scores and reductions in fp32 whatever the storage type (float, half, bfloat16).
//
//   moe_route_topk        scores (softmax | sigmoid + selection bias), top-k, renormalised gates,
//                         per-expert probability sums (aux-loss values); one warp per token
//   moe_rank_in_expert    each assignment's rank inside its expert in a given order (token-major, or
//                         choice-major for GShard's "position" capacity), deterministic: chunks of
//                         assignments are ranked by one warp each, chunk offsets scanned per expert
//   moe_pack_rows         out[pos[a]] = x[a / K]          (16-byte vector copies when D allows)
//   moe_combine_rows      y[t] = sum_k gate[t,k] * rows[pos[t,k]]; and its backward (rows, gates)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace moetrain {

constexpr int kWarp = 32;
constexpr int kMaxExpertsPerLane = 8;  // E <= 256 in the routing kernel
constexpr int kMaxK = 8;
constexpr int kChunk = 1024;           // assignments ranked by one warp

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------------------------ routing
// One warp per token (warps stride over tokens); lane l holds experts l, l+32, ... (up to
// kMaxExpertsPerLane of them). score_fn 0: softmax(logits); 1: sigmoid(logits). Selection uses
// score + bias[e] (bias may be null: the aux-loss-free expert bias changes which experts win, never the
// gate values). Ties go to the lower expert id, as our reference sorts. Per-expert score sums are
// gathered in shared memory per block, then added to prob_sum_E once per block and expert.
template <typename T>
__device__ __forceinline__ void route_one_token(const T* __restrict__ row, const float* __restrict__ bias, int t,
                                                int lane, int E, int K, int score_fn, int renormalize,
                                                int32_t* __restrict__ expert_TK, float* __restrict__ gate_TK,
                                                float* block_sum) {
  float score[kMaxExpertsPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    int e = lane + i * kWarp;
    score[i] = e < E ? to_f(row[e]) : -INFINITY;
    mx = fmaxf(mx, score[i]);
  }
  if (score_fn == 0) {
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      int e = lane + i * kWarp;
      score[i] = e < E ? expf(score[i] - mx) : 0.f;
      s += score[i];
    }
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) score[i] /= s;
  } else {
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      int e = lane + i * kWarp;
      score[i] = e < E ? 1.f / (1.f + expf(-score[i])) : 0.f;
    }
  }
  if (block_sum != nullptr) {
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      int e = lane + i * kWarp;
      if (e < E) atomicAdd(block_sum + e, score[i]);  // shared-memory atomics
    }
  }
  // k rounds of warp arg-max over (score + bias), lowest expert id on ties
  bool taken[kMaxExpertsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) taken[i] = false;
  float chosen[kMaxK];
  int chosen_e[kMaxK];
  float total = 0.f;
  // A NaN key (a NaN logit, or the whole row after softmax) ranks as -inf, below every real score, so
  // some expert is always chosen (the lowest free ids when every key is NaN), as the torch reference's
  // stable sort does; the id is clamped to [0, E) so nothing downstream can index out of bounds.
  constexpr int kNone = 0x7fffffff;
  for (int k = 0; k < K; ++k) {
    float best = -INFINITY;
    int best_e = kNone;
    float best_score = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      int e = lane + i * kWarp;
      if (e >= E || taken[i]) continue;
      float key = score[i] + (bias != nullptr ? bias[e] : 0.f);
      if (key != key) key = -INFINITY;
      if (best_e == kNone || key > best || (key == best && e < best_e)) {
        best = key; best_e = e; best_score = score[i];
      }
    }
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      float ob = __shfl_xor_sync(0xffffffffu, best, o);
      int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      float os = __shfl_xor_sync(0xffffffffu, best_score, o);
      if (oe != kNone && (best_e == kNone || ob > best || (ob == best && oe < best_e))) {
        best = ob; best_e = oe; best_score = os;
      }
    }
    best_e = best_e < 0 ? 0 : (best_e >= E ? E - 1 : best_e);  // K <= E: only a corrupt input gets here
    if (best_e % kWarp == lane) taken[best_e / kWarp] = true;
    chosen[k] = best_score;
    chosen_e[k] = best_e;
    total += best_score;
  }
  if (lane == 0) {
    for (int k = 0; k < K; ++k) {
      expert_TK[static_cast<int64_t>(t) * K + k] = chosen_e[k];
      gate_TK[static_cast<int64_t>(t) * K + k] = renormalize ? chosen[k] / total : chosen[k];
    }
  }
}

template <typename T>
__global__ void route_topk_kernel(const T* __restrict__ logits, const float* __restrict__ bias, int num_tokens,
                                  int E, int K, int score_fn, int renormalize, int32_t* __restrict__ expert_TK,
                                  float* __restrict__ gate_TK, float* __restrict__ prob_sum_E) {
  __shared__ float block_sum[kWarp * kMaxExpertsPerLane];
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_sum[e] = 0.f;
  __syncthreads();
  const int warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int t = blockIdx.x * warps_per_block + threadIdx.x / kWarp; t < num_tokens;
       t += gridDim.x * warps_per_block) {
    route_one_token<T>(logits + static_cast<int64_t>(t) * E, bias, t, lane, E, K, score_fn, renormalize, expert_TK,
                       gate_TK, prob_sum_E != nullptr ? block_sum : nullptr);
  }
  __syncthreads();
  if (prob_sum_E != nullptr)
    for (int e = threadIdx.x; e < E; e += blockDim.x) atomicAdd(prob_sum_E + e, block_sum[e]);
}


// ------------------------------------------------------------------------------------ ranking
// Order 0 visits assignment i as (t = i / K, k = i % K); order 1 (choice-major) as (k = i / T, t = i % T).
// keep (nullable): only kept assignments are ranked (the others get rank -1).
__device__ __forceinline__ int64_t visit(int64_t i, int num_tokens, int K, int order) {
  if (order == 0) return i;
  int64_t k = i / num_tokens, t = i % num_tokens;
  return t * K + k;
}

// Pass 1: one warp per chunk; rank inside the chunk with __match_any_sync, counts per (chunk, expert).
__global__ void rank_chunks_kernel(const int32_t* __restrict__ expert_TK, const uint8_t* __restrict__ keep,
                                   int num_tokens, int K, int E, int order, int32_t* __restrict__ rank_TK,
                                   int32_t* __restrict__ chunk_counts /* [chunks, E] */) {
  extern __shared__ int32_t counter[];  // E
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += kWarp) counter[e] = 0;
  __syncwarp();
  const int64_t n = static_cast<int64_t>(num_tokens) * K;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int64_t base = begin; base < begin + kChunk && base < n; base += kWarp) {
    int64_t i = base + lane;
    bool valid = i < n && i < begin + kChunk;
    int64_t a = valid ? visit(i, num_tokens, K, order) : 0;
    bool ranked = valid && (keep == nullptr || keep[a]);
    int e = ranked ? expert_TK[a] : -1 - lane;  // distinct dummies never match a real expert
    if (ranked && (e < 0 || e >= E)) {  // an id outside [0, E) would index the shared counters out of bounds
      ranked = false;
      e = -1 - lane;
    }
    unsigned peers = __match_any_sync(0xffffffffu, e);
    unsigned below = peers & ((1u << lane) - 1u);
    int before = __popc(below);
    int leader = __ffs(peers) - 1;
    int start = 0;
    if (ranked && lane == leader) start = counter[e];
    start = __shfl_sync(0xffffffffu, start, leader);
    if (ranked) rank_TK[a] = start + before;
    else if (valid) rank_TK[a] = -1;
    __syncwarp();
    if (ranked && lane == leader) counter[e] = start + __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < E; e += kWarp) chunk_counts[static_cast<int64_t>(blockIdx.x) * E + e] = counter[e];
}

// Pass 2: per expert, exclusive scan of its chunk counts (in place) and its total.
__global__ void scan_chunks_kernel(int32_t* __restrict__ chunk_counts, int chunks, int E,
                                   int32_t* __restrict__ total_E) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t run = 0;
  for (int c = 0; c < chunks; ++c) {
    int32_t v = chunk_counts[static_cast<int64_t>(c) * E + e];
    chunk_counts[static_cast<int64_t>(c) * E + e] = run;
    run += v;
  }
  total_E[e] = run;
}

// Pass 3: rank += the chunk's offset for its expert.
__global__ void add_offsets_kernel(const int32_t* __restrict__ expert_TK, int num_tokens, int K, int E, int order,
                                   const int32_t* __restrict__ chunk_offsets, int32_t* __restrict__ rank_TK) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t n = static_cast<int64_t>(num_tokens) * K;
  if (i >= n) return;
  int64_t a = visit(i, num_tokens, K, order);
  int32_t r = rank_TK[a];
  if (r < 0) return;
  rank_TK[a] = r + chunk_offsets[(i / kChunk) * E + expert_TK[a]];
}

// ------------------------------------------------------------------------------------ packing
template <typename T, typename V>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, int D) {
  constexpr int per = sizeof(V) / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(dst) % sizeof(V) == 0) &&
                       (reinterpret_cast<uintptr_t>(src) % sizeof(V) == 0) && (D % per == 0);
  if (aligned) {
    const V* s = reinterpret_cast<const V*>(src);
    V* d = reinterpret_cast<V*>(dst);
    for (int j = threadIdx.x; j < D / per; j += blockDim.x) d[j] = s[j];
  } else {
    for (int j = threadIdx.x; j < D; j += blockDim.x) dst[j] = src[j];
  }
}

// out[pos_TK[a]] = x[a / K] for every assignment with pos >= 0 (dropped ones: pos -1). One block per assignment.
template <typename T>
__global__ void pack_rows_kernel(const T* __restrict__ x_TD, const int32_t* __restrict__ pos_TK, int64_t n, int K,
                                 int D, T* __restrict__ out) {
  for (int64_t a = blockIdx.x; a < n; a += gridDim.x) {
    int32_t p = pos_TK[a];
    if (p < 0) continue;
    copy_row<T, uint4>(out + static_cast<int64_t>(p) * D, x_TD + (a / K) * static_cast<int64_t>(D), D);
  }
}

// y[t] = sum_k gate[t,k] * rows[pos[t,k]] (fp32 accumulation); dropped choices (pos -1) contribute 0.
template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ rows, const int32_t* __restrict__ pos_TK,
                                    const float* __restrict__ gate_TK, int num_tokens, int K, int D,
                                    T* __restrict__ y_TD) {
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        int32_t p = pos_TK[static_cast<int64_t>(t) * K + k];
        if (p >= 0) acc += gate_TK[static_cast<int64_t>(t) * K + k] * to_f(rows[static_cast<int64_t>(p) * D + j]);
      }
      y_TD[static_cast<int64_t>(t) * D + j] = from_f<T>(acc);
    }
  }
}

// Backward of combine: d_rows[pos[t,k]] = gate[t,k] * dy[t]; d_gate[t,k] = <dy[t], rows[pos[t,k]]>.
// One block per token; d_rows rows of dropped choices are untouched (the caller zero-fills).
template <typename T>
__global__ void combine_rows_backward_kernel(const T* __restrict__ dy_TD, const T* __restrict__ rows,
                                             const int32_t* __restrict__ pos_TK, const float* __restrict__ gate_TK,
                                             int num_tokens, int K, int D, T* __restrict__ d_rows,
                                             float* __restrict__ d_gate_TK) {
  __shared__ float partial[kWarp];
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int k = 0; k < K; ++k) {
      const int64_t a = static_cast<int64_t>(t) * K + k;
      const int32_t p = pos_TK[a];
      float dot = 0.f;
      if (p >= 0) {
        const float g = gate_TK[a];
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
          float dy = to_f(dy_TD[static_cast<int64_t>(t) * D + j]);
          d_rows[static_cast<int64_t>(p) * D + j] = from_f<T>(g * dy);
          dot += dy * to_f(rows[static_cast<int64_t>(p) * D + j]);
        }
      }
      dot = warp_sum(dot);
      if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = dot;
      __syncthreads();
      if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < (blockDim.x + kWarp - 1) / kWarp; ++w) s += partial[w];
        d_gate_TK[a] = p >= 0 ? s : 0.f;
      }
      __syncthreads();
    }
  }
}

// Backward of pack: dx[t] = sum_k d_out[pos[t,k]] (fp32 accumulation).
template <typename T>
__global__ void pack_rows_backward_kernel(const T* __restrict__ d_out, const int32_t* __restrict__ pos_TK,
                                          int num_tokens, int K, int D, T* __restrict__ dx_TD) {
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        int32_t p = pos_TK[static_cast<int64_t>(t) * K + k];
        if (p >= 0) acc += to_f(d_out[static_cast<int64_t>(p) * D + j]);
      }
      dx_TD[static_cast<int64_t>(t) * D + j] = from_f<T>(acc);
    }
  }
}

}  // namespace moetrain

// ------------------------------------------------------------------------------------ C launchers
// dtype: 0 float32, 1 float16, 2 bfloat16. Every launcher returns a cudaError_t (0 = success).
namespace {
template <template <typename> class F, typename... Args>
cudaError_t by_dtype(int dtype, Args... args) {
  switch (dtype) {
    case 0: return F<float>::run(args...);
    case 1: return F<__half>::run(args...);
    case 2: return F<__nv_bfloat16>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

int grid_for(int64_t n, int cap = 65535 * 8) { return static_cast<int>(n < cap ? (n > 0 ? n : 1) : cap); }

template <typename T> struct Route {
  static cudaError_t run(const void* logits, const float* bias, int T_, int E, int K, int score_fn, int renorm,
                         int32_t* expert_TK, float* gate_TK, float* prob_sum_E, cudaStream_t s) {
    constexpr int warps = 8;
    int blocks = (T_ + warps - 1) / warps;
    blocks = blocks < 1024 ? blocks : 1024;  // warps stride over tokens: fewer blocks, fewer global atomics
    if (blocks > 0)
      moetrain::route_topk_kernel<T><<<blocks, warps * 32, 0, s>>>(static_cast<const T*>(logits), bias, T_, E, K,
                                                                    score_fn, renorm, expert_TK, gate_TK, prob_sum_E);
    return cudaGetLastError();
  }
};

template <typename T> struct Pack {
  static cudaError_t run(const void* x, const int32_t* pos, int64_t n, int K, int D, void* out, cudaStream_t s) {
    if (n > 0)
      moetrain::pack_rows_kernel<T><<<grid_for(n), 128, 0, s>>>(static_cast<const T*>(x), pos, n, K, D,
                                                                  static_cast<T*>(out));
    return cudaGetLastError();
  }
};

template <typename T> struct PackBack {
  static cudaError_t run(const void* d_out, const int32_t* pos, int T_, int K, int D, void* dx, cudaStream_t s) {
    if (T_ > 0)
      moetrain::pack_rows_backward_kernel<T><<<grid_for(T_), 128, 0, s>>>(static_cast<const T*>(d_out), pos, T_, K,
                                                                            D, static_cast<T*>(dx));
    return cudaGetLastError();
  }
};

template <typename T> struct Combine {
  static cudaError_t run(const void* rows, const int32_t* pos, const float* gate, int T_, int K, int D, void* y,
                         cudaStream_t s) {
    if (T_ > 0)
      moetrain::combine_rows_kernel<T><<<grid_for(T_), 128, 0, s>>>(static_cast<const T*>(rows), pos, gate, T_, K, D,
                                                                      static_cast<T*>(y));
    return cudaGetLastError();
  }
};

template <typename T> struct CombineBack {
  static cudaError_t run(const void* dy, const void* rows, const int32_t* pos, const float* gate, int T_, int K, int D,
                         void* d_rows, float* d_gate, cudaStream_t s) {
    if (T_ > 0)
      moetrain::combine_rows_backward_kernel<T><<<grid_for(T_), 128, 0, s>>>(
          static_cast<const T*>(dy), static_cast<const T*>(rows), pos, gate, T_, K, D, static_cast<T*>(d_rows), d_gate);
    return cudaGetLastError();
  }
};
}  // namespace

extern "C" {

cudaError_t moe_route_topk(int dtype, const void* logits, const float* bias, int num_tokens, int E, int K,
                           int score_fn, int renormalize, int32_t* expert_TK, float* gate_TK, float* prob_sum_E,
                           cudaStream_t stream) {
  if (E > 32 * moetrain::kMaxExpertsPerLane || K > moetrain::kMaxK || K > E || K < 1) return cudaErrorInvalidValue;
  return by_dtype<Route>(dtype, logits, bias, num_tokens, E, K, score_fn, renormalize, expert_TK, gate_TK, prob_sum_E,
                         stream);
}

// Scratch: chunk_counts needs ceil(T*K / 1024) * E int32. rank_TK gets each ranked assignment's rank in its expert
// (-1 where keep is 0), total_E the per-expert totals.
cudaError_t moe_rank_in_expert(const int32_t* expert_TK, const uint8_t* keep, int num_tokens, int K, int E, int order,
                               int32_t* rank_TK, int32_t* chunk_counts, int32_t* total_E, cudaStream_t stream) {
  int64_t n = static_cast<int64_t>(num_tokens) * K;
  int chunks = static_cast<int>((n + moetrain::kChunk - 1) / moetrain::kChunk);
  if (n == 0) {
    return cudaMemsetAsync(total_E, 0, sizeof(int32_t) * E, stream);
  }
  moetrain::rank_chunks_kernel<<<chunks, 32, sizeof(int32_t) * E, stream>>>(expert_TK, keep, num_tokens, K, E, order,
                                                                          rank_TK, chunk_counts);
  moetrain::scan_chunks_kernel<<<(E + 127) / 128, 128, 0, stream>>>(chunk_counts, chunks, E, total_E);
  moetrain::add_offsets_kernel<<<static_cast<int>((n + 255) / 256), 256, 0, stream>>>(expert_TK, num_tokens, K, E,
                                                                                      order, chunk_counts, rank_TK);
  return cudaGetLastError();
}

int moe_rank_chunks(int num_tokens, int K) {
  int64_t n = static_cast<int64_t>(num_tokens) * K;
  return static_cast<int>((n + moetrain::kChunk - 1) / moetrain::kChunk);
}

cudaError_t moe_pack_rows(int dtype, const void* x_TD, const int32_t* pos_TK, int num_tokens, int K, int D, void* out,
                          cudaStream_t stream) {
  return by_dtype<Pack>(dtype, x_TD, pos_TK, static_cast<int64_t>(num_tokens) * K, K, D, out, stream);
}

cudaError_t moe_pack_rows_backward(int dtype, const void* d_out, const int32_t* pos_TK, int num_tokens, int K, int D,
                                   void* dx_TD, cudaStream_t stream) {
  return by_dtype<PackBack>(dtype, d_out, pos_TK, num_tokens, K, D, dx_TD, stream);
}

cudaError_t moe_combine_rows(int dtype, const void* rows, const int32_t* pos_TK, const float* gate_TK, int num_tokens,
                             int K, int D, void* y_TD, cudaStream_t stream) {
  return by_dtype<Combine>(dtype, rows, pos_TK, gate_TK, num_tokens, K, D, y_TD, stream);
}

cudaError_t moe_combine_rows_backward(int dtype, const void* dy_TD, const void* rows, const int32_t* pos_TK,
                                      const float* gate_TK, int num_tokens, int K, int D, void* d_rows,
                                      float* d_gate_TK, cudaStream_t stream) {
  return by_dtype<CombineBack>(dtype, dy_TD, rows, pos_TK, gate_TK, num_tokens, K, D, d_rows, d_gate_TK, stream);
}

}  // extern "C"
