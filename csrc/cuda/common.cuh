// What the CUDA kernel files (*.cu) share: loads and stores that convert the
// element types to the fp32 every kernel computes in, the dispatch from the
// Dtype a launcher receives to a template argument, grid limits, and the
// error convention of the launchers. nvcc only (device code); the launcher
// headers include the plain common.h instead.
//
// Error convention: a launcher returns cudaError_t and never throws. It
// returns cudaErrorInvalidValue for arguments its kernels cannot take, the
// error of any runtime call it makes (FASTDENSE_CUDA_TRY), and after its last
// launch cudaGetLastError(), which reports a bad launch configuration; faults
// inside a kernel surface at the caller's next synchronising call.
#pragma once

#include "common.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Returns from the enclosing launcher when a call giving a cudaError_t fails
// (variadic: template arguments carry commas).
#define FASTDENSE_CUDA_TRY(...)                               \
  do {                                                        \
    const cudaError_t fastdense_err_ = (__VA_ARGS__);         \
    if (fastdense_err_ != cudaSuccess) return fastdense_err_; \
  } while (0)

namespace fastdense {
namespace cuda {

// Grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elem<T>::load widens an element to float, Elem<T>::store rounds a float to
// the nearest T: every kernel reads T, accumulates in fp32, writes T.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Returns f(TypeTag<T>{}) for the tensor element type T that dtype names
// (float, __half, __nv_bfloat16); cudaErrorInvalidValue for any other dtype.
template <typename F>
cudaError_t with_element_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32:
      return f(TypeTag<float>{});
    case Dtype::kFloat16:
      return f(TypeTag<__half>{});
    case Dtype::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastdense
