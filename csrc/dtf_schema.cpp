// Schemas of the internal kernel ops of TADFormer's Dynamic Task Filter
// (public operators and tensor contract: fastdense/ops/dtf.py; algorithm:
// fastdense/ops/_dtf_phases.py). CPU kernels: csrc/cpu/dtf.cpp; CUDA kernels:
// csrc/cuda/dtf_bind.cpp.
//
// Tokens are channels-last, h (S, N = H*W, r) in raster order; filters are
// theta (S, n_windows, r, k*k) with any stride over samples and windows (a
// static filter is broadcast with stride 0). window = 0: one window covering
// the map; window = w: w x w windows, the last row/column clipped (a window
// larger than the map is the map), each convolved on its own with zero
// padding at its border (csrc/dtf_geometry.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastdense, m) {
  // Per-window global average pool: (S, N, r) -> (S, n_windows, r).
  m.def("_dtf_gap(Tensor h, int height, int width, int window) -> Tensor");
  // y = theta (*) h per (sample, window, channel), k x k, stride 1, zero padding.
  m.def("_dtf_dwconv_fwd(Tensor h, Tensor theta, int height, int width, int window) -> Tensor");
  // dh = theta^T (*) grad (+ d_pooled / tokens of the window: the GAP's adjoint).
  m.def(
      "_dtf_dwconv_dh(Tensor grad, Tensor theta, int height, int width, int window, Tensor? d_pooled) "
      "-> Tensor");
  // dtheta[s, w, c, a*k+b] = sum over the window of grad[y, x, c] * h[y+a-k/2, x+b-k/2, c].
  m.def(
      "_dtf_dwconv_dtheta(Tensor grad, Tensor h, int height, int width, int window, int kernel_size) "
      "-> Tensor");
}
