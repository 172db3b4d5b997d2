// CUDA kernels of the Dynamic Task Filter's GAP and depthwise conv phases
// (TADFormer §3.4, Eq. 3–4: θ_t ⊛ (f_t W_down)), declared in dtf.h.
//
// Layout: tokens channels-last (S, H, W, r), as the down-projection GEMM writes
// them, so no NCHW transpose is made. Nothing is staged in shared memory for
// the convolutions: neighbouring threads share their k x k source pixels
// through the L1 / read-only cache.
//   forward / dh: one thread per output element (pixel, channel), consecutive
//                 threads on consecutive channels of a pixel, so every token
//                 load and store of a warp is a contiguous run. The thread walks
//                 the k x k taps (k is a template parameter, the loops unroll),
//                 loading each tap of its (sample, window, channel) filter and
//                 the matching source token through __ldg; a tap whose source
//                 pixel falls outside the pixel's window is skipped (zero
//                 padding at window borders). dh also adds the GAP's adjoint
//                 d_pooled / count.
//   dtheta, GAP:  a block reduces a slice of the rows of one (sample, window)
//                 for all r channels (256 / r pixel lanes x r channel lanes),
//                 each thread keeping its k*k (or 1) partial sums in
//                 registers; the lanes of a channel are reduced through shared
//                 memory, then added atomically to a float32 result, so maps
//                 of any size (window 0 at 112 x 112) still fill the GPU.
#include "dtf.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common.cuh"

namespace fastdense {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kDtfMaxRank <= kThreads, "the reductions give every channel one of the block's threads");

// 32-bit index math (valid() bounds every token tensor by kDtfMaxTokenElements):
// 64-bit division is a called subroutine with a stack frame on the GPU.
struct Geo {
  int S, H, W, r, wh, ww, nh, nw;
};

Geo to_geo(const DtfGeometry& g) {
  return Geo{int(g.S), int(g.H), int(g.W), int(g.r), int(g.wh), int(g.ww), int(g.nh), int(g.nw)};
}

// Forward (SIGN = +1) and dh (SIGN = -1, the flipped filter) share one kernel.
template <typename T, int K, int SIGN>
__global__ void __launch_bounds__(kThreads) conv_kernel(const T* __restrict__ src, const T* __restrict__ theta,
                                                        int64_t ts0, int64_t ts1, const T* __restrict__ d_pooled,
                                                        T* __restrict__ out, Geo g) {
  constexpr int P = K / 2;
  const unsigned total = unsigned(g.S) * unsigned(g.H) * unsigned(g.W) * unsigned(g.r);
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const int c = int(i % unsigned(g.r));
    const unsigned pix = i / unsigned(g.r);
    const int x = int(pix % unsigned(g.W));
    const unsigned row = pix / unsigned(g.W);
    const int y = int(row % unsigned(g.H));
    const int s = int(row / unsigned(g.H));
    const int wy = y / g.wh, wx = x / g.ww;
    const int y0 = window_begin(wy, g.wh), y1 = window_end(wy, g.wh, g.H);
    const int x0 = window_begin(wx, g.ww), x1 = window_end(wx, g.ww, g.W);
    const int win = wy * g.nw + wx;
    const T* tw = theta + s * ts0 + win * ts1 + c * (K * K);
    const T* base = src + (size_t(s) * g.H * g.W) * g.r + c;
    float acc = 0.f;
#pragma unroll
    for (int a = 0; a < K; ++a) {
      const int yy = y + SIGN * (a - P);
      if (yy < y0 || yy >= y1) continue;
#pragma unroll
      for (int b = 0; b < K; ++b) {
        const int xx = x + SIGN * (b - P);
        if (xx < x0 || xx >= x1) continue;
        acc += Elem<T>::load(__ldg(tw + a * K + b)) *
               Elem<T>::load(__ldg(base + unsigned(yy * g.W + xx) * unsigned(g.r)));
      }
    }
    if (d_pooled != nullptr) {
      const float count = float((y1 - y0) * (x1 - x0));
      acc += Elem<T>::load(d_pooled[unsigned(s * g.nh * g.nw + win) * unsigned(g.r) + c]) / count;
    }
    out[i] = Elem<T>::store(acc);
  }
}

// Pixels of window `win` handled by block slice `part` of `parts`: rows are split.
struct Slice {
  int y0, y1, x0, x1, ys, ye;
};

