// CUDA implementations of the Dynamic Task Filter's internal ops (schemas:
// csrc/dtf_schema.cpp; contract: fastdense/ops/dtf.py). The kernels are in
// dtf.cu; this file checks arguments and allocates outputs. The GEMMs of the
// TA-module (down-projection, up-projection with the base add, and the
// backward's dF, dA, dB) run on cuBLAS through ATen in the orchestration
// shared by every backend (fastdense/ops/_dtf_phases.py), which calls these
// ops for the GAP and the depthwise conv phases.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "bind_common.h"
#include "dtf.h"

namespace {

using at::Tensor;
using fastdense::DtfGeometry;
namespace fdc = fastdense::cuda;

constexpr const char* kOp = "fastdense dynamic task filter (cuda): ";

fdc::Dtype kernel_dtype(at::ScalarType t) {
  const std::optional<fdc::Dtype> d = fdc::element_dtype(t);
  TORCH_CHECK(d.has_value(), kOp, "supports float32, float16 and bfloat16, got ", t);
  return *d;
}

// "3, 5, 7": the kernel sizes the kernels are instantiated for.
std::string kernel_sizes_text() {
  std::ostringstream text;
  for (size_t i = 0; i < fdc::kDtfKernelSizes.size(); ++i) text << (i ? ", " : "") << fdc::kDtfKernelSizes[i];
  return text.str();
}

DtfGeometry make_geometry(const Tensor& tokens, const char* name, int64_t height, int64_t width, int64_t window) {
  TORCH_CHECK(tokens.is_cuda(), kOp, name, " must be a CUDA tensor, got one on ", tokens.device());
  kernel_dtype(tokens.scalar_type());
  TORCH_CHECK(tokens.dim() == 3, kOp, name, " must have shape (S, N, r), got ", tokens.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, kOp, "height and width must be positive, got ", height, " x ", width);
  TORCH_CHECK(tokens.size(1) == height * width, kOp, name, " has N = ", tokens.size(1),
              " tokens but height * width = ", height * width);
  TORCH_CHECK(window >= 0, kOp, "window must be >= 0, got ", window);
  TORCH_CHECK(tokens.size(2) >= 1 && tokens.size(2) <= fdc::kDtfMaxRank, kOp, "supports ranks 1..",
              fdc::kDtfMaxRank, ", got r = ", tokens.size(2));
  TORCH_CHECK(tokens.numel() <= fdc::kDtfMaxTokenElements, kOp, name, " has ", tokens.numel(),
              " elements; the kernels index with 32 bits (split the batch)");
  return DtfGeometry::make(tokens.size(0), height, width, tokens.size(2), window);
}

int64_t kernel_size_of(const Tensor& theta, const DtfGeometry& g, const Tensor& ref) {
  TORCH_CHECK(theta.device() == ref.device(), kOp, "theta is on ", theta.device(), " but the tokens are on ",
              ref.device());
  TORCH_CHECK(theta.scalar_type() == ref.scalar_type(), kOp, "theta has dtype ", theta.scalar_type(),
              " but the tokens have ", ref.scalar_type());
  TORCH_CHECK(theta.dim() == 4 && theta.size(0) == g.S && theta.size(1) == g.n_windows() && theta.size(2) == g.r,
              kOp, "theta must have shape (S=", g.S, ", n_windows=", g.n_windows(), ", r=", g.r, ", k*k), got ",
              theta.sizes());
  int64_t k = 1;
  while (k * k < theta.size(3)) ++k;
  TORCH_CHECK(k * k == theta.size(3) && fdc::dtf_supports_kernel_size(k), kOp,
              "supports k x k filters for k in ", kernel_sizes_text(), ", got theta's last dim ", theta.size(3));
  return k;
}

// The kernels read theta with its sample and window strides; channels and taps must be dense.
Tensor dense_taps(const Tensor& theta) {
  const int64_t kk = theta.size(3);
  if (theta.stride(3) == 1 && theta.stride(2) == kk) return theta;
  return theta.contiguous();
}

int sm_count(const Tensor& t) { return fdc::device_attribute(cudaDevAttrMultiProcessorCount, t.get_device(), kOp); }

void check_launch(cudaError_t err, const char* what) { fdc::check_cuda(err, kOp, what); }

Tensor dtf_gap(const Tensor& h_in, int64_t height, int64_t width, int64_t window) {
  const DtfGeometry g = make_geometry(h_in, "h", height, width, window);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Tensor h = h_in.contiguous();
  Tensor pooled = at::zeros({g.S, g.n_windows(), g.r}, h.options().dtype(at::kFloat));
  check_launch(fdc::dtf_gap(kernel_dtype(h.scalar_type()), h.data_ptr(), pooled.data_ptr<float>(), g, sm_count(h),
                            c10::cuda::getCurrentCUDAStream()),
               "dtf_gap");
  return pooled.to(h.scalar_type());
}

Tensor dtf_dwconv_fwd(const Tensor& h_in, const Tensor& theta_in, int64_t height, int64_t width, int64_t window) {
  const DtfGeometry g = make_geometry(h_in, "h", height, width, window);
  const int64_t k = kernel_size_of(theta_in, g, h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Tensor h = h_in.contiguous();
  const Tensor theta = dense_taps(theta_in);
  Tensor out = at::empty_like(h);
  check_launch(fdc::dtf_dwconv_fwd(kernel_dtype(h.scalar_type()), h.data_ptr(), theta.data_ptr(), theta.stride(0),
                                   theta.stride(1), out.data_ptr(), g, static_cast<int>(k),
                                   c10::cuda::getCurrentCUDAStream()),
               "dtf_dwconv_fwd");
  return out;
}

Tensor dtf_dwconv_dh(const Tensor& grad_in, const Tensor& theta_in, int64_t height, int64_t width, int64_t window,
                     const std::optional<Tensor>& d_pooled_in) {
  const DtfGeometry g = make_geometry(grad_in, "grad", height, width, window);
  const int64_t k = kernel_size_of(theta_in, g, grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const Tensor theta = dense_taps(theta_in);
  Tensor d_pooled;
  if (d_pooled_in.has_value() && d_pooled_in->defined()) {
    d_pooled = d_pooled_in->contiguous();
    TORCH_CHECK(d_pooled.device() == grad.device() && d_pooled.scalar_type() == grad.scalar_type(), kOp,
                "d_pooled must be on the gradient's device with its dtype");
    TORCH_CHECK(d_pooled.dim() == 3 && d_pooled.size(0) == g.S && d_pooled.size(1) == g.n_windows() &&
                    d_pooled.size(2) == g.r,
                kOp, "d_pooled must have shape (S=", g.S, ", n_windows=", g.n_windows(), ", r=", g.r, "), got ",
                d_pooled.sizes());
  }
  Tensor dh = at::empty_like(grad);
  check_launch(fdc::dtf_dwconv_dh(kernel_dtype(grad.scalar_type()), grad.data_ptr(), theta.data_ptr(),
                                  theta.stride(0), theta.stride(1), d_pooled.defined() ? d_pooled.data_ptr() : nullptr,
                                  dh.data_ptr(), g, static_cast<int>(k), c10::cuda::getCurrentCUDAStream()),
               "dtf_dwconv_dh");
  return dh;
}

Tensor dtf_dwconv_dtheta(const Tensor& grad_in, const Tensor& h_in, int64_t height, int64_t width, int64_t window,
                         int64_t kernel_size) {
  const DtfGeometry g = make_geometry(grad_in, "grad", height, width, window);
  TORCH_CHECK(h_in.sizes() == grad_in.sizes() && h_in.scalar_type() == grad_in.scalar_type() &&
                  h_in.device() == grad_in.device(),
              kOp, "h must match grad's shape ", grad_in.sizes(), ", dtype and device, got ", h_in.sizes());
  TORCH_CHECK(fdc::dtf_supports_kernel_size(kernel_size), kOp, "supports kernel sizes ",
              kernel_sizes_text(), ", got ", kernel_size);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous(), h = h_in.contiguous();
  Tensor dtheta = at::zeros({g.S, g.n_windows(), g.r, kernel_size * kernel_size}, grad.options().dtype(at::kFloat));
  check_launch(fdc::dtf_dwconv_dtheta(kernel_dtype(grad.scalar_type()), grad.data_ptr(), h.data_ptr(),
                                      dtheta.data_ptr<float>(), g, static_cast<int>(kernel_size), sm_count(grad),
                                      c10::cuda::getCurrentCUDAStream()),
               "dtf_dwconv_dtheta");
  return dtheta.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CUDA, m) {
  m.impl("_dtf_gap", &dtf_gap);
  m.impl("_dtf_dwconv_fwd", &dtf_dwconv_fwd);
  m.impl("_dtf_dwconv_dh", &dtf_dwconv_dh);
  m.impl("_dtf_dwconv_dtheta", &dtf_dwconv_dtheta);
}
