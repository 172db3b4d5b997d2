// CPU kernels of fastdense::_q_sample_multi_fwd / _q_sample_multi_bwd
// (schemas: csrc/q_sample_multi_schema.cpp; contract and equations:
// fastdense/ops/q_sample_multi.py).
//
// The op is purely memory-bound, so the kernels are organised around touching
// each input element once: work items are (sample b, chunk of kChunk columns);
// an item loads its z0 chunk (and the shared noise chunk) into L1 once and
// writes all k output rows from it. The backward reads the k gradient rows of
// an item once, accumulating both sums in registers / an L1 scratch. The
// column loops are plain loops over restrict pointers in the math type
// (float, or double for double) that the compiler vectorises; they get AVX2
// and AVX-512 clones picked at load time where the toolchain supports it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define FASTDENSE_QS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDENSE_QS_CLONES
#endif

namespace fastdense {
namespace {

using at::Tensor;

constexpr const char* kOp = "fastdense q_sample_multi (cpp): ";
// Columns per work item: z0, a shared noise chunk and the backward's two
// accumulators stay in L1 while the k rows are written / read.
constexpr int64_t kChunk = 1024;

// (√ᾱ_t, √(1 − ᾱ_t)) in the math type of the element type: ᾱ is first cast to
// it, as reference.q_sample_multi does, then the square roots are taken.
template <typename math_t>
void coefficients(const Tensor& timesteps, const Tensor& alphas_cumprod, std::vector<math_t>& c_signal,
                  std::vector<math_t>& c_noise) {
  const int64_t k = timesteps.size(0);
  const int64_t num_train = alphas_cumprod.size(0);
  const Tensor ts = timesteps.contiguous();
  const Tensor abar = alphas_cumprod.to(at::kDouble).contiguous();
  const int64_t* t = ts.data_ptr<int64_t>();
  const double* a = abar.data_ptr<double>();
  c_signal.resize(k);
  c_noise.resize(k);
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < num_train, kOp, "timesteps must lie in [0, len(alphas_cumprod)) = [0, ",
                      num_train, "), got timesteps[", i, "] = ", t[i]);
    const math_t v = static_cast<math_t>(a[t[i]]);
    c_signal[i] = std::sqrt(v);
    c_noise[i] = std::sqrt(math_t(1) - v);
  }
}

void check_schedule(const Tensor& timesteps, const Tensor& alphas_cumprod) {
  TORCH_CHECK_VALUE(timesteps.device().is_cpu() && alphas_cumprod.device().is_cpu(), kOp,
                    "timesteps and alphas_cumprod must be CPU tensors, got ", timesteps.device(), " and ",
                    alphas_cumprod.device());
  TORCH_CHECK_TYPE(timesteps.scalar_type() == at::kLong, kOp, "timesteps must be int64, got ",
                   timesteps.scalar_type());
  TORCH_CHECK_VALUE(timesteps.dim() == 1, kOp, "timesteps must have shape (k,), got ", timesteps.sizes());
  const auto at = alphas_cumprod.scalar_type();
  TORCH_CHECK_TYPE(at == at::kFloat || at == at::kDouble, kOp, "alphas_cumprod must be float32 or float64, got ",
                   at);
  TORCH_CHECK_VALUE(alphas_cumprod.dim() == 1 && alphas_cumprod.size(0) >= 1, kOp,
                    "alphas_cumprod must have shape (T_train,), got ", alphas_cumprod.sizes());
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, kOp, name,
                   " must be float32/float64/float16/bfloat16, got ", st);
}

// Output row of timestep i, sample b.
inline int64_t out_row(int64_t i, int64_t b, int64_t k, int64_t batch, bool sample_major) {
  return sample_major ? b * k + i : i * batch + b;
}

// Grain of parallel_for in work items, so each task moves ~GRAIN_SIZE elements.
int64_t item_grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elems_per_item));
}

// ---------------------------------------------------------------------------- column loops
// o[j] = cs * z[j] + cn * e[j]
template <typename T, typename M>
C10_ALWAYS_INLINE void noise_row(T* C10_RESTRICT o, const T* C10_RESTRICT z, const T* C10_RESTRICT e, M cs, M cn,
                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(cs * static_cast<M>(z[j]) + cn * static_cast<M>(e[j]));
}

// acc[j] (+)= c * g[j]
template <typename T, typename M>
C10_ALWAYS_INLINE void scale_into(M* C10_RESTRICT acc, const T* C10_RESTRICT g, M c, int64_t n, bool first) {
  if (first) {
    for (int64_t j = 0; j < n; ++j) acc[j] = c * static_cast<M>(g[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j] += c * static_cast<M>(g[j]);
  }
}

template <typename T, typename M>
C10_ALWAYS_INLINE void scale_row(T* C10_RESTRICT d, const T* C10_RESTRICT g, M c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<T>(c * static_cast<M>(g[j]));
}

template <typename T, typename M>
C10_ALWAYS_INLINE void store_row(T* C10_RESTRICT d, const M* C10_RESTRICT acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = static_cast<T>(acc[j]);
}

// Problem of one call (pointers to contiguous arrays).
template <typename T, typename M>
struct Problem {
  int64_t batch, n, k, steps;  // steps = S, 1 when the noise is shared
  bool sample_major;
  const M* c_signal;
  const M* c_noise;
};

// Items [i0, i1) of the forward: item = b * chunks + c.
template <typename T, typename M>
void forward_items(const Problem<T, M>& p, const T* z0, const T* noise, T* out, int64_t i0, int64_t i1) {
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / chunks;
    const int64_t j0 = (item % chunks) * kChunk;
    const int64_t len = std::min(kChunk, p.n - j0);
    const T* z = z0 + b * p.n + j0;
    for (int64_t i = 0; i < p.k; ++i) {
      const T* e = noise + ((p.steps == 1 ? 0 : i) * p.batch + b) * p.n + j0;
      T* o = out + out_row(i, b, p.k, p.batch, p.sample_major) * p.n + j0;
      noise_row<T, M>(o, z, e, p.c_signal[i], p.c_noise[i], len);
    }
  }
}

template <typename T, typename M>
void backward_items(const Problem<T, M>& p, const T* grad, T* d_z0, T* d_noise, int64_t i0, int64_t i1) {
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  M acc_z[kChunk];
  M acc_n[kChunk];
  const bool shared = p.steps == 1;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / chunks;
    const int64_t j0 = (item % chunks) * kChunk;
    const int64_t len = std::min(kChunk, p.n - j0);
    for (int64_t i = 0; i < p.k; ++i) {
      const T* g = grad + out_row(i, b, p.k, p.batch, p.sample_major) * p.n + j0;
      if (d_z0) scale_into<T, M>(acc_z, g, p.c_signal[i], len, i == 0);
      if (d_noise) {
        if (shared) {
          scale_into<T, M>(acc_n, g, p.c_noise[i], len, i == 0);
        } else {
          scale_row<T, M>(d_noise + (i * p.batch + b) * p.n + j0, g, p.c_noise[i], len);
        }
      }
    }
    if (d_z0) store_row<T, M>(d_z0 + b * p.n + j0, acc_z, len);
    if (d_noise && shared) store_row<T, M>(d_noise + b * p.n + j0, acc_n, len);
  }
}

#define FASTDENSE_QS_INSTANCES(T)                                                                                  \
  FASTDENSE_QS_CLONES void run_forward(const Problem<T, at::opmath_type<T>>& p, const T* z0, const T* noise,      \
                                       T* out, int64_t i0, int64_t i1) {                                          \
    forward_items(p, z0, noise, out, i0, i1);                                                                      \
  }                                                                                                                \
  FASTDENSE_QS_CLONES void run_backward(const Problem<T, at::opmath_type<T>>& p, const T* grad, T* d_z0,          \
                                        T* d_noise, int64_t i0, int64_t i1) {                                     \
    backward_items(p, grad, d_z0, d_noise, i0, i1);                                                                \
  }

FASTDENSE_QS_INSTANCES(float)
FASTDENSE_QS_INSTANCES(double)
FASTDENSE_QS_INSTANCES(at::Half)
FASTDENSE_QS_INSTANCES(at::BFloat16)
#undef FASTDENSE_QS_INSTANCES

