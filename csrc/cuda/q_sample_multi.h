// Host launchers of the q_sample_multi CUDA kernels (q_sample_multi.cu).
//
// Plain C++ on purpose: the kernels are compiled by nvcc without any torch
// header, and q_sample_multi_bind.cpp (ATen glue) only needs these declarations.
// Tensor contract: fastdense/ops/q_sample_multi.py. All pointers are device
// pointers to contiguous arrays: z0 (B, N), noise (S, B, N) with S = 1 when
// shared_noise else k, out / grad (k·B, N) in row order i·B + b ("timestep")
// or b·k + i (sample_major), all of the element type `dtype` (float32, float16
// or bfloat16); timesteps (k,) int64; alphas_cumprod (T,) of `schedule_dtype`
// (float32 or float64).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace fastdense {
namespace cuda {

// out[row(i, b)] = √ᾱ_{t_i} z0[b] + √(1 − ᾱ_{t_i}) noise[shared ? 0 : i, b],
// coefficients in fp32 gathered in the kernel; a timestep outside
// [0, num_train) gives a NaN row and is never used as an address.
cudaError_t q_sample_multi_fwd(Dtype dtype, Dtype schedule_dtype, const void* z0,
                               const void* noise, const int64_t* timesteps, const void* alphas_cumprod, void* out,
                               int64_t batch, int64_t n, int64_t k, int64_t num_train, bool shared_noise,
                               bool sample_major, cudaStream_t stream);

// d_z0[b] = Σ_i √ᾱ_{t_i} grad[row(i, b)]                     (skipped if d_z0 is null)
// d_noise[i, b] = √(1 − ᾱ_{t_i}) grad[row(i, b)], or its sum over i into
// d_noise[0, b] when shared_noise                              (skipped if d_noise is null)
// With k = 0 the sums are written as zeros.
cudaError_t q_sample_multi_bwd(Dtype dtype, Dtype schedule_dtype, const void* grad,
                               const int64_t* timesteps, const void* alphas_cumprod, void* d_z0, void* d_noise,
                               int64_t batch, int64_t n, int64_t k, int64_t num_train, bool shared_noise,
                               bool sample_major, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdense
