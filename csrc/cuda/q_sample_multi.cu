// q_sample_multi kernels: k noised copies of a latent batch in one pass, and
// the backward to the latents and the noise. Raw CUDA only (no torch
// headers); the ATen glue is q_sample_multi_bind.cpp.
//
// The op is memory-bound, so a thread owns one vector of columns of one
// sample b (16 bytes when N and every pointer allow it, else one element) and
// touches every element once: the forward loads z0[b] (and a shared noise[b])
// once and stores the k output vectors; the backward loads the k gradient
// vectors once and keeps the sums in fp32 registers. Blocks tile (columns,
// samples) as a 2-D grid with grid-stride loops, so no thread divides an index.
#include "q_sample_multi.h"

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace fastdense {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// VEC consecutive elements moved as one access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// √ᾱ_t, √(1 − ᾱ_t) of timestep i, correctly rounded whatever --use_fast_math says.
template <typename A>
__device__ __forceinline__ void coefficients(const int64_t* __restrict__ timesteps, const A* __restrict__ alphas,
                                             int64_t i, int64_t num_train, float& c_signal, float& c_noise) {
  const int64_t t = __ldg(timesteps + i);
  float abar = __int_as_float(0x7fc00000);  // NaN: an invalid t reads no memory and poisons its row
  if (t >= 0 && t < num_train) abar = static_cast<float>(__ldg(alphas + t));
  c_signal = __fsqrt_rn(abar);
  c_noise = __fsqrt_rn(1.f - abar);
}

__device__ __forceinline__ int64_t out_row(int64_t i, int64_t b, int64_t k, int64_t batch, bool sample_major) {
  return sample_major ? b * k + i : i * batch + b;
}

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
q_sample_fwd_kernel(const T* __restrict__ z0, const T* __restrict__ noise, const int64_t* __restrict__ timesteps,
                    const A* __restrict__ alphas, T* __restrict__ out, int64_t batch, int64_t n, int64_t k,
                    int64_t num_train, bool shared_noise, bool sample_major) {
  using P = Pack<T, VEC>;
  const int64_t vecs = n / VEC;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vecs;
         v += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t col = v * VEC;
      float z[VEC], e[VEC];
      const P zp = *reinterpret_cast<const P*>(z0 + b * n + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = Elem<T>::load(zp.v[j]);
      if (shared_noise) {
        const P ep = *reinterpret_cast<const P*>(noise + b * n + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) e[j] = Elem<T>::load(ep.v[j]);
      }
      // Unrolled so that several timesteps' noise loads are in flight at once.
#pragma unroll 4
      for (int64_t i = 0; i < k; ++i) {
        float cs, cn;
        coefficients(timesteps, alphas, i, num_train, cs, cn);
        if (!shared_noise) {
          const P ep = *reinterpret_cast<const P*>(noise + (i * batch + b) * n + col);
#pragma unroll
          for (int j = 0; j < VEC; ++j) e[j] = Elem<T>::load(ep.v[j]);
        }
        P o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = Elem<T>::store(fmaf(cs, z[j], cn * e[j]));
        *reinterpret_cast<P*>(out + out_row(i, b, k, batch, sample_major) * n + col) = o;
      }
    }
  }
}

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
q_sample_bwd_kernel(const T* __restrict__ grad, const int64_t* __restrict__ timesteps, const A* __restrict__ alphas,
                    T* __restrict__ d_z0, T* __restrict__ d_noise, int64_t batch, int64_t n, int64_t k,
                    int64_t num_train, bool shared_noise, bool sample_major) {
  using P = Pack<T, VEC>;
  const int64_t vecs = n / VEC;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < vecs;
         v += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t col = v * VEC;
      float acc_z[VEC], acc_n[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc_z[j] = acc_n[j] = 0.f;
#pragma unroll 4
      for (int64_t i = 0; i < k; ++i) {
        float cs, cn;
        coefficients(timesteps, alphas, i, num_train, cs, cn);
        const P gp = *reinterpret_cast<const P*>(grad + out_row(i, b, k, batch, sample_major) * n + col);
        float g[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] = Elem<T>::load(gp.v[j]);
        if (d_z0 != nullptr) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc_z[j] = fmaf(cs, g[j], acc_z[j]);
        }
        if (d_noise != nullptr) {
          if (shared_noise) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc_n[j] = fmaf(cn, g[j], acc_n[j]);
          } else {
            P o;
#pragma unroll
            for (int j = 0; j < VEC; ++j) o.v[j] = Elem<T>::store(cn * g[j]);
            *reinterpret_cast<P*>(d_noise + (i * batch + b) * n + col) = o;
          }
        }
      }
      if (d_z0 != nullptr) {
        P o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = Elem<T>::store(acc_z[j]);
        *reinterpret_cast<P*>(d_z0 + b * n + col) = o;
      }
      if (d_noise != nullptr && shared_noise) {
        P o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = Elem<T>::store(acc_n[j]);
        *reinterpret_cast<P*>(d_noise + b * n + col) = o;
      }
    }
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses need every row to start on a 16-byte boundary: n a multiple
// of VEC and every base pointer aligned. Otherwise one element per access.
template <typename T>
bool can_vectorise(int64_t n, const void* a, const void* b, const void* c) {
  constexpr int vec = 16 / sizeof(T);
  return n % vec == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

dim3 grid_for(int64_t batch, int64_t vecs) {
  const int64_t x = std::min<int64_t>(kMaxGridX, std::max<int64_t>(1, ceil_div(vecs, kThreads)));
  const int64_t y = std::min<int64_t>(kMaxGridY, std::max<int64_t>(1, batch));
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

template <typename T, typename A>
cudaError_t launch_fwd(const void* z0, const void* noise, const int64_t* timesteps, const void* alphas, void* out,
                       int64_t batch, int64_t n, int64_t k, int64_t num_train, bool shared_noise, bool sample_major,
                       cudaStream_t stream) {
  const T* z = static_cast<const T*>(z0);
  const T* e = static_cast<const T*>(noise);
  const A* a = static_cast<const A*>(alphas);
  T* o = static_cast<T*>(out);
  if (can_vectorise<T>(n, z0, noise, out)) {
    constexpr int vec = 16 / sizeof(T);
    q_sample_fwd_kernel<T, A, vec><<<grid_for(batch, n / vec), kThreads, 0, stream>>>(
        z, e, timesteps, a, o, batch, n, k, num_train, shared_noise, sample_major);
  } else {
    q_sample_fwd_kernel<T, A, 1><<<grid_for(batch, n), kThreads, 0, stream>>>(z, e, timesteps, a, o, batch, n, k,
                                                                              num_train, shared_noise, sample_major);
  }
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t launch_bwd(const void* grad, const int64_t* timesteps, const void* alphas, void* d_z0, void* d_noise,
                       int64_t batch, int64_t n, int64_t k, int64_t num_train, bool shared_noise, bool sample_major,
                       cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad);
  const A* a = static_cast<const A*>(alphas);
  T* dz = static_cast<T*>(d_z0);
  T* dn = static_cast<T*>(d_noise);
  if (can_vectorise<T>(n, grad, d_z0, d_noise)) {
    constexpr int vec = 16 / sizeof(T);
    q_sample_bwd_kernel<T, A, vec><<<grid_for(batch, n / vec), kThreads, 0, stream>>>(
        g, timesteps, a, dz, dn, batch, n, k, num_train, shared_noise, sample_major);
  } else {
    q_sample_bwd_kernel<T, A, 1><<<grid_for(batch, n), kThreads, 0, stream>>>(g, timesteps, a, dz, dn, batch, n, k,
                                                                              num_train, shared_noise, sample_major);
  }
  return cudaGetLastError();
}

// Returns f(TypeTag<A>{}) for the schedule type A that dtype names (float,
// double); cudaErrorInvalidValue for any other dtype.
template <typename F>
cudaError_t with_schedule_type(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32:
      return f(TypeTag<float>{});
    case Dtype::kFloat64:
      return f(TypeTag<double>{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t q_sample_multi_fwd(Dtype dtype, Dtype schedule_dtype, const void* z0, const void* noise,
                               const int64_t* timesteps, const void* alphas_cumprod, void* out, int64_t batch,
                               int64_t n, int64_t k, int64_t num_train, bool shared_noise, bool sample_major,
                               cudaStream_t stream) {
  if (batch <= 0 || n <= 0 || k <= 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) {
    return with_schedule_type(schedule_dtype, [&](auto a) {
      using T = typename decltype(t)::type;
      using A = typename decltype(a)::type;
      return launch_fwd<T, A>(z0, noise, timesteps, alphas_cumprod, out, batch, n, k, num_train, shared_noise,
                              sample_major, stream);
    });
  });
}

cudaError_t q_sample_multi_bwd(Dtype dtype, Dtype schedule_dtype, const void* grad, const int64_t* timesteps,
                               const void* alphas_cumprod, void* d_z0, void* d_noise, int64_t batch, int64_t n,
                               int64_t k, int64_t num_train, bool shared_noise, bool sample_major,
                               cudaStream_t stream) {
  // k = 0 still launches when a sum is asked for: the kernel writes its zeros.
  if (batch <= 0 || n <= 0 || (d_z0 == nullptr && d_noise == nullptr)) return cudaSuccess;
  if (k == 0 && !shared_noise) d_noise = nullptr;  // (0, B, N): nothing to write
  if (d_z0 == nullptr && d_noise == nullptr) return cudaSuccess;
  return with_element_type(dtype, [&](auto t) {
    return with_schedule_type(schedule_dtype, [&](auto a) {
      using T = typename decltype(t)::type;
      using A = typename decltype(a)::type;
      return launch_bwd<T, A>(grad, timesteps, alphas_cumprod, d_z0, d_noise, batch, n, k, num_train,
                              shared_noise, sample_major, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastdense
