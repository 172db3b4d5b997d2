// What the ATen glue of every CUDA family (*_bind.cpp) shares: the one map
// from at::ScalarType to the launchers' Dtype, and turning a launcher's
// cudaError_t into a torch error. Host code only.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "common.h"

namespace fastdense {
namespace cuda {

// The Dtype of a tensor's scalar type, nullopt for one no kernel takes.
inline std::optional<Dtype> kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return Dtype::kFloat32;
    case c10::ScalarType::Half:
      return Dtype::kFloat16;
    case c10::ScalarType::BFloat16:
      return Dtype::kBFloat16;
    case c10::ScalarType::Double:
      return Dtype::kFloat64;
    default:
      return std::nullopt;
  }
}

// kernel_dtype restricted to the element types of the kernels' tensors:
// float32, float16, bfloat16.
inline std::optional<Dtype> element_dtype(c10::ScalarType t) {
  const std::optional<Dtype> d = kernel_dtype(t);
  if (d == Dtype::kFloat64) return std::nullopt;
  return d;
}

// op: the message prefix of the calling op, e.g. "fastdense q_sample_multi (cuda): ".
inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, what, " failed: ", cudaGetErrorString(err));
}

inline int device_attribute(cudaDeviceAttr attr, int device, const char* op) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), op, "cudaDeviceGetAttribute");
  return value;
}

}  // namespace cuda
}  // namespace fastdense
