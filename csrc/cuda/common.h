// The vocabulary every CUDA launcher header (lora.h, dtf.h, q_sample_multi.h)
// shares with its ATen glue. Plain C++ plus the CUDA runtime API header
// (cudaError_t, cudaStream_t), so the host compiler builds the *_bind.cpp
// files with it and nvcc the kernels.
#pragma once

#include <cuda_runtime_api.h>

namespace fastdense {
namespace cuda {

// Element type behind a launcher's void pointers; the ATen glue maps
// at::ScalarType to it in one place (bind_common.h). Tensors are float32,
// float16 or bfloat16; kFloat64 is only q_sample_multi's schedule type. A
// launcher returns cudaErrorInvalidValue for a type it was not built for.
enum class Dtype { kFloat32, kFloat16, kBFloat16, kFloat64 };

}  // namespace cuda
}  // namespace fastdense
