// Schemas of the internal kernel ops of fastdense._C and the Python module.
//
// The public operators (torch.ops.fastdense.mt_lora_linear, ...) are declared
// in Python (fastdense/ops/*.py) with fake kernels and autograd; their cpp and
// cuda backends call the internal ops declared here, whose CPU kernels live in
// csrc/cpu/*.cpp and CUDA kernels in csrc/cuda/*_bind.cpp.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  // Multi-task LoRA linear, tensor contract in fastdense/ops/lora.py.
  m.def(
      "_mt_lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "int[] ranks, float[] scales, bool shared_in_tasks, Tensor? x_lora, Tensor? x_tasks) "
      "-> (Tensor, Tensor)");
  m.def(
      "_mt_lora_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, int[] ranks, float[] scales, bool shared_in_tasks, Tensor? x_lora, "
      "Tensor? x_tasks, Tensor h, bool[] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {
bool built_with_cuda() {
#ifdef FASTDENSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdense compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in");
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen's description of the CPU threading backend the kernels use");
}