// ---------------------------------------------------------------------------- ops
Tensor q_sample_multi_fwd_cpu(const Tensor& z0_in, const Tensor& noise_in, const Tensor& timesteps,
                              const Tensor& alphas_cumprod, bool sample_major) {
  check_float(z0_in, "z0");
  check_float(noise_in, "noise");
  check_schedule(timesteps, alphas_cumprod);
  TORCH_CHECK_VALUE(z0_in.dim() == 2, kOp, "z0 must have shape (B, N), got ", z0_in.sizes());
  TORCH_CHECK_TYPE(noise_in.scalar_type() == z0_in.scalar_type(), kOp, "noise has dtype ", noise_in.scalar_type(),
                   " but z0 has ", z0_in.scalar_type());
  const int64_t batch = z0_in.size(0), n = z0_in.size(1), k = timesteps.size(0);
  TORCH_CHECK_VALUE(noise_in.dim() == 3 && (noise_in.size(0) == 1 || noise_in.size(0) == k) &&
                        noise_in.size(1) == batch && noise_in.size(2) == n,
                    kOp, "noise must have shape (1 or k=", k, ", B=", batch, ", N=", n, "), got ", noise_in.sizes());
  const Tensor z0 = z0_in.contiguous(), noise = noise_in.contiguous();
  Tensor out = at::empty({k * batch, n}, z0.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "q_sample_multi_fwd_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    std::vector<math_t> cs, cn;
    coefficients<math_t>(timesteps, alphas_cumprod, cs, cn);
    const Problem<scalar_t, math_t> p{batch, n, k, noise.size(0), sample_major, cs.data(), cn.data()};
    const scalar_t* zp = z0.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int64_t per_item = std::min(kChunk, n) * (k + 1 + p.steps);
    at::parallel_for(0, batch * chunks, item_grain(per_item),
                     [&](int64_t i0, int64_t i1) { run_forward(p, zp, np, op, i0, i1); });
  });
  return out;
}

std::tuple<Tensor, Tensor> q_sample_multi_bwd_cpu(const Tensor& grad_in, const Tensor& timesteps,
                                                  const Tensor& alphas_cumprod, int64_t batch, bool sample_major,
                                                  bool shared_noise, const c10::List<bool>& needs) {
  check_float(grad_in, "grad");
  check_schedule(timesteps, alphas_cumprod);
  TORCH_CHECK_VALUE(needs.size() == 2, kOp, "needs must have 2 entries (z0, noise), got ", needs.size());
  const int64_t k = timesteps.size(0);
  TORCH_CHECK_VALUE(batch >= 0, kOp, "batch must be >= 0, got ", batch);
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == k * batch, kOp, "grad must have shape (k·B=", k * batch,
                    ", N), got ", grad_in.sizes());
  const int64_t n = grad_in.size(1);
  const int64_t steps = shared_noise ? 1 : k;
  const Tensor grad = grad_in.contiguous();
  const bool need_z0 = needs.get(0), need_noise = needs.get(1);
  // A shared noise with k = 0 timesteps, or z0's gradient, is a sum of nothing: zeros.
  Tensor d_z0 = need_z0 ? (k == 0 ? at::zeros({batch, n}, grad.options()) : at::empty({batch, n}, grad.options()))
                        : at::empty({0}, grad.options());
  Tensor d_noise = need_noise ? (k == 0 ? at::zeros({steps, batch, n}, grad.options())
                                        : at::empty({steps, batch, n}, grad.options()))
                              : at::empty({0}, grad.options());
  if (k == 0 || batch == 0 || n == 0 || !(need_z0 || need_noise)) return {d_z0, d_noise};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "q_sample_multi_bwd_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    std::vector<math_t> cs, cn;
    coefficients<math_t>(timesteps, alphas_cumprod, cs, cn);
    const Problem<scalar_t, math_t> p{batch, n, k, steps, sample_major, cs.data(), cn.data()};
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dz = need_z0 ? d_z0.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dn = need_noise ? d_noise.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int64_t per_item = std::min(kChunk, n) * (2 * k + 2);
    at::parallel_for(0, batch * chunks, item_grain(per_item),
                     [&](int64_t i0, int64_t i1) { run_backward(p, gp, dz, dn, i0, i1); });
  });
  return {d_z0, d_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CPU, m) {
  m.impl("_q_sample_multi_fwd", &q_sample_multi_fwd_cpu);
  m.impl("_q_sample_multi_bwd", &q_sample_multi_bwd_cpu);
}

}  // namespace fastdense
