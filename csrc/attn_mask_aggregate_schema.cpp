// Schemas of the internal kernel ops of attention-mask aggregation (contract:
// fastdense/ops/attn_mask_aggregate.py). The CPU kernels are in
// csrc/cpu/attn_mask_aggregate.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  // out = reduce_h softmax(q_h k_h^T * scale)^T m_ca, and the row log-sum-exp it used.
  m.def(
      "_attn_aggregate_fwd(Tensor q, Tensor k, Tensor m_ca, float scale, Tensor? lse, str head_reduce) "
      "-> (Tensor, Tensor)");
  // Gradients of q, k, m_ca (an empty tensor for each one not in needs).
  m.def(
      "_attn_aggregate_bwd(Tensor grad, Tensor q, Tensor k, Tensor m_ca, float scale, Tensor lse, "
      "str head_reduce, bool[] needs) -> (Tensor, Tensor, Tensor)");
}
