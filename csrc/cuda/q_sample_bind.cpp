// CUDA kernels of fastdense::_q_sample_multi_fwd / _q_sample_multi_bwd
// (schemas in csrc/ops_timesteps.cpp, tensor contract and semantics in
// fastdense/ops/timesteps.py). Checks the arguments, makes them contiguous and
// calls the raw launchers of q_sample.cu on the current stream. Timesteps are
// not read on the host (that would synchronise the device): the kernels write
// NaN rows for timesteps outside [0, len(alphas_cumprod)).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>

#include "q_sample.h"

namespace {

using at::Tensor;
namespace fdc = fastdense::cuda;

constexpr const char* kOp = "fastdense q_sample_multi (cuda): ";

fdc::QSampleDtype kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return fdc::QSampleDtype::kFloat32;
    case at::kHalf:
      return fdc::QSampleDtype::kFloat16;
    case at::kBFloat16:
      return fdc::QSampleDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, kOp, name, " must be float32, float16 or bfloat16, got ", t);
  }
}

fdc::QSampleScheduleDtype schedule_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return fdc::QSampleScheduleDtype::kFloat32;
    case at::kDouble:
      return fdc::QSampleScheduleDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, kOp, "alphas_cumprod must be float32 or float64, got ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kOp, what, " failed: ", cudaGetErrorString(err));
}

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
  const fdc::QSampleDtype dtype = kernel_dtype(z0_in.scalar_type(), "z0");
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
  const fdc::QSampleDtype dtype = kernel_dtype(grad_in.scalar_type(), "grad");
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
