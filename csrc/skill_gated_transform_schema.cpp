// Schemas of the internal kernel ops of the TDSS skill-gated transform.
//
// The public operator torch.ops.fastdense.skill_gated_transform is declared in
// fastdense/ops/skill_gated_transform.py (tensor contract there); its cpp
// backend calls these, implemented in csrc/cpu/skill_gated_transform.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  m.def(
      "_skill_adapter_fwd(Tensor x, Tensor w_down, Tensor w_up, Tensor skills, Tensor w_gamma, "
      "Tensor w_beta) -> (Tensor, Tensor)");
  m.def(
      "_skill_adapter_bwd(Tensor grad, Tensor x, Tensor w_down, Tensor w_up, Tensor skills, "
      "Tensor w_gamma, Tensor w_beta, Tensor h, bool[] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
