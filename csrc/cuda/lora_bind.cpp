// CUDA kernels of fastdense::_mt_lora_fwd / _mt_lora_bwd (schemas in
// csrc/lora_schema.cpp, tensor contract and semantics in fastdense/ops/lora.py
// and fastdense/ops/_lora_torch.py).
//
// The large GEMMs (base = x W0^T + b, the shrink over the concatenated A's and
// the backward's dx / dW / dA / dB) go to cuBLAS through ATen; the two kernels
// of lora.cu replace what would otherwise be G separate passes over (M, N)
// arrays: the grouped expand of the forward, and grad_base + dh in the
// backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "bind_common.h"
#include "lora.h"

namespace {

using at::Tensor;
namespace fdc = fastdense::cuda;

constexpr const char* kOp = "fastdense mt_lora_linear (cuda): ";

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

fdc::Dtype kernel_dtype(at::ScalarType t) {
  const std::optional<fdc::Dtype> d = fdc::element_dtype(t);
  TORCH_CHECK(d.has_value(), kOp, "x must be float32, float16 or bfloat16, got ", t);
  return *d;
}

void check_like_x(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kOp, name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type(), "; all tensors must share one dtype");
}

int device_attribute(cudaDeviceAttr attr, int device) { return fdc::device_attribute(attr, device, kOp); }

void check_launch(cudaError_t err, const char* what) { fdc::check_cuda(err, kOp, what); }

// Sizes of one call, after every argument has been checked against them.
struct Problem {
  int64_t M, N, K, R, G;
  std::vector<int64_t> start;  // first column of adapter a in h / lora_b
};

Problem check_problem(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                      const Tensor& lora_a, const Tensor& lora_b, c10::IntArrayRef ranks,
                      c10::ArrayRef<double> scales, const std::optional<Tensor>& x_lora,
                      const std::optional<Tensor>& x_tasks) {
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got one on ", x.device());
  kernel_dtype(x.scalar_type());
  TORCH_CHECK(x.dim() == 2, kOp, "x must have shape (M, K), got ", x.sizes());
  Problem p;
  p.M = x.size(0);
  p.K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == p.K, kOp, "weight must have shape (N, K=", p.K, "), got ",
              weight.sizes());
  check_like_x(weight, "weight", x);
  p.N = weight.size(0);
  TORCH_CHECK(p.M <= fdc::kLoraMaxDim && p.N <= fdc::kLoraMaxDim, kOp, "M = ", p.M, " and N = ", p.N,
              " must each fit in int32 for the CUDA kernels");
  if (has(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.N, kOp, "bias must have shape (N=", p.N, ",), got ",
                bias->sizes());
    check_like_x(*bias, "bias", x);
  }

  p.G = static_cast<int64_t>(ranks.size());
  TORCH_CHECK(p.G >= 1 && p.G <= fdc::kLoraMaxAdapters, kOp, "ranks must list 1 to ", fdc::kLoraMaxAdapters,
              " adapters (shared first, then tasks), got ", p.G);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == p.G, kOp, "scales must have one entry per adapter (", p.G,
              "), got ", scales.size());
  p.R = 0;
  for (const int64_t r : ranks) {
    TORCH_CHECK(r >= 1, kOp, "ranks must be positive, got ", ranks);
    p.start.push_back(p.R);
    p.R += r;
  }
  const int64_t padded = fdc::mt_lora_padded_rank(ranks.data(), static_cast<int>(p.G));
  TORCH_CHECK(padded <= fdc::kLoraMaxPaddedRank, kOp, "sum(ranks) is too large for the CUDA kernels: with each ",
              "rank rounded up to a multiple of 4 it is ", padded, " (ranks ", ranks, "), the limit is ",
              fdc::kLoraMaxPaddedRank, ". Use the triton or torch backend for larger ranks.");

  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(0) == p.R && lora_a.size(1) == p.K, kOp,
              "lora_a must have shape (sum(ranks)=", p.R, ", K=", p.K, "), got ", lora_a.sizes());
  check_like_x(lora_a, "lora_a", x);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == p.N && lora_b.size(1) == p.R, kOp,
              "lora_b must have shape (N=", p.N, ", sum(ranks)=", p.R, "), got ", lora_b.sizes());
  check_like_x(lora_b, "lora_b", x);
  if (has(x_lora)) {
    TORCH_CHECK(x_lora->sizes() == x.sizes(), kOp, "x_lora must have the shape of x ", x.sizes(), ", got ",
                x_lora->sizes());
    check_like_x(*x_lora, "x_lora", x);
  }
  if (has(x_tasks)) {
    TORCH_CHECK(x_tasks->dim() == 3 && x_tasks->size(0) == p.G - 1 && x_tasks->size(1) == p.M &&
                    x_tasks->size(2) == p.K,
                kOp, "x_tasks must have shape (T=", p.G - 1, ", M=", p.M, ", K=", p.K, "), got ", x_tasks->sizes());
    check_like_x(*x_tasks, "x_tasks", x);
  }
  return p;
}

// LoRA input of adapter a: x_tasks[a - 1] for task adapters when given, else u.
Tensor adapter_input(const Tensor& u, const std::optional<Tensor>& x_tasks, int64_t a) {
  return (a > 0 && has(x_tasks)) ? x_tasks->select(0, a - 1) : u;
}

// h = [u A_0^T | x_1 A_1^T | ...]: one GEMM over the concatenated A's when all
// adapters read u, else one per adapter written straight into h's columns.
Tensor shrink(const Tensor& u, const Tensor& lora_a, c10::IntArrayRef ranks, const std::optional<Tensor>& x_tasks,
              const Problem& p) {
  if (!has(x_tasks)) return at::mm(u, lora_a.t());
  Tensor h = at::empty({p.M, p.R}, u.options());
  for (int64_t a = 0; a < p.G; ++a) {
    Tensor h_a = h.narrow(1, p.start[a], ranks[a]);
    at::mm_out(h_a, adapter_input(u, x_tasks, a), lora_a.narrow(0, p.start[a], ranks[a]).t());
  }
  return h;
}

std::tuple<Tensor, Tensor> mt_lora_fwd_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& lora_a, const Tensor& lora_b, c10::IntArrayRef ranks,
                                            c10::ArrayRef<double> scales, bool shared_in_tasks,
                                            const std::optional<Tensor>& x_lora,
                                            const std::optional<Tensor>& x_tasks) {
  const Problem p = check_problem(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora, x_tasks);
  const c10::cuda::CUDAGuard guard(x.device());

  const Tensor& u = has(x_lora) ? *x_lora : x;
  const Tensor h = shrink(u, lora_a, ranks, x_tasks, p).contiguous();
  const Tensor base = (has(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t())).contiguous();
  const Tensor b = lora_b.contiguous();
  Tensor out = at::empty({p.G, p.M, p.N}, x.options());

  const int sm_count = device_attribute(cudaDevAttrMultiProcessorCount, x.get_device());
  check_launch(fdc::mt_lora_fwd_expand(kernel_dtype(x.scalar_type()), base.data_ptr(), h.data_ptr(), b.data_ptr(),
                                       out.data_ptr(), p.M, p.N, ranks.data(), scales.data(),
                                       static_cast<int>(p.G), shared_in_tasks, sm_count,
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "forward expand kernel");
  return {out, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mt_lora_bwd_cuda(
    const Tensor& grad, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_a, const Tensor& lora_b, c10::IntArrayRef ranks, c10::ArrayRef<double> scales,
    bool shared_in_tasks, const std::optional<Tensor>& x_lora, const std::optional<Tensor>& x_tasks,
    const Tensor& h, const c10::List<bool>& needs) {
  const Problem p = check_problem(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora, x_tasks);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == p.G && grad.size(1) == p.M && grad.size(2) == p.N, kOp,
              "grad must have shape (G=", p.G, ", M=", p.M, ", N=", p.N, "), got ", grad.sizes());
  check_like_x(grad, "grad", x);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == p.M && h.size(1) == p.R, kOp, "h must have shape (M=", p.M,
              ", sum(ranks)=", p.R, "), got ", h.sizes());
  check_like_x(h, "h", x);
  TORCH_CHECK(needs.size() == 7, kOp, "needs must have 7 entries (x, weight, bias, lora_a, lora_b, x_lora, ",
              "x_tasks), got ", needs.size());
  const c10::cuda::CUDAGuard guard(x.device());

  const bool has_xl = has(x_lora), has_xt = has(x_tasks);
  const bool need_dx = needs.get(0), need_dw = needs.get(1), need_db = needs.get(2) && has(bias);
  const bool need_da = needs.get(3), need_dlb = needs.get(4);
  const bool need_dxl = needs.get(5) && has_xl, need_dxt = needs.get(6) && has_xt;
  // d_u = gradient w.r.t. the LoRA input u; it joins dx only when u is x.
  const bool need_du = (need_dx && !has_xl) || need_dxl;
  const bool need_dh = need_du || need_da || need_dxt;
  const bool need_gb = need_dx || need_dw || need_db || (need_dlb && shared_in_tasks);

  const Tensor g = grad.contiguous();
  const Tensor u = has_xl ? *x_lora : x;
  Tensor grad_base, dh;
  if (need_dh) {
    dh = at::empty({p.M, p.R}, x.options());
    if (need_gb) grad_base = at::empty({p.M, p.N}, x.options());
    const int device = x.get_device();
    const int64_t padded = fdc::mt_lora_padded_rank(ranks.data(), static_cast<int>(p.G));
    const size_t smem = fdc::mt_lora_bwd_smem_bytes(static_cast<int>(p.G), p.R, padded);
    const int smem_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    TORCH_CHECK(smem <= static_cast<size_t>(smem_limit), kOp, "the backward kernel needs ", smem,
                " bytes of shared memory for ", p.G, " adapters and ranks ", ranks, ", this GPU allows ",
                smem_limit, ". Use fewer adapters or the triton or torch backend.");
    const int splits =
        fdc::mt_lora_bwd_num_splits(p.M, p.N, device_attribute(cudaDevAttrMultiProcessorCount, device));
    Tensor workspace;
    if (splits > 1) workspace = at::empty({splits, p.M, p.R}, x.options().dtype(at::kFloat));
    const Tensor b = lora_b.contiguous();
    check_launch(fdc::mt_lora_bwd_rows(kernel_dtype(x.scalar_type()), g.data_ptr(), b.data_ptr(),
                                       need_gb ? grad_base.data_ptr() : nullptr, dh.data_ptr(),
                                       splits > 1 ? workspace.data_ptr<float>() : nullptr, splits, p.M, p.N,
                                       ranks.data(), scales.data(), static_cast<int>(p.G), shared_in_tasks,
                                       c10::cuda::getCurrentCUDAStream().stream()),
                 "backward row kernel");
  } else if (need_gb) {
    grad_base = g.sum(0);
  }

  const Tensor empty = at::empty({0}, x.options());
  Tensor d_x = empty, d_weight = empty, d_bias = empty, d_lora_a = empty, d_lora_b = empty;
  Tensor d_x_lora = empty, d_x_tasks = empty;

  if (need_dlb) {
    // Gradient reaching adapter a's output: the shared LoRA feeds every output
    // in 'matrixv2', only out[0] in 'matrix'.
    d_lora_b = at::empty({p.N, p.R}, x.options());
    for (int64_t a = 0; a < p.G; ++a) {
      const Tensor d_out_a = (a == 0 && shared_in_tasks) ? grad_base : g.select(0, a);
      Tensor slice = d_lora_b.narrow(1, p.start[a], ranks[a]);
      at::mm_out(slice, d_out_a.t(), h.narrow(1, p.start[a], ranks[a]));
      if (scales[a] != 1.0) slice.mul_(scales[a]);
    }
  }
  if (need_da) {
    if (!has_xt) {
      d_lora_a = at::mm(dh.t(), u);
    } else {
      d_lora_a = at::empty({p.R, p.K}, x.options());
      for (int64_t a = 0; a < p.G; ++a) {
        Tensor rows = d_lora_a.narrow(0, p.start[a], ranks[a]);
        at::mm_out(rows, dh.narrow(1, p.start[a], ranks[a]).t(), adapter_input(u, x_tasks, a));
      }
    }
  }
  Tensor d_u;
  if (need_du) {
    d_u = has_xt ? at::mm(dh.narrow(1, 0, ranks[0]), lora_a.narrow(0, 0, ranks[0])) : at::mm(dh, lora_a);
  }
  if (need_dxt) {
    d_x_tasks = at::empty({p.G - 1, p.M, p.K}, x.options());
    for (int64_t a = 1; a < p.G; ++a) {
      Tensor slab = d_x_tasks.select(0, a - 1);
      at::mm_out(slab, dh.narrow(1, p.start[a], ranks[a]), lora_a.narrow(0, p.start[a], ranks[a]));
    }
  }
  if (need_dx) d_x = has_xl ? at::mm(grad_base, weight) : at::addmm(d_u, grad_base, weight);
  if (need_dxl) d_x_lora = d_u;
  if (need_dw) d_weight = at::mm(grad_base.t(), x);
  if (need_db) d_bias = grad_base.sum(0);
  return {d_x, d_weight, d_bias, d_lora_a, d_lora_b, d_x_lora, d_x_tasks};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CUDA, m) {
  m.impl("_mt_lora_fwd", &mt_lora_fwd_cuda);
  m.impl("_mt_lora_bwd", &mt_lora_bwd_cuda);
}
