// The Python module fastdense._C: what was built, and the kernel limits the
// Python backends check their inputs against.
//
// The internal kernel ops are not here: each family declares its schemas in
// csrc/<family>_schema.cpp and registers its kernels from csrc/cpu/<family>.cpp
// and csrc/cuda/<family>_bind.cpp. The public operators are declared in Python
// (fastdense/ops/<family>.py) with fake kernels and autograd.
#include <torch/extension.h>

#include "cuda/dtf_limits.h"
#include "cuda/lora_limits.h"

namespace {

bool built_with_cuda() {
#ifdef FASTDENSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Limits of the CUDA kernels, keyed <family>_<backend>_<what>. They describe
// the kernels' source, so they are exported whether or not CUDA was built;
// the Python cuda backends turn them into input reasons.
pybind11::dict limits() {
  namespace fdc = fastdense::cuda;
  pybind11::dict d;
  d["lora_cuda_max_adapters"] = fdc::kLoraMaxAdapters;
  d["lora_cuda_max_padded_rank"] = fdc::kLoraMaxPaddedRank;
  d["lora_cuda_max_dim"] = fdc::kLoraMaxDim;
  pybind11::list kernel_sizes;
  for (const int k : fdc::kDtfKernelSizes) kernel_sizes.append(k);
  d["dtf_cuda_kernel_sizes"] = kernel_sizes;
  d["dtf_cuda_max_rank"] = fdc::kDtfMaxRank;
  d["dtf_cuda_max_token_elements"] = fdc::kDtfMaxTokenElements;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdense compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in");
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen's description of the CPU threading backend the kernels use");
  m.def("limits", &limits,
        "Limits of the CUDA kernels as a dict: lora_cuda_max_adapters, lora_cuda_max_padded_rank, "
        "lora_cuda_max_dim (M and N each), dtf_cuda_kernel_sizes, dtf_cuda_max_rank, "
        "dtf_cuda_max_token_elements (S * H * W * r)");
}
