// Limits of the Dynamic Task Filter's CUDA kernels (dtf.cu), written once:
// the kernels are instantiated from DtfKernelSizes, the launchers and the ATen
// glue (dtf_bind.cpp) check against these, and fastdense._C.limits() hands
// them to Python, whose cuda backend turns them into input reasons. Plain C++
// (no CUDA, no torch) so that an extension built without CUDA still exports them.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

namespace fastdense {
namespace cuda {

// Filter sizes k the kernels are compiled for: k is a template parameter, so
// the k x k tap loops unroll and dtheta's k*k sums per thread are registers.
using DtfKernelSizes = std::integer_sequence<int, 3, 5, 7>;

template <int... K>
constexpr std::array<int, sizeof...(K)> dtf_kernel_size_list(std::integer_sequence<int, K...>) {
  return {K...};
}
constexpr auto kDtfKernelSizes = dtf_kernel_size_list(DtfKernelSizes{});

constexpr bool dtf_supports_kernel_size(int64_t k) {
  for (const int size : kDtfKernelSizes)
    if (size == k) return true;
  return false;
}

// The reductions (GAP, dtheta) run blocks of 256 threads as 256 / r pixel
// lanes x r channel lanes, so every channel needs a thread of its own.
constexpr int kDtfMaxRank = 256;

// Token tensors (S, H*W, r) are indexed with 32-bit ints.
constexpr int64_t kDtfMaxTokenElements = 2147483647;

}  // namespace cuda
}  // namespace fastdense
