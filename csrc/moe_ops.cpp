// torch bindings for csrc/moe_kernels.cu (built by moe/kernels.py with torch.utils.cpp_extension on CUDA
// machines). Tensors are checked here; the kernels see raw pointers and the current stream.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

extern "C" {
cudaError_t moe_route_topk(int dtype, const void* logits, const float* bias, int num_tokens, int E, int K,
                           int score_fn, int renormalize, int32_t* expert_TK, float* gate_TK, float* prob_sum_E,
                           cudaStream_t stream);
cudaError_t moe_rank_in_expert(const int32_t* expert_TK, const uint8_t* keep, int num_tokens, int K, int E, int order,
                               int32_t* rank_TK, int32_t* chunk_counts, int32_t* total_E, cudaStream_t stream);
int moe_rank_chunks(int num_tokens, int K);
cudaError_t moe_pack_rows(int dtype, const void* x_TD, const int32_t* pos_TK, int num_tokens, int K, int D, void* out,
                          cudaStream_t stream);
cudaError_t moe_pack_rows_backward(int dtype, const void* d_out, const int32_t* pos_TK, int num_tokens, int K, int D,
                                   void* dx_TD, cudaStream_t stream);
cudaError_t moe_combine_rows(int dtype, const void* rows, const int32_t* pos_TK, const float* gate_TK, int num_tokens,
                             int K, int D, void* y_TD, cudaStream_t stream);
cudaError_t moe_combine_rows_backward(int dtype, const void* dy_TD, const void* rows, const int32_t* pos_TK,
                                      const float* gate_TK, int num_tokens, int K, int D, void* d_rows,
                                      float* d_gate_TK, cudaStream_t stream);
}

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return 0;
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "moetrain kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

// The argument contract of moe/kernels.py (check_*_args), repeated here so a direct caller gets the same
// named errors instead of an out-of-bounds kernel.
void check_same_device(const torch::Tensor& a, const char* an, const torch::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

void check_positions(const torch::Tensor& pos_TK, const torch::Tensor& rows, const char* rows_name) {
  check_cuda(pos_TK, "pos");
  TORCH_CHECK(pos_TK.dim() == 2 && pos_TK.scalar_type() == torch::kInt32, "pos must be int32 [T, K], got ",
              pos_TK.sizes(), " ", pos_TK.scalar_type());
  TORCH_CHECK(rows.dim() == 2, rows_name, " must be 2-D, got ", rows.sizes());
  check_same_device(pos_TK, "pos", rows, rows_name);
}

void check_gates(const torch::Tensor& gate_TK, const torch::Tensor& pos_TK) {
  TORCH_CHECK(gate_TK.sizes() == pos_TK.sizes(), "gates ", gate_TK.sizes(), " must match positions ", pos_TK.sizes());
  check_same_device(gate_TK, "gates", pos_TK, "pos");
}

constexpr int kMaxExpertsRoute = 256;  // csrc/moe_kernels.cu: kMaxExpertsPerLane (8) x a warp
constexpr int kMaxChoices = 8;         // csrc/moe_kernels.cu: kMaxK

// -> (expert_TK int32, gate_TK float32, prob_sum_E float32)
std::vector<torch::Tensor> route_topk(torch::Tensor logits_TE, c10::optional<torch::Tensor> bias_E, int64_t k,
                                      bool sigmoid, bool renormalize) {
  check_cuda(logits_TE, "logits");
  TORCH_CHECK(logits_TE.dim() == 2, "logits must be [T, E], got ", logits_TE.sizes());
  const int T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(E <= kMaxExpertsRoute, "route_topk takes at most ", kMaxExpertsRoute, " experts, got ", E);
  TORCH_CHECK(k >= 1 && k <= kMaxChoices && k <= E, "route_topk: k=", k, " must be in [1, min(E=", E, ", ",
              kMaxChoices, ")]");
  auto i32 = logits_TE.options().dtype(torch::kInt32);
  auto f32 = logits_TE.options().dtype(torch::kFloat);
  auto expert = torch::empty({T, k}, i32);
  auto gate = torch::empty({T, k}, f32);
  auto prob_sum = torch::zeros({E}, f32);
  const float* bias = nullptr;
  torch::Tensor b;
  if (bias_E.has_value()) {
    b = bias_E->to(torch::kFloat).contiguous();
    check_cuda(b, "bias");
    check_same_device(b, "bias", logits_TE, "logits");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == E, "bias must be [E=", E, "], got ", b.sizes());
    bias = b.data_ptr<float>();
  }
  check(moe_route_topk(dtype_code(logits_TE), logits_TE.data_ptr(), bias, T, E, static_cast<int>(k), sigmoid ? 1 : 0,
                       renormalize ? 1 : 0, expert.data_ptr<int32_t>(), gate.data_ptr<float>(),
                       prob_sum.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "moe_route_topk");
  return {expert, gate, prob_sum};
}

// -> (rank_TK int32 (-1 where not kept), total_E int32); order 0 token-major, 1 choice-major
std::vector<torch::Tensor> rank_in_expert(torch::Tensor expert_TK, c10::optional<torch::Tensor> keep_TK,
                                          int64_t num_experts, int64_t order) {
  check_cuda(expert_TK, "expert_TK");
  TORCH_CHECK(expert_TK.scalar_type() == torch::kInt32 && expert_TK.dim() == 2, "expert_TK must be int32 [T, K], got ",
              expert_TK.sizes(), " ", expert_TK.scalar_type());
  TORCH_CHECK(num_experts >= 1, "num_experts=", num_experts, " must be >= 1");
  TORCH_CHECK(order == 0 || order == 1, "order=", order, " must be 0 (token-major) or 1 (choice-major)");
  int smem = 0;  // rank_chunks_kernel keeps one int32 counter per expert in dynamic shared memory
  check(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlock, expert_TK.get_device()),
        "cudaDeviceGetAttribute");
  TORCH_CHECK(4 * num_experts <= smem, "rank_in_expert: ", num_experts, " experts need ", 4 * num_experts,
              " bytes of shared memory per block; the device gives ", smem);
  const int T = expert_TK.size(0), K = expert_TK.size(1);
  auto i32 = expert_TK.options();
  auto rank = torch::empty({T, K}, i32);
  auto total = torch::empty({num_experts}, i32);
  auto scratch = torch::empty({std::max(moe_rank_chunks(T, K), 1), static_cast<int>(num_experts)}, i32);
  const uint8_t* keep = nullptr;
  torch::Tensor kp;
  if (keep_TK.has_value()) {
    kp = keep_TK->to(torch::kUInt8).contiguous();
    check_same_device(kp, "keep", expert_TK, "expert_TK");
    TORCH_CHECK(kp.sizes() == expert_TK.sizes(), "keep ", kp.sizes(), " must match expert_TK ", expert_TK.sizes());
    keep = kp.data_ptr<uint8_t>();
  }
  check(moe_rank_in_expert(expert_TK.data_ptr<int32_t>(), keep, T, K, static_cast<int>(num_experts),
                           static_cast<int>(order), rank.data_ptr<int32_t>(), scratch.data_ptr<int32_t>(),
                           total.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()),
        "moe_rank_in_expert");
  return {rank, total};
}

torch::Tensor pack_rows(torch::Tensor x_TD, torch::Tensor pos_TK, int64_t rows) {
  check_cuda(x_TD, "x");
  check_positions(pos_TK, x_TD, "x");
  TORCH_CHECK(pos_TK.size(0) == x_TD.size(0), "pos has ", pos_TK.size(0), " tokens but x has ", x_TD.size(0));
  TORCH_CHECK(rows >= 0, "rows=", rows, " must be >= 0");
  auto out = torch::empty({rows, x_TD.size(1)}, x_TD.options());
  check(moe_pack_rows(dtype_code(x_TD), x_TD.data_ptr(), pos_TK.data_ptr<int32_t>(), x_TD.size(0), pos_TK.size(1),
                      x_TD.size(1), out.data_ptr(), at::cuda::getCurrentCUDAStream()),
        "moe_pack_rows");
  return out;
}

torch::Tensor pack_rows_backward(torch::Tensor d_out, torch::Tensor pos_TK, int64_t num_tokens) {
  check_cuda(d_out, "d_out");
  check_positions(pos_TK, d_out, "d_out");
  TORCH_CHECK(pos_TK.size(0) == num_tokens, "pos has ", pos_TK.size(0), " tokens, expected ", num_tokens);
  auto dx = torch::empty({num_tokens, d_out.size(1)}, d_out.options());
  check(moe_pack_rows_backward(dtype_code(d_out), d_out.data_ptr(), pos_TK.data_ptr<int32_t>(),
                               static_cast<int>(num_tokens), pos_TK.size(1), d_out.size(1), dx.data_ptr(),
                               at::cuda::getCurrentCUDAStream()),
        "moe_pack_rows_backward");
  return dx;
}

torch::Tensor combine_rows(torch::Tensor rows, torch::Tensor pos_TK, torch::Tensor gate_TK) {
  check_cuda(rows, "rows");
  check_positions(pos_TK, rows, "rows");
  check_gates(gate_TK, pos_TK);
  auto gate = gate_TK.to(torch::kFloat).contiguous();
  auto y = torch::empty({pos_TK.size(0), rows.size(1)}, rows.options());
  check(moe_combine_rows(dtype_code(rows), rows.data_ptr(), pos_TK.data_ptr<int32_t>(), gate.data_ptr<float>(),
                         pos_TK.size(0), pos_TK.size(1), rows.size(1), y.data_ptr(), at::cuda::getCurrentCUDAStream()),
        "moe_combine_rows");
  return y;
}

std::vector<torch::Tensor> combine_rows_backward(torch::Tensor dy_TD, torch::Tensor rows, torch::Tensor pos_TK,
                                                 torch::Tensor gate_TK) {
  check_cuda(dy_TD, "dy");
  check_cuda(rows, "rows");
  check_positions(pos_TK, rows, "rows");
  check_gates(gate_TK, pos_TK);
  check_same_device(dy_TD, "dy", rows, "rows");
  TORCH_CHECK(dy_TD.scalar_type() == rows.scalar_type(), "dy is ", dy_TD.scalar_type(), " but rows are ",
              rows.scalar_type());
  TORCH_CHECK(dy_TD.dim() == 2 && dy_TD.size(0) == pos_TK.size(0) && dy_TD.size(1) == rows.size(1), "dy ",
              dy_TD.sizes(), " must be [T=", pos_TK.size(0), ", D=", rows.size(1), "]");
  auto gate = gate_TK.to(torch::kFloat).contiguous();
  auto d_rows = torch::zeros_like(rows);
  auto d_gate = torch::empty({pos_TK.size(0), pos_TK.size(1)}, gate.options());
  check(moe_combine_rows_backward(dtype_code(rows), dy_TD.data_ptr(), rows.data_ptr(), pos_TK.data_ptr<int32_t>(),
                                  gate.data_ptr<float>(), pos_TK.size(0), pos_TK.size(1), rows.size(1),
                                  d_rows.data_ptr(), d_gate.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "moe_combine_rows_backward");
  return {d_rows, d_gate};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("route_topk", &route_topk, "softmax|sigmoid scores, top-k, gates, per-expert prob sums");
  m.def("rank_in_expert", &rank_in_expert, "each assignment's rank inside its expert, per-expert totals");
  m.def("pack_rows", &pack_rows, "out[pos[t,k]] = x[t]");
  m.def("pack_rows_backward", &pack_rows_backward, "dx[t] = sum_k d_out[pos[t,k]]");
  m.def("combine_rows", &combine_rows, "y[t] = sum_k gate[t,k] rows[pos[t,k]]");
  m.def("combine_rows_backward", &combine_rows_backward, "d_rows, d_gate of combine_rows");
}
