// Schemas of the internal kernel ops of the multi-task LoRA linear.
//
// The public operator torch.ops.fastdense.mt_lora_linear (lora_linear is its
// one-adapter case) is declared in Python (fastdense/ops/lora.py, tensor
// contract there) with a fake kernel and autograd; its cpp and cuda backends
// call these, implemented in csrc/cpu/lora.cpp and csrc/cuda/lora_bind.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  // (out (G, M, N), h (M, sum(ranks))): h is the shrink the backward reuses.
  m.def(
      "_mt_lora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "int[] ranks, float[] scales, bool shared_in_tasks, Tensor? x_lora, Tensor? x_tasks) "
      "-> (Tensor, Tensor)");
  // Gradients of (x, weight, bias, lora_a, lora_b, x_lora, x_tasks), an empty
  // tensor for each one not in needs.
  m.def(
      "_mt_lora_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, int[] ranks, float[] scales, bool shared_in_tasks, Tensor? x_lora, "
      "Tensor? x_tasks, Tensor h, bool[] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
