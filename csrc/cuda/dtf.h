// Host launchers of the Dynamic Task Filter's CUDA kernels (dtf.cu): the GAP
// and the channel-wise (depthwise) dynamic convolution with its two gradients.
//
// Plain C++ on purpose: the kernels are compiled by nvcc without any torch
// header; dtf_bind.cpp (ATen glue) only needs these declarations.
// Contract: fastdense/ops/dtf.py and csrc/dtf_schema.cpp. Tokens are
// channels-last (S, H, W, r) contiguous, of the element type named by `dtype`
// (float32, float16 or bfloat16); theta is (S, n_windows, r, k*k) with r and
// the taps contiguous and the given sample / window strides (elements; a
// static filter broadcast over windows has window stride 0). Every window is
// convolved on its own, zero padding at its border (window = 0: one window);
// the window geometry is DtfGeometry (csrc/dtf_geometry.h). Limits: dtf_limits.h.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../dtf_geometry.h"
#include "common.h"
#include "dtf_limits.h"

namespace fastdense {
namespace cuda {

// out[s, y, x, c] = sum_{a,b} theta[s, win(y,x), c, a*k+b] * h[s, y+a-k/2, x+b-k/2, c]
// (source restricted to the window of (y, x)).
cudaError_t dtf_dwconv_fwd(Dtype dtype, const void* h, const void* theta, int64_t theta_sample_stride,
                           int64_t theta_window_stride, void* out, const DtfGeometry& g, int k,
                           cudaStream_t stream);

// dh[s, y, x, c] = sum_{a,b} theta[..., c, a*k+b] * grad[s, y-a+k/2, x-b+k/2, c]
//                 + d_pooled[s, win, c] / tokens(win)     (when d_pooled is not null: the GAP's adjoint)
cudaError_t dtf_dwconv_dh(Dtype dtype, const void* grad, const void* theta, int64_t theta_sample_stride,
                          int64_t theta_window_stride, const void* d_pooled, void* dh, const DtfGeometry& g,
                          int k, cudaStream_t stream);

// dtheta[s, win, c, a*k+b] += sum over the window of grad[y, x, c] * h[y+a-k/2, x+b-k/2, c].
// dtheta is a float32 (S, n_windows, r, k*k) buffer the caller zeroes: the
// pixels of a window are split over several blocks that add their sums atomically.
cudaError_t dtf_dwconv_dtheta(Dtype dtype, const void* grad, const void* h, float* dtheta,
                              const DtfGeometry& g, int k, int sm_count, cudaStream_t stream);

// pooled[s, win, c] += mean over the window of h[s, y, x, c]; float32, zeroed by the caller.
cudaError_t dtf_gap(Dtype dtype, const void* h, float* pooled, const DtfGeometry& g, int sm_count,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdense
