// Host launchers of the multi-task LoRA CUDA kernels (lora.cu).
//
// Plain C++ on purpose: the kernels are compiled by nvcc without any torch
// header, and lora_bind.cpp (ATen glue) only needs these declarations.
// Tensor contract: fastdense/ops/lora.py. All pointers are device pointers to
// contiguous row-major arrays of the element type named by `dtype` (float32,
// float16 or bfloat16); ranks and scales are host arrays of length
// num_adapters (G = 1 + T). Limits: lora_limits.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"
#include "lora_limits.h"

namespace fastdense {
namespace cuda {

// sum over adapters of round_up(rank, 4): the backward kernel's rank space,
// in which every adapter starts at a multiple of 4. At most kLoraMaxPaddedRank.
int64_t mt_lora_padded_rank(const int64_t* ranks, int num_adapters);

// How many slices of N the backward splits the work into, so that small M
// still fills the GPU. Above 1, the caller passes a float32 workspace of
// splits * M * R elements to mt_lora_bwd_rows.
int mt_lora_bwd_num_splits(int64_t M, int64_t N, int sm_count);

// Dynamic shared memory the backward kernel needs; the caller checks it against
// the device's cudaDevAttrMaxSharedMemoryPerBlockOptin to give a clear error.
size_t mt_lora_bwd_smem_bytes(int num_adapters, int64_t total_rank, int64_t padded_rank);

// Forward epilogue (grouped expand):
//   out[0] = base + s_0 h_0 B_0^T
//   out[t] = base (+ s_0 h_0 B_0^T if shared_in_tasks) + s_t h_t B_t^T
// base (M, N), h (M, R), lora_b (N, R), out (G, M, N); h_a / B_a are the
// columns of adapter a. Each base element is read once for all G outputs.
cudaError_t mt_lora_fwd_expand(Dtype dtype, const void* base, const void* h, const void* lora_b,
                               void* out, int64_t M, int64_t N, const int64_t* ranks,
                               const double* scales, int num_adapters, bool shared_in_tasks,
                               int sm_count, cudaStream_t stream);

// Backward row kernel: reads grad (G, M, N) once and writes
//   grad_base = sum_g grad[g]                       (M, N), skipped if null
//   dh[:, a]  = s_a dU_a B_a                        (M, R)
// with dU_0 = grad_base if shared_in_tasks else grad[0], dU_t = grad[t].
// `splits` is normally mt_lora_bwd_num_splits(M, N, sm_count); when it is above
// 1, workspace must hold splits * M * R floats (it may be null when it is 1).
cudaError_t mt_lora_bwd_rows(Dtype dtype, const void* grad, const void* lora_b, void* grad_base,
                             void* dh, float* workspace, int splits, int64_t M, int64_t N,
                             const int64_t* ranks, const double* scales, int num_adapters,
                             bool shared_in_tasks, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdense
