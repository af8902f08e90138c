// torch bindings for csrc/flash_attn.cu (built by parallel/fused_attention.py with torch.utils.cpp_extension
// on CUDA machines). Shapes and dtypes are checked here; the kernels see raw pointers and the current stream.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <cmath>
#include <limits>

extern "C" {
cudaError_t moe_flash_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int B,
                               int H, int Hkv, int seqlen, int D, int causal, float scale, cudaStream_t stream);
cudaError_t moe_flash_attn_bwd(int dtype, const void* q, const void* k, const void* v, const void* o, const void* d_o,
                               const float* lse, float* delta, float* dq_acc, float* dkv_acc, void* dq, void* dk,
                               void* dv, int B, int H, int Hkv, int seqlen, int D, int causal, float scale,
                               int deterministic, cudaStream_t stream);
}

namespace {

int dtype_code(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kHalf) return 1;
  if (t.scalar_type() == torch::kBFloat16) return 2;
  TORCH_CHECK(false, "fused attention takes float16 or bfloat16, got ", t.scalar_type());
  return -1;
}

void check_input(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be [batch, heads, seq, head_dim]");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), ", q has ",
              like.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// q [B, H, T, D], k/v [B, Hkv, T, D] -> (o [B, H, T, D], lse [B, H, T] fp32). poison: fill the outputs with NaN
// first (tests prove every element is written).
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal, bool poison) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  const int B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == D,
              "k and v must be [batch, kv_heads, seq, head_dim] matching q");
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B, H, T}, q.options().dtype(torch::kFloat));
  if (poison) {
    o.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  check(moe_flash_attn_fwd(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                           lse.data_ptr<float>(), B, H, Hkv, T, D, causal ? 1 : 0, 1.0f / std::sqrt(float(D)),
                           at::cuda::getCurrentCUDAStream()),
        "moe_flash_attn_fwd");
  return {o, lse};
}

// -> (dq, dk, dv)
std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor o,
                                    torch::Tensor lse, torch::Tensor d_o, bool causal, bool poison,
                                    bool deterministic) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  check_input(o, "o", q);
  check_input(d_o, "grad_out", q);
  TORCH_CHECK(lse.is_cuda() && lse.is_contiguous() && lse.scalar_type() == torch::kFloat, "lse must be fp32 CUDA");
  const int B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  auto dq = torch::empty_like(q);
  auto dk = torch::empty_like(k);
  auto dv = torch::empty_like(v);
  if (poison) {
    for (auto* t : {&dq, &dk, &dv}) t->fill_(std::numeric_limits<float>::quiet_NaN());
  }
  auto f32 = q.options().dtype(torch::kFloat);
  auto delta = torch::empty({B, H, T}, f32);
  // the atomic path sums dQ in an fp32 buffer; the deterministic one needs none
  auto dq_acc = deterministic ? torch::empty({0}, f32) : torch::empty({B, H, T, D}, f32);
  // with grouped-query heads every query head's dK / dV partial, summed per group in head order by the kernel
  auto dkv_acc = H == Hkv ? torch::empty({0}, f32) : torch::empty({2, B, H, T, D}, f32);
  check(moe_flash_attn_bwd(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), d_o.data_ptr(),
                           lse.data_ptr<float>(), delta.data_ptr<float>(), dq_acc.data_ptr<float>(),
                           dkv_acc.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H, Hkv, T, D, causal ? 1 : 0, 1.0f / std::sqrt(float(D)),
                           deterministic ? 1 : 0, at::cuda::getCurrentCUDAStream()),
        "moe_flash_attn_bwd");
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused attention forward: (o, lse)");
  m.def("backward", &backward, "fused attention backward: (dq, dk, dv); deterministic: dQ without atomics");
}
