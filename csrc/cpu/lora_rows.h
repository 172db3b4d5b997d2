// Row kernels of the CPU multi-task LoRA op (csrc/cpu/lora.cpp).
//
// They do the memory-bound part of the op, which BLAS cannot fuse: writing the
// G outputs from one base row, and reading the G output gradients once to sum
// them while their small-rank products (dh, dB) are taken from L1. A rank-r
// update with r <= kSmallRank is cheaper here, on a row already in cache, than
// as a skinny GEMM making one more pass over an (M, N) matrix.
//
// Each kernel processes a row range [i0, i1) and accumulates in
// at::opmath_type (fp32 for bf16); callers split rows across threads and give
// every thread its own scratch. The rank is a template parameter (dispatched
// once per row and adapter) so the inner loops over columns are fully
// vectorisable, with the rank loop unrolled into registers.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastdense {
namespace cpu {

constexpr int64_t kSmallRank = 16;

// One small-rank adapter applied by a row kernel: rows [off, off + len) of an
// (R, n) factor held in acc_t, coefficients h[i, off + k] scaled by `scale`.
template <typename acc_t>
struct SmallAdapter {
  int64_t off = 0, len = 0;
  acc_t scale = 0;
};

// f(std::integral_constant<int, r>) for a runtime r in [0, kSmallRank].
template <typename F>
C10_ALWAYS_INLINE void with_rank(int64_t r, F&& f) {
  switch (r) {
#define FASTDENSE_RANK_CASE(R) \
  case R:                      \
    f(std::integral_constant<int, R>{}); break;
    FASTDENSE_RANK_CASE(0) FASTDENSE_RANK_CASE(1) FASTDENSE_RANK_CASE(2) FASTDENSE_RANK_CASE(3)
    FASTDENSE_RANK_CASE(4) FASTDENSE_RANK_CASE(5) FASTDENSE_RANK_CASE(6) FASTDENSE_RANK_CASE(7)
    FASTDENSE_RANK_CASE(8) FASTDENSE_RANK_CASE(9) FASTDENSE_RANK_CASE(10) FASTDENSE_RANK_CASE(11)
    FASTDENSE_RANK_CASE(12) FASTDENSE_RANK_CASE(13) FASTDENSE_RANK_CASE(14) FASTDENSE_RANK_CASE(15)
    FASTDENSE_RANK_CASE(16)
#undef FASTDENSE_RANK_CASE
    default:
      break;
  }
}

// d[j] = (b ? b[j] : 0) + sum_k c[k] * mat[k * ld_mat + j],  j < n, k < R.
template <int R, typename out_t, typename acc_t>
C10_ALWAYS_INLINE void combine_row(out_t* C10_RESTRICT d, const acc_t* C10_RESTRICT b,
                                   const acc_t* C10_RESTRICT mat, int64_t ld_mat, const acc_t* c, int64_t n) {
  const acc_t* C10_RESTRICT m[R > 0 ? R : 1];
  acc_t ck[R > 0 ? R : 1];
  for (int k = 0; k < R; ++k) {
    m[k] = mat + k * ld_mat;
    ck[k] = c[k];
  }
  if (b) {
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = b[j];
#pragma GCC unroll 16
      for (int k = 0; k < R; ++k) acc += ck[k] * m[k][j];
      d[j] = static_cast<out_t>(acc);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = acc_t(0);
#pragma GCC unroll 16
      for (int k = 0; k < R; ++k) acc += ck[k] * m[k][j];
      d[j] = static_cast<out_t>(acc);
    }
  }
}

// One sweep over a gradient row v (n elements, in cache) for one adapter:
//   DH: dots[k] = sum_j v[j] * mat[k * ld_mat + j]           (k < R)
//   DB: acc[k * n + j] += c[k] * v[j]
// Partial dot sums are kept per lane in R vector registers (GNU vector
// extensions, lowered to the ISA of each clone), so the reduction needs no
// reassociation by the compiler; plain arrays of lanes stayed on the stack and
// measured several times slower.
template <int R, bool DH, bool DB, typename acc_t>
C10_ALWAYS_INLINE void adapter_sweep(const acc_t* C10_RESTRICT v, const acc_t* C10_RESTRICT mat, int64_t ld_mat,
                                     acc_t* dots, acc_t* C10_RESTRICT acc, const acc_t* c, int64_t n) {
  constexpr int64_t L = 64 / sizeof(acc_t);
  acc_t lanes[R > 0 ? R : 1][L] = {};
  int64_t j0 = 0;
#if defined(__GNUC__)
  typedef acc_t vec_t __attribute__((vector_size(64)));
  vec_t part[R > 0 ? R : 1];
  acc_t ck[R > 0 ? R : 1];
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k) {
    part[k] = vec_t{};
    ck[k] = DB ? c[k] : acc_t(0);
  }
  for (; j0 + L <= n; j0 += L) {
    vec_t vv;
    std::memcpy(&vv, v + j0, sizeof(vec_t));
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k) {
      if (DH) {
        vec_t mv;
        std::memcpy(&mv, mat + k * ld_mat + j0, sizeof(vec_t));
        part[k] += vv * mv;
      }
      if (DB) {
        vec_t av;
        std::memcpy(&av, acc + k * n + j0, sizeof(vec_t));
        av += ck[k] * vv;
        std::memcpy(acc + k * n + j0, &av, sizeof(vec_t));
      }
    }
  }
  if (DH) {
#pragma GCC unroll 16
    for (int k = 0; k < R; ++k) std::memcpy(lanes[k], &part[k], sizeof(vec_t));
  }
#endif
  for (int k = 0; k < R; ++k) {
    if (DH) {
      const acc_t* C10_RESTRICT m = mat + k * ld_mat;
      acc_t sum = acc_t(0);
      for (int64_t j = j0; j < n; ++j) sum += v[j] * m[j];
      for (int64_t l = 0; l < L; ++l) sum += lanes[k][l];
      dots[k] = sum;
    }
    if (DB) {
      acc_t* C10_RESTRICT a = acc + k * n;
      for (int64_t j = j0; j < n; ++j) a[j] += c[k] * v[j];
    }
  }
}

// Forward row pass. For each row i, with base = out[0] row (x W^T so far):
//   b      = base + bias
//   shared = s_0 h_0 B_0^T                        (only when adapter 0 is small)
//   out[t] = b + [shared if shared_in_tasks] + s_t h_t B_t^T
//            (a task of large rank gets a copy; a GEMM adds its update later)
//   base   = b + shared
// Scratch: 2 * n acc_t per thread.
template <typename scalar_t>
struct ExpandRows {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t n = 0;
  scalar_t* base = nullptr;        // (rows, n)
  const scalar_t* bias = nullptr;  // (n,) or null
  const scalar_t* h = nullptr;     // (rows, ld_h)
  int64_t ld_h = 0;
  const acc_t* bt = nullptr;       // B^T, (R, n)
  SmallAdapter<acc_t> shared;      // len 0: not applied here
  bool shared_in_tasks = false;
  std::vector<scalar_t*> dst;      // task outputs, (rows, n) each
  std::vector<SmallAdapter<acc_t>> tasks;  // len 0: not applied here

  C10_ALWAYS_INLINE void run(int64_t i0, int64_t i1, acc_t* scratch) const {
    const int64_t n = this->n, ld_h = this->ld_h;
    const acc_t* const bt = this->bt;
    acc_t* C10_RESTRICT b = scratch;
    acc_t* C10_RESTRICT sh = scratch + n;
    const SmallAdapter<acc_t> s0 = shared;
    const bool has_bias = bias != nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* C10_RESTRICT base_i = base + i * n;
      const scalar_t* hi = h + i * ld_h;
      acc_t c[kSmallRank];
      if (has_bias) {
        const scalar_t* C10_RESTRICT bias_p = bias;
        for (int64_t j = 0; j < n; ++j) b[j] = static_cast<acc_t>(base_i[j]) + static_cast<acc_t>(bias_p[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) b[j] = static_cast<acc_t>(base_i[j]);
      }
      if (s0.len) {
        for (int64_t k = 0; k < s0.len; ++k) c[k] = s0.scale * static_cast<acc_t>(hi[s0.off + k]);
        with_rank(s0.len, [&](auto r) C10_ALWAYS_INLINE_ATTRIBUTE {
          combine_row<decltype(r)::value>(sh, static_cast<const acc_t*>(nullptr), bt + s0.off * n, n, c, n);
        });
        if (shared_in_tasks) {
          for (int64_t j = 0; j < n; ++j) b[j] += sh[j];
        }
      }
      for (size_t t = 0; t < tasks.size(); ++t) {
        const SmallAdapter<acc_t> a = tasks[t];
        for (int64_t k = 0; k < a.len; ++k) c[k] = a.scale * static_cast<acc_t>(hi[a.off + k]);
        scalar_t* d = dst[t] + i * n;
        with_rank(a.len, [&](auto r) C10_ALWAYS_INLINE_ATTRIBUTE {
          combine_row<decltype(r)::value>(d, static_cast<const acc_t*>(b), bt + a.off * n, n, c, n);
        });
      }
      if (s0.len && !shared_in_tasks) {
        for (int64_t j = 0; j < n; ++j) base_i[j] = static_cast<scalar_t>(b[j] + sh[j]);
      } else if (has_bias || s0.len) {
        for (int64_t j = 0; j < n; ++j) base_i[j] = static_cast<scalar_t>(b[j]);
      }
    }
  }
};

// Backward row pass over the output gradient grad (G, M, n). For each row i:
//   gb[i] = sum_g grad[g][i]        (its column sum also added to colsum)
// and for every small-rank adapter a, with ga = gb[i] (adapter 0 in
// 'matrixv2') or grad[a][i]:
//   dh[i, off_a + k]  = s_a <ga, B_a[:, k]>          (need_dh)
//   dbt[packed_a + k] += s_a h[i, off_a + k] ga      (need_db: the thread's
//                                                     partial of dB_a^T)
// so every gradient row is read from memory once.
// Scratch: 2 * n acc_t per thread.
template <typename scalar_t>
struct GradRows {
  using acc_t = at::opmath_type<scalar_t>;
  struct Adapter {
    SmallAdapter<acc_t> a;
    int64_t index = 0;     // adapter number: reads grad[index]
    int64_t packed = 0;    // first row of this adapter in dbt
    bool from_gb = false;  // reads the summed gradient instead
    bool need_dh = false, need_db = false;
  };
  int64_t n = 0, groups = 0, ld_group = 0;
  const scalar_t* grad = nullptr;  // grad[g] row i at grad + g * ld_group + i * n
  bool need_gb = false;
  bool gb_store = false;           // gb has every row, else gb_row is one scratch row
  scalar_t* gb = nullptr;
  const acc_t* bt = nullptr;       // B^T, (R, n)
  scalar_t* dh = nullptr;          // (rows, ld_dh)
  int64_t ld_dh = 0;
  const scalar_t* h = nullptr;     // (rows, ld_h)
  int64_t ld_h = 0;
  std::vector<Adapter> adapters;

  C10_ALWAYS_INLINE void run(int64_t i0, int64_t i1, acc_t* dbt, scalar_t* gb_row, acc_t* colsum,
                             acc_t* scratch) const {
    const int64_t n = this->n, groups = this->groups, ld_group = this->ld_group;
    acc_t* C10_RESTRICT sum = scratch;
    acc_t* C10_RESTRICT v = scratch + n;
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* C10_RESTRICT gbi = gb_store ? gb + i * n : gb_row;
      if (need_gb) {
        const scalar_t* C10_RESTRICT g0 = grad + i * n;
        for (int64_t j = 0; j < n; ++j) sum[j] = static_cast<acc_t>(g0[j]);
        for (int64_t g = 1; g < groups; ++g) {
          const scalar_t* C10_RESTRICT gg = g0 + g * ld_group;
          for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<acc_t>(gg[j]);
        }
        for (int64_t j = 0; j < n; ++j) gbi[j] = static_cast<scalar_t>(sum[j]);
        if (colsum) {
          acc_t* C10_RESTRICT cs = colsum;
          for (int64_t j = 0; j < n; ++j) cs[j] += sum[j];
        }
      }
      for (const Adapter& ad : adapters) {
        const scalar_t* src = ad.from_gb ? gbi : grad + ad.index * ld_group + i * n;
        const acc_t* vp;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          vp = src;
        } else {
          for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(src[j]);
          vp = v;
        }
        const SmallAdapter<acc_t> a = ad.a;
        const scalar_t* hi = h + i * ld_h + a.off;
        acc_t c[kSmallRank], dots[kSmallRank];
        if (ad.need_db) {
          for (int64_t k = 0; k < a.len; ++k) c[k] = a.scale * static_cast<acc_t>(hi[k]);
        }
        acc_t* acc = ad.need_db ? dbt + ad.packed * n : nullptr;
        const acc_t* mat = bt + a.off * n;
        with_rank(a.len, [&](auto r) C10_ALWAYS_INLINE_ATTRIBUTE {
          constexpr int R = decltype(r)::value;
          if (ad.need_dh && ad.need_db)
            adapter_sweep<R, true, true>(vp, mat, n, dots, acc, c, n);
          else if (ad.need_dh)
            adapter_sweep<R, true, false>(vp, mat, n, dots, acc, c, n);
          else
            adapter_sweep<R, false, true>(vp, mat, n, dots, acc, c, n);
        });
        if (ad.need_dh) {
          scalar_t* d = dh + i * ld_dh + a.off;
          for (int64_t k = 0; k < a.len; ++k) d[k] = static_cast<scalar_t>(a.scale * dots[k]);
        }
      }
    }
  }
};

// dst[i, :] = sum_k coef[i, off + k] * mat[off + k, :] for one small adapter
// (d x_t = dh_t A_t); mat is (R, n) in acc_t.
template <typename scalar_t>
struct CombineRows {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t n = 0;
  scalar_t* dst = nullptr;         // (rows, n)
  const scalar_t* coef = nullptr;  // (rows, ld_coef)
  int64_t ld_coef = 0;
  const acc_t* mat = nullptr;
  SmallAdapter<acc_t> a;

  C10_ALWAYS_INLINE void run(int64_t i0, int64_t i1) const {
    const SmallAdapter<acc_t> a = this->a;
    acc_t c[kSmallRank];
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t k = 0; k < a.len; ++k) c[k] = a.scale * static_cast<acc_t>(coef[i * ld_coef + a.off + k]);
      with_rank(a.len, [&](auto r) C10_ALWAYS_INLINE_ATTRIBUTE {
        combine_row<decltype(r)::value>(dst + i * n, static_cast<const acc_t*>(nullptr), mat + a.off * n, n, c, n);
      });
    }
  }
};

}  // namespace cpu
}  // namespace fastdense
