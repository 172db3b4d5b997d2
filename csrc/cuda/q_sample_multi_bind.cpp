// CUDA kernels of fastdense::_q_sample_multi_fwd / _q_sample_multi_bwd
// (schemas in csrc/q_sample_multi_schema.cpp, tensor contract and semantics in
// fastdense/ops/q_sample_multi.py). Checks the arguments, makes them contiguous
// and calls the raw launchers of q_sample_multi.cu on the current stream.
// Timesteps are not read on the host (that would synchronise the device): a
// timestep outside [0, len(alphas_cumprod)) gives NaN coefficients: NaN
// output rows in the forward, NaN in every gradient it adds to in the backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "bind_common.h"
#include "q_sample_multi.h"

namespace {

using at::Tensor;
namespace fdc = fastdense::cuda;

constexpr const char* kOp = "fastdense q_sample_multi (cuda): ";

fdc::Dtype kernel_dtype(at::ScalarType t, const char* name) {
  const std::optional<fdc::Dtype> d = fdc::element_dtype(t);
  TORCH_CHECK_TYPE(d.has_value(), kOp, name, " must be float32, float16 or bfloat16, got ", t);
  return *d;
}

fdc::Dtype schedule_dtype(at::ScalarType t) {
  const std::optional<fdc::Dtype> d = fdc::kernel_dtype(t);
  TORCH_CHECK_TYPE(d == fdc::Dtype::kFloat32 || d == fdc::Dtype::kFloat64, kOp,
                   "alphas_cumprod must be float32 or float64, got ", t);
  return *d;
}

void check_launch(cudaError_t err, const char* what) { fdc::check_cuda(err, kOp, what); }

// timesteps (k,) int64 and alphas_cumprod (T,) on the device of `like`.
void check_schedule(const Tensor& timesteps, const Tensor& alphas_cumprod, const Tensor& like) {
  TORCH_CHECK_VALUE(timesteps.device() == like.device(), kOp, "timesteps is on ", timesteps.device(),
                    " but the latents are on ", like.device());
  TORCH_CHECK_TYPE(timesteps.scalar_type() == at::kLong, kOp, "timesteps must be int64, got ",
                   timesteps.scalar_type());
  TORCH_CHECK_VALUE(timesteps.dim() == 1, kOp, "timesteps must have shape (k,), got ", timesteps.sizes());
  TORCH_CHECK_VALUE(alphas_cumprod.device() == like.device(), kOp, "alphas_cumprod is on ", alphas_cumprod.device(),
                    " but the latents are on ", like.device());
  TORCH_CHECK_VALUE(alphas_cumprod.dim() == 1 && alphas_cumprod.size(0) >= 1, kOp,
                    "alphas_cumprod must have shape (T_train,), got ", alphas_cumprod.sizes());
  schedule_dtype(alphas_cumprod.scalar_type());
}

Tensor q_sample_multi_fwd_cuda(const Tensor& z0_in, const Tensor& noise_in, const Tensor& timesteps,
                               const Tensor& alphas_cumprod, bool sample_major) {
  TORCH_CHECK_VALUE(z0_in.is_cuda(), kOp, "z0 must be a CUDA tensor, got one on ", z0_in.device());
  const fdc::Dtype dtype = kernel_dtype(z0_in.scalar_type(), "z0");
  TORCH_CHECK_VALUE(z0_in.dim() == 2, kOp, "z0 must have shape (B, N), got ", z0_in.sizes());
  TORCH_CHECK_VALUE(noise_in.device() == z0_in.device(), kOp, "noise is on ", noise_in.device(), " but z0 is on ",
                    z0_in.device());
  TORCH_CHECK_TYPE(noise_in.scalar_type() == z0_in.scalar_type(), kOp, "noise has dtype ", noise_in.scalar_type(),
                   " but z0 has ", z0_in.scalar_type());
  check_schedule(timesteps, alphas_cumprod, z0_in);
  const int64_t batch = z0_in.size(0), n = z0_in.size(1), k = timesteps.size(0);
  TORCH_CHECK_VALUE(noise_in.dim() == 3 && (noise_in.size(0) == 1 || noise_in.size(0) == k) &&
                        noise_in.size(1) == batch && noise_in.size(2) == n,
                    kOp, "noise must have shape (1 or k=", k, ", B=", batch, ", N=", n, "), got ", noise_in.sizes());
  const c10::cuda::CUDAGuard guard(z0_in.device());

  const Tensor z0 = z0_in.contiguous();
  const Tensor noise = noise_in.contiguous();
  const Tensor ts = timesteps.contiguous();
  const Tensor alphas = alphas_cumprod.contiguous();
  Tensor out = at::empty({k * batch, n}, z0.options());
  if (out.numel() == 0) return out;
  check_launch(fdc::q_sample_multi_fwd(dtype, schedule_dtype(alphas.scalar_type()), z0.data_ptr(), noise.data_ptr(),
                                       ts.data_ptr<int64_t>(), alphas.data_ptr(), out.data_ptr(), batch, n, k,
                                       alphas.size(0), noise.size(0) == 1, sample_major,
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "forward kernel");
  return out;
}

std::tuple<Tensor, Tensor> q_sample_multi_bwd_cuda(const Tensor& grad_in, const Tensor& timesteps,
                                                   const Tensor& alphas_cumprod, int64_t batch, bool sample_major,
                                                   bool shared_noise, const c10::List<bool>& needs) {
  TORCH_CHECK_VALUE(grad_in.is_cuda(), kOp, "grad must be a CUDA tensor, got one on ", grad_in.device());
  const fdc::Dtype dtype = kernel_dtype(grad_in.scalar_type(), "grad");
  check_schedule(timesteps, alphas_cumprod, grad_in);
  TORCH_CHECK_VALUE(needs.size() == 2, kOp, "needs must have 2 entries (z0, noise), got ", needs.size());
  TORCH_CHECK_VALUE(batch >= 0, kOp, "batch must be >= 0, got ", batch);
  const int64_t k = timesteps.size(0);
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == k * batch, kOp, "grad must have shape (k·B=",
                    k * batch, ", N), got ", grad_in.sizes());
  const int64_t n = grad_in.size(1);
  const int64_t steps = shared_noise ? 1 : k;
  const bool need_z0 = needs.get(0), need_noise = needs.get(1);
  const c10::cuda::CUDAGuard guard(grad_in.device());

  const Tensor grad = grad_in.contiguous();
  const Tensor ts = timesteps.contiguous();
  const Tensor alphas = alphas_cumprod.contiguous();
  const Tensor empty = at::empty({0}, grad.options());
  Tensor d_z0 = need_z0 ? at::empty({batch, n}, grad.options()) : empty;
  Tensor d_noise = need_noise ? at::empty({steps, batch, n}, grad.options()) : empty;
  check_launch(fdc::q_sample_multi_bwd(dtype, schedule_dtype(alphas.scalar_type()), grad.data_ptr(),
                                       ts.data_ptr<int64_t>(), alphas.data_ptr(),
                                       need_z0 ? d_z0.data_ptr() : nullptr, need_noise ? d_noise.data_ptr() : nullptr,
                                       batch, n, k, alphas.size(0), shared_noise, sample_major,
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "backward kernel");
  return {d_z0, d_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CUDA, m) {
  m.impl("_q_sample_multi_fwd", &q_sample_multi_fwd_cuda);
  m.impl("_q_sample_multi_bwd", &q_sample_multi_bwd_cuda);
}
