// Window geometry of the Dynamic Task Filter, one definition for the C++
// (cpu/dtf.cpp) and CUDA (cuda/dtf_bind.cpp, cuda/dtf.cu) kernels. It is the
// rule of geometry() in fastdense/ops/_dtf_phases.py:
//   wh = min(window, H) if window > 0 else H   (a window larger than the map is the map)
//   nh = ceil(H / wh)                            (the last row of windows is clipped)
// and the same along the width. Plain C++, no torch, so nvcc compiles it too:
// the CUDA kernels use the window bounds below on 32-bit indices.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTDENSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDENSE_HOST_DEVICE inline
#endif

namespace fastdense {

// First index of window w along an axis cut into windows of `edge`.
template <typename I>
FASTDENSE_HOST_DEVICE I window_begin(I w, I edge) {
  return w * edge;
}

// One past the last index of window w: the last window stops at the map's edge.
template <typename I>
FASTDENSE_HOST_DEVICE I window_end(I w, I edge, I size) {
  const I end = w * edge + edge;
  return end < size ? end : size;
}

struct DtfGeometry {
  int64_t S = 0, H = 0, W = 0, r = 0;  // samples, map height and width, channels
  int64_t wh = 0, ww = 0;              // window height and width, clipped to the map
  int64_t nh = 0, nw = 0;              // windows per column, per row

  // height, width >= 1 and window >= 0 (0: one window covering the map).
  static DtfGeometry make(int64_t samples, int64_t height, int64_t width, int64_t channels, int64_t window) {
    DtfGeometry g;
    g.S = samples;
    g.H = height;
    g.W = width;
    g.r = channels;
    g.wh = window > 0 ? std::min(window, height) : height;
    g.ww = window > 0 ? std::min(window, width) : width;
    g.nh = (height + g.wh - 1) / g.wh;
    g.nw = (width + g.ww - 1) / g.ww;
    return g;
  }

  int64_t n_windows() const { return nh * nw; }
  int64_t win_y0(int64_t wy) const { return window_begin(wy, wh); }
  int64_t win_y1(int64_t wy) const { return window_end(wy, wh, H); }
  int64_t win_x0(int64_t wx) const { return window_begin(wx, ww); }
  int64_t win_x1(int64_t wx) const { return window_end(wx, ww, W); }
};

}  // namespace fastdense
