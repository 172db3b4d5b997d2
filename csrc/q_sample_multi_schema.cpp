// Schemas of the internal kernel ops of fastdense::q_sample_multi (tensor
// contract in fastdense/ops/q_sample_multi.py). CPU kernels:
// csrc/cpu/q_sample_multi.cpp; CUDA kernels: csrc/cuda/q_sample_multi_bind.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  // z0 (B, N), noise (S, B, N) with S = 1 (shared) or k, timesteps (k,) int64,
  // alphas_cumprod (T,) float32/float64 -> (k·B, N); row i·B + b, or b·k + i
  // when sample_major.
  m.def(
      "_q_sample_multi_fwd(Tensor z0, Tensor noise, Tensor timesteps, Tensor alphas_cumprod, "
      "bool sample_major) -> Tensor");
  // grad (k·B, N) -> (d_z0 (B, N), d_noise (S, B, N)); S = 1 when shared_noise.
  // needs = [z0, noise]; a gradient not needed comes back as an empty tensor.
  m.def(
      "_q_sample_multi_bwd(Tensor grad, Tensor timesteps, Tensor alphas_cumprod, int batch, "
      "bool sample_major, bool shared_noise, bool[] needs) -> (Tensor, Tensor)");
}
