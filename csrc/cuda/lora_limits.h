// Limits of the multi-task LoRA CUDA kernels (lora.cu), written once: the
// launchers, the ATen glue (lora_bind.cpp) and fastdense._C.limits() read
// them, and the Python cuda backend turns them into input reasons instead of
// repeating the numbers. Plain C++ (no CUDA, no torch) so that an extension
// built without CUDA still exports them.
#pragma once

#include <cstdint>

namespace fastdense {
namespace cuda {

// G = 1 + T adapters. Bounded because the adapter segments (offsets and
// scales) travel by value as a kernel parameter.
constexpr int kLoraMaxAdapters = 64;

// Sum over adapters of round_up(rank, 4) (mt_lora_padded_rank). The backward
// kernel keeps dh for a 32-row tile in registers, each lane holding up to 4
// groups of 4 padded columns: 32 lanes x 4 x 4 = 512.
constexpr int kLoraMaxPaddedRank = 512;

// M (rows of x) and N (output features) are each indexed with 32-bit ints.
constexpr int64_t kLoraMaxDim = 2147483647;

}  // namespace cuda
}  // namespace fastdense