__device__ __forceinline__ Slice window_slice(const Geo& g, int win, int part, int parts) {
  Slice sl;
  const int wy = win / g.nw, wx = win % g.nw;
  sl.y0 = window_begin(wy, g.wh);
  sl.y1 = window_end(wy, g.wh, g.H);
  sl.x0 = window_begin(wx, g.ww);
  sl.x1 = window_end(wx, g.ww, g.W);
  const int rows = sl.y1 - sl.y0;
  sl.ys = sl.y0 + rows * part / parts;
  sl.ye = sl.y0 + rows * (part + 1) / parts;
  return sl;
}

// grid: (S * n_windows, parts). Thread t: channel t % r, pixel lane t / r.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) dtheta_kernel(const T* __restrict__ grad, const T* __restrict__ h,
                                                          float* __restrict__ dtheta, Geo g) {
  constexpr int P = K / 2;
  __shared__ float partial[kThreads];
  const int nwin = g.nh * g.nw;
  const int sw = blockIdx.x;
  const int s = sw / nwin, win = sw % nwin;
  const Slice sl = window_slice(g, win, blockIdx.y, gridDim.y);
  const int r = int(g.r);
  const int lanes = kThreads / r;
  const int c = threadIdx.x % r, lane = threadIdx.x / r;
  const bool active = lane < lanes;
  float acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = 0.f;
  if (active) {
    const int width = sl.x1 - sl.x0;
    const int count = (sl.ye - sl.ys) * width;
    const T* gs = grad + (size_t(s) * g.H * g.W) * g.r + c;
    const T* hs = h + (size_t(s) * g.H * g.W) * g.r + c;
    for (int p = lane; p < count; p += lanes) {
      const int y = sl.ys + p / width, x = sl.x0 + p % width;
      const float gv = Elem<T>::load(gs[unsigned(y * g.W + x) * unsigned(g.r)]);
#pragma unroll
      for (int a = 0; a < K; ++a) {
        const int yy = y + a - P;
        const bool row_ok = yy >= sl.y0 && yy < sl.y1;
#pragma unroll
        for (int b = 0; b < K; ++b) {
          const int xx = x + b - P;
          if (row_ok && xx >= sl.x0 && xx < sl.x1)
            acc[a * K + b] += gv * Elem<T>::load(__ldg(hs + unsigned(yy * g.W + xx) * unsigned(g.r)));
        }
      }
    }
  }
  float* out = dtheta + (size_t(sw) * g.r + c) * (K * K);
#pragma unroll
  for (int t = 0; t < K * K; ++t) {
    partial[threadIdx.x] = acc[t];
    __syncthreads();
    if (active && lane == 0) {
      float sum = 0.f;
      for (int l = 0; l < lanes; ++l) sum += partial[l * r + c];
      atomicAdd(out + t, sum);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gap_kernel(const T* __restrict__ h, float* __restrict__ pooled, Geo g) {
  __shared__ float partial[kThreads];
  const int nwin = g.nh * g.nw;
  const int sw = blockIdx.x;
  const int s = sw / nwin, win = sw % nwin;
  const Slice sl = window_slice(g, win, blockIdx.y, gridDim.y);
  const int r = int(g.r);
  const int lanes = kThreads / r;
  const int c = threadIdx.x % r, lane = threadIdx.x / r;
  const bool active = lane < lanes;
  float acc = 0.f;
  const int width = sl.x1 - sl.x0;
  if (active) {
    const int count = (sl.ye - sl.ys) * width;
    const T* hs = h + (size_t(s) * g.H * g.W) * g.r + c;
    for (int p = lane; p < count; p += lanes) {
      const int y = sl.ys + p / width, x = sl.x0 + p % width;
      acc += Elem<T>::load(hs[unsigned(y * g.W + x) * unsigned(g.r)]);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  if (active && lane == 0) {
    float sum = 0.f;
    for (int l = 0; l < lanes; ++l) sum += partial[l * r + c];
    const float tokens = float((sl.y1 - sl.y0) * width);
    atomicAdd(pooled + size_t(sw) * g.r + c, sum / tokens);
  }
}

// ---------------------------------------------------------------------------- launch helpers
// Returns f(std::integral_constant<int, K>{}) for the instantiated kernel size K
// equal to k (DtfKernelSizes); cudaErrorInvalidValue for any other k.
template <typename F, int... Ks>
cudaError_t with_kernel_size(int k, std::integer_sequence<int, Ks...>, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  (void)((k == Ks && ((err = f(std::integral_constant<int, Ks>{})), true)) || ...);
  return err;
}

int elementwise_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return int(std::min<int64_t>(std::max<int64_t>(blocks, 1), 1 << 20));  // grid-stride loop covers the rest
}

// Slices per window so that the reduction grid has about 4 blocks per SM.
int reduction_parts(const DtfGeometry& g, int sm_count) {
  const int64_t windows = std::max<int64_t>(1, g.S * g.n_windows());
  const int64_t want = ceil_div(4LL * std::max(sm_count, 1), windows);
  return int(std::max<int64_t>(1, std::min<int64_t>(want, std::min<int64_t>(g.wh, kMaxGridY))));
}

template <typename T, int SIGN>
cudaError_t launch_conv(const void* src, const void* theta, int64_t ts0, int64_t ts1, const void* d_pooled,
                        void* out, const DtfGeometry& dg, int k, cudaStream_t stream) {
  const Geo g = to_geo(dg);
  const int64_t total = int64_t(g.S) * g.H * g.W * g.r;
  if (total == 0) return cudaSuccess;
  const dim3 grid(elementwise_blocks(total));
  auto s = static_cast<const T*>(src);
  auto th = static_cast<const T*>(theta);
  auto dp = static_cast<const T*>(d_pooled);
  auto o = static_cast<T*>(out);
  return with_kernel_size(k, DtfKernelSizes{}, [&](auto kc) {
    conv_kernel<T, decltype(kc)::value, SIGN><<<grid, kThreads, 0, stream>>>(s, th, ts0, ts1, dp, o, g);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_dtheta(const void* grad, const void* h, float* dtheta, const DtfGeometry& dg, int k, int sm_count,
                          cudaStream_t stream) {
  const Geo g = to_geo(dg);
  if (int64_t(g.S) * g.H * g.W * g.r == 0) return cudaSuccess;
  const dim3 grid(unsigned(g.S * g.nh * g.nw), unsigned(reduction_parts(dg, sm_count)));
  auto gr = static_cast<const T*>(grad);
  auto hh = static_cast<const T*>(h);
  return with_kernel_size(k, DtfKernelSizes{}, [&](auto kc) {
    dtheta_kernel<T, decltype(kc)::value><<<grid, kThreads, 0, stream>>>(gr, hh, dtheta, g);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_gap(const void* h, float* pooled, const DtfGeometry& dg, int sm_count, cudaStream_t stream) {
  const Geo g = to_geo(dg);
  if (int64_t(g.S) * g.H * g.W * g.r == 0) return cudaSuccess;
  const dim3 grid(unsigned(g.S * g.nh * g.nw), unsigned(reduction_parts(dg, sm_count)));
  gap_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(h), pooled, g);
  return cudaGetLastError();
}

bool valid(const DtfGeometry& g) {
  return g.r >= 1 && g.r <= kDtfMaxRank && g.wh >= 1 && g.ww >= 1 && g.S >= 0 &&
         g.S * g.H * g.W * g.r <= kDtfMaxTokenElements && g.S * g.n_windows() <= kMaxGridX;
}

}  // namespace

cudaError_t dtf_dwconv_fwd(Dtype dtype, const void* h, const void* theta, int64_t theta_sample_stride,
                           int64_t theta_window_stride, void* out, const DtfGeometry& g, int k,
                           cudaStream_t stream) {
  if (!valid(g)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_conv<T, +1>(h, theta, theta_sample_stride, theta_window_stride, nullptr, out, g, k, stream);
  });
}

cudaError_t dtf_dwconv_dh(Dtype dtype, const void* grad, const void* theta, int64_t theta_sample_stride,
                          int64_t theta_window_stride, const void* d_pooled, void* dh, const DtfGeometry& g,
                          int k, cudaStream_t stream) {
  if (!valid(g)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_conv<T, -1>(grad, theta, theta_sample_stride, theta_window_stride, d_pooled, dh, g, k, stream);
  });
}

cudaError_t dtf_dwconv_dtheta(Dtype dtype, const void* grad, const void* h, float* dtheta,
                              const DtfGeometry& g, int k, int sm_count, cudaStream_t stream) {
  if (!valid(g)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_dtheta<T>(grad, h, dtheta, g, k, sm_count, stream);
  });
}

cudaError_t dtf_gap(Dtype dtype, const void* h, float* pooled, const DtfGeometry& g, int sm_count,
                    cudaStream_t stream) {
  if (!valid(g)) return cudaErrorInvalidValue;
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_gap<T>(h, pooled, g, sm_count, stream);
  });
}

}  // namespace cuda
}  // namespace fastdense
