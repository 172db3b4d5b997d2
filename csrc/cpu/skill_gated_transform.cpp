// CPU kernels of fastdense::_skill_adapter_fwd / _skill_adapter_bwd, TDSS's
// skill-gated transform for all T tasks (contract: fastdense/ops/skill_gated_transform.py,
// algorithm: fastdense/ops/_skill_gated_transform_torch.py).
//
// Two schedules of the same algorithm, chosen by the number of rows (whole_rows):
//
// Row-tiled (many rows: Swin-T stages 1-2 at batch 1 and everything in bf16):
// at::parallel_for hands each thread whole tiles of rows; a tile's
// intermediates (h, the 2T softmax gates, γ/β, h_s and GELU(h_s) of every task)
// stay in per-thread scratch sized to fit in L2, so the only (N, ·) traffic is
// reading x (and h, grad in backward) and writing the T outputs (dx, h).
//   forward, per tile:  h = x W_d;  L = h W_g (all 2T gate projections, one
//     GEMM with the packed (R, T·2·M) gate weights);  P = softmax(L) per M
//     group;  [γ|β] = P S (one GEMM);  G_t = GELU(γ_t ⊙ h + β_t) into a
//     (T, tile, R) buffer;  out_t = G_t W_u.
//   backward, per tile: recompute the above from the saved h;  dG_t = dY_t W_uᵀ,
//     dZ = dG ⊙ GELU'(Z), d[γ|β], dh (direct), dP = d[γ|β] Sᵀ, softmax backward,
//     dh += dL W_gᵀ, dx = dh W_dᵀ; the parameter gradients (W_u, S, W_g, W_d)
//     accumulate into one partial per thread chunk, reduced at the end in a
//     fixed order (deterministic for a given thread count).
//
// Whole (few rows: Swin-T stages 3-4, fp32/fp64): the GEMMs with W_d and W_u,
// which are almost all of the FLOPs, run once over all rows (T·N rows for W_u)
// through BLAS, which threads and blocks them itself; only the gate part runs
// in row tiles. Row-tile GEMMs of a few dozen rows measured up to 1.6x slower
// than one GEMM over all rows (MKL, 1 thread, stage 3), and at stage 4 there are
// too few tiles to share evenly between threads. It keeps (T, N, R) buffers of
// G (and dG in backward), a quarter of the output's size at TDSS's R = C/4.
//
// The tile GEMMs, GELU and the exponentials go through ATen (MKL and the
// vectorised element-wise kernels); inside the parallel region they run on the
// calling thread, under the caller's thread-local state (so the profiler, which
// bench/conftest.py reads peak memory from, sees their allocations). Compute is
// in at::opmath_type (fp32 for bf16 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastdense {
namespace {

using at::Tensor;

struct Dims {
  int64_t N = 0, C = 0, R = 0, M = 0, T = 0;
  int64_t gates() const { return T * 2 * M; }  // width of the packed gate logits
};

void check_operand(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastdense skill_adapter (cpp): ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastdense skill_adapter (cpp): ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type());
}

Dims make_dims(const Tensor& x, const Tensor& w_down, const Tensor& w_up, const Tensor& skills,
               const Tensor& w_gamma, const Tensor& w_beta) {
  TORCH_CHECK(x.device().is_cpu(), "fastdense skill_adapter (cpp): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "fastdense skill_adapter (cpp): x must have shape (N, C), got ", x.sizes());
  Dims d;
  d.N = x.size(0);
  d.C = x.size(1);
  check_operand(w_down, "w_down", x);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == d.C && w_down.size(1) >= 1,
              "fastdense skill_adapter (cpp): w_down must have shape (C=", d.C, ", R), got ", w_down.sizes());
  d.R = w_down.size(1);
  check_operand(w_up, "w_up", x);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(0) == d.R && w_up.size(1) == d.C,
              "fastdense skill_adapter (cpp): w_up must have shape (R=", d.R, ", C=", d.C, "), got ", w_up.sizes());
  check_operand(skills, "skills", x);
  TORCH_CHECK(skills.dim() == 2 && skills.size(0) >= 1 && skills.size(1) == d.R,
              "fastdense skill_adapter (cpp): skills must have shape (M, R=", d.R, "), got ", skills.sizes());
  d.M = skills.size(0);
  check_operand(w_gamma, "w_gamma", x);
  TORCH_CHECK(w_gamma.dim() == 3 && w_gamma.size(0) >= 1 && w_gamma.size(1) == d.R && w_gamma.size(2) == d.M,
              "fastdense skill_adapter (cpp): w_gamma must have shape (T, R=", d.R, ", M=", d.M, "), got ",
              w_gamma.sizes());
  d.T = w_gamma.size(0);
  check_operand(w_beta, "w_beta", x);
  TORCH_CHECK(w_beta.sizes() == w_gamma.sizes(), "fastdense skill_adapter (cpp): w_beta must have the shape of ",
              "w_gamma ", w_gamma.sizes(), ", got ", w_beta.sizes());
  return d;
}

// The ATen calls of a tile run on OpenMP worker threads, which do not inherit
// the caller's "below autograd" dispatch state: without this guard, operands
// that require grad make the out= calls refuse to run.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

at::ScalarType acc_type(at::ScalarType st) { return st == at::kBFloat16 ? at::kFloat : st; }

// Rows per tile: the per-tile scratch (about C + 8·T·R + 3·T·2·M numbers a row)
// stays near 1 MiB of fp32, about a core's L2, with 64 to 512 rows: the rows
// are the inner dimension of the parameter-gradient GEMMs (dW_u += Gᵀ dY, ...),
// which update a whole (R, C) partial per tile and would be bound by that
// traffic with thinner tiles. The tile count is then rounded up to a multiple
// of the thread count and the rows spread evenly over the tiles: with 4 tiles
// of 64, 64, 64 and 4 rows (Swin-T stage 4, N = 196), one of two threads got
// two thirds of the work.
int64_t tile_rows(const Dims& d) {
  const int64_t per_row = d.C + 8 * d.T * d.R + 3 * d.gates();
  const int64_t cap = std::clamp<int64_t>(262144 / std::max<int64_t>(1, per_row), 64, 512);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tiles = (d.N + cap - 1) / cap;
  tiles = (tiles + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (d.N + tiles - 1) / tiles);
}

// The whole schedule (see the top of the file) when the T·N rows of the W_u
// GEMMs are at most this many. Measured (fp32, 1 thread, CPU time, Swin-T
// shapes at batch 1 with R = C/4, T = 4, M = 10, forward + backward, kernels
// alone): whole / row-tiled = 7.6 / 9.8 ms at stage 4 (T·N = 784), 9.5 / 10.3
// ms at stage 3 (3136). Whole is also 5-7% faster at stages 2 and 1 (12544,
// 50176 rows), but its (T, N, R) buffers of G and dG grow with N (9.6 MB at
// stage 1, half the output gradient) where the row tiles keep about 1 MB per
// thread: above this many rows the bounded memory wins.
constexpr int64_t kWholeRowsMax = 4096;

template <typename scalar_t>
bool whole_rows(const Dims& d) {
  return std::is_same_v<scalar_t, at::opmath_type<scalar_t>> && d.T * d.N <= kWholeRowsMax;
}

// (T, R, M) x 2 -> (R, T·2·M): column block (t, 0) is W_γ^t, (t, 1) is W_β^t.
Tensor pack_gates(const Tensor& w_gamma, const Tensor& w_beta, at::ScalarType acc) {
  const int64_t T = w_gamma.size(0), R = w_gamma.size(1), M = w_gamma.size(2);
  return at::stack({w_gamma, w_beta}, 1).permute({2, 0, 1, 3}).reshape({R, T * 2 * M}).to(acc).contiguous();
}

// In-place softmax of `groups` contiguous rows of M logits. ATen's softmax
// measured ~10x slower on these short (M = 10) rows; here the max shift and
// the normalisation are plain loops and the exponentials one vectorised
// at::exp_ over the whole tile.
template <typename acc_t>
void softmax_groups(Tensor logits, int64_t groups, int64_t M) {
  acc_t* p = logits.data_ptr<acc_t>();
  for (int64_t g = 0; g < groups; ++g) {
    acc_t* q = p + g * M;
    acc_t mx = q[0];
    for (int64_t m = 1; m < M; ++m) mx = std::max(mx, q[m]);
    for (int64_t m = 0; m < M; ++m) q[m] -= mx;
  }
  at::exp_(logits);
  for (int64_t g = 0; g < groups; ++g) {
    acc_t* q = p + g * M;
    acc_t sum = acc_t(0);
    for (int64_t m = 0; m < M; ++m) sum += q[m];
    const acc_t inv = acc_t(1) / sum;
    for (int64_t m = 0; m < M; ++m) q[m] *= inv;
  }
}

// Softmax backward in place: dl holds dP on entry, dL = P ⊙ (dP − ⟨P, dP⟩) on exit.
template <typename acc_t>
void softmax_backward_groups(acc_t* dl, const acc_t* p, int64_t groups, int64_t M) {
  for (int64_t g = 0; g < groups; ++g) {
    acc_t* d = dl + g * M;
    const acc_t* q = p + g * M;
    acc_t dot = acc_t(0);
    for (int64_t m = 0; m < M; ++m) dot += q[m] * d[m];
    for (int64_t m = 0; m < M; ++m) d[m] = q[m] * (d[m] - dot);
  }
}

// Z_t = γ_t ⊙ h + β_t for the n rows of a tile; gb is (n, T, 2, R), z is
// (T, ld_task / R, R) with task stride ld_task.
template <typename acc_t>
void transform_rows(const Dims& d, int64_t n, const acc_t* h, const acc_t* gb, acc_t* z, int64_t ld_task) {
  const int64_t R = d.R, T = d.T;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* hi = h + i * R;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* gamma = gb + ((i * T + t) * 2) * R;
      const acc_t* beta = gamma + R;
      acc_t* zi = z + t * ld_task + i * R;
      for (int64_t r = 0; r < R; ++r) zi[r] = gamma[r] * hi[r] + beta[r];
    }
  }
}

// From dZ (T, ·, R) with task stride ld_task: d[γ|β] (n, T, 2, R) and the direct
// part of dh, Σ_t dZ_t ⊙ γ_t.
template <typename acc_t>
void gate_grads_rows(const Dims& d, int64_t n, const acc_t* h, const acc_t* gb, const acc_t* dz, int64_t ld_task,
                     acc_t* dgb, acc_t* dh) {
  const int64_t R = d.R, T = d.T;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* hi = h + i * R;
    acc_t* dhi = dh + i * R;
    for (int64_t r = 0; r < R; ++r) dhi[r] = acc_t(0);
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* gamma = gb + ((i * T + t) * 2) * R;
      const acc_t* dzi = dz + t * ld_task + i * R;
      acc_t* dgamma = dgb + ((i * T + t) * 2) * R;
      acc_t* dbeta = dgamma + R;
      for (int64_t r = 0; r < R; ++r) {
        dgamma[r] = dzi[r] * hi[r];
        dbeta[r] = dzi[r];
        dhi[r] += dzi[r] * gamma[r];
      }
    }
  }
}

// Per-thread scratch of one tile, in the accumulation type. `whole`: the
// schedule keeps G and dG in (T, N, R) buffers, so no per-tile g / dg.
struct Scratch {
  Tensor xa, ha, logits, probs_grad, gb, dgb, z, g, dg, ya, dh;

  Scratch(const Dims& d, int64_t tile, const at::TensorOptions& acc, bool copy_in, bool backward, bool whole) {
    if (copy_in) {  // bf16: x, h, and each output / grad row block go through an fp32 copy
      xa = at::empty({tile, d.C}, acc);
      ha = at::empty({tile, d.R}, acc);
      ya = at::empty({tile, d.C}, acc);
    }
    logits = at::empty({tile, d.gates()}, acc);
    gb = at::empty({tile * d.T * 2, d.R}, acc);
    if (backward || !whole) z = at::empty({d.T, tile, d.R}, acc);
    if (!whole) g = at::empty({d.T, tile, d.R}, acc);
    if (backward) {
      probs_grad = at::empty({tile, d.gates()}, acc);
      dgb = at::empty({tile * d.T * 2, d.R}, acc);
      if (!whole) dg = at::empty({d.T, tile, d.R}, acc);
      dh = at::empty({tile, d.R}, acc);
    }
  }
};

// Rows [i0, i0 + n) of `src` in the accumulation type: a view, or a copy into buf.
Tensor rows_acc(const Tensor& src, int64_t i0, int64_t n, const Tensor& buf) {
  Tensor v = src.narrow(0, i0, n);
  if (!buf.defined()) return v;
  return buf.narrow(0, 0, n).copy_(v);
}

// Recomputes the gates of a tile from h: probs (n, T·2·M) in s.logits, γ/β in
// s.gb, Z_t of the tile's rows at z + t·ld_task (rows of R); returns the
// (n, T·2·M) probabilities.
template <typename acc_t>
Tensor gates_tile(const Dims& d, int64_t n, const Tensor& ht, const Tensor& wg, const Tensor& sk, Scratch& s,
                  acc_t* z, int64_t ld_task) {
  Tensor lg = s.logits.narrow(0, 0, n);
  at::mm_out(lg, ht, wg);
  Tensor probs = lg.view({n * d.T * 2, d.M});
  softmax_groups<acc_t>(probs, n * d.T * 2, d.M);
  Tensor gbt = s.gb.narrow(0, 0, n * d.T * 2);
  at::mm_out(gbt, probs, sk);
  transform_rows<acc_t>(d, n, ht.data_ptr<acc_t>(), gbt.data_ptr<acc_t>(), z, ld_task);
  return lg;
}

// Z of a tile in the scratch's (T, tile, R) buffer.
template <typename acc_t>
Tensor gates_tile(const Dims& d, int64_t n, const Tensor& ht, const Tensor& wg, const Tensor& sk, Scratch& s) {
  return gates_tile<acc_t>(d, n, ht, wg, sk, s, s.z.data_ptr<acc_t>(), s.z.size(1) * d.R);
}

// ============================================================================ forward
template <typename scalar_t>
void forward_impl(const Dims& d, const Tensor& x, const Tensor& w_down, const Tensor& w_up, const Tensor& skills,
                  const Tensor& w_gamma, const Tensor& w_beta, const Tensor& out, const Tensor& h) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool copy_in = !std::is_same_v<scalar_t, acc_t>;
  // The op is differentiated as a whole (fastdense/ops/_define.py): out= calls
  // on parameters that require grad must not reach autograd.
  const BelowAutograd below_autograd;
  const bool whole = whole_rows<scalar_t>(d);
  const auto acc = acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Tensor wd = w_down.to(acc).contiguous(), wu = w_up.to(acc).contiguous(), sk = skills.to(acc).contiguous();
  const Tensor wg = pack_gates(w_gamma, w_beta, acc);
  const int64_t tile = tile_rows(d);
  const int64_t n_tiles = (d.N + tile - 1) / tile;
  // whole: h over all rows, G of all tasks in one buffer, the outputs as one GEMM below.
  Tensor g_all;
  if (whole) {
    Tensor h_all = h;  // a handle: mm_out takes a non-const reference
    at::mm_out(h_all, x, wd);
    g_all = at::empty({d.T, d.N, d.R}, acc_opts);
  }

  const at::ThreadLocalState tls;
  at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    const BelowAutograd below_autograd;
    Scratch s(d, tile, acc_opts, copy_in, false, whole);
    for (int64_t k = b; k < e; ++k) {
      const int64_t i0 = k * tile, n = std::min(tile, d.N - i0);
      if (whole) {
        Tensor zt = g_all.narrow(1, i0, n);  // Z, then GELU(Z) in place
        gates_tile<acc_t>(d, n, h.narrow(0, i0, n), wg, sk, s, zt.data_ptr<acc_t>(), d.N * d.R);
        at::gelu_out(zt, zt);
        continue;
      }
      const Tensor xt = rows_acc(x, i0, n, s.xa);
      Tensor ht = copy_in ? s.ha.narrow(0, 0, n) : h.narrow(0, i0, n);
      at::mm_out(ht, xt, wd);
      if (copy_in) h.narrow(0, i0, n).copy_(ht);
      gates_tile<acc_t>(d, n, ht, wg, sk, s);
      Tensor g = s.g.narrow(1, 0, n);
      at::gelu_out(g, s.z.narrow(1, 0, n));
      for (int64_t t = 0; t < d.T; ++t) {
        Tensor dst = out.select(0, t).narrow(0, i0, n);
        if (copy_in) {
          Tensor ya = s.ya.narrow(0, 0, n);
          at::mm_out(ya, g.select(0, t), wu);
          dst.copy_(ya);
        } else {
          at::mm_out(dst, g.select(0, t), wu);
        }
      }
    }
  });
  if (whole) {
    Tensor out2 = out.view({d.T * d.N, d.C});
    at::mm_out(out2, g_all.view({d.T * d.N, d.R}), wu);
  }
}

std::tuple<Tensor, Tensor> skill_adapter_fwd_cpu(const Tensor& x_in, const Tensor& w_down, const Tensor& w_up,
                                                 const Tensor& skills, const Tensor& w_gamma, const Tensor& w_beta) {
  const Dims d = make_dims(x_in, w_down, w_up, skills, w_gamma, w_beta);
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty({d.T, d.N, d.C}, x.options());
  Tensor h = at::empty({d.N, d.R}, x.options());
  if (d.N == 0) return {out, h};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastdense_skill_adapter_fwd", [&] {
    forward_impl<scalar_t>(d, x, w_down, w_up, skills, w_gamma, w_beta, out, h);
  });
  return {out, h};
}

// ============================================================================ backward
template <typename scalar_t>
void backward_impl(const Dims& d, const Tensor& grad, const Tensor& x, const Tensor& w_down, const Tensor& w_up,
                   const Tensor& skills, const Tensor& w_gamma, const Tensor& w_beta, const Tensor& h,
                   const bool* needs, Tensor& dx, Tensor& dwd, Tensor& dwu, Tensor& dsk, Tensor& dwg, Tensor& dwb) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool copy_in = !std::is_same_v<scalar_t, acc_t>;
  // The op is differentiated as a whole (fastdense/ops/_define.py): out= calls
  // on parameters that require grad must not reach autograd.
  const BelowAutograd below_autograd;
  const bool whole = whole_rows<scalar_t>(d);
  const auto acc = acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const Tensor wd = w_down.to(acc).contiguous(), wu = w_up.to(acc).contiguous(), sk = skills.to(acc).contiguous();
  const Tensor wg = pack_gates(w_gamma, w_beta, acc);
  const int64_t tile = tile_rows(d);
  const int64_t n_tiles = (d.N + tile - 1) / tile;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(threads, n_tiles));
  const bool need_dgates = needs[4] || needs[5];
  const bool need_dh = needs[0] || needs[1];
  // dZ feeds every gradient but W_u's.
  const bool need_dz = need_dh || need_dgates || needs[3];

  // One partial per chunk of rows, reduced below in a fixed order. The whole
  // schedule computes dW_u and dW_d as GEMMs over all rows instead.
  auto partial = [&](bool need, at::IntArrayRef shape) {
    std::vector<int64_t> full{n_chunks};
    full.insert(full.end(), shape.begin(), shape.end());
    return need ? at::zeros(full, acc_opts) : Tensor();
  };
  Tensor dwu_p = partial(needs[2] && !whole, {d.R, d.C});
  Tensor dsk_p = partial(needs[3], {d.M, d.R});
  Tensor dwg_p = partial(need_dgates, {d.R, d.gates()});
  Tensor dwd_p = partial(needs[1] && !whole, {d.C, d.R});

  // whole: dG of all tasks as one GEMM, G and dh of all rows kept for the GEMMs after the row pass.
  Tensor dg_all, g_all, dh_all;
  if (whole) {
    if (need_dz) {
      dg_all = at::empty({d.T, d.N, d.R}, acc_opts);
      Tensor dg2 = dg_all.view({d.T * d.N, d.R});
      at::mm_out(dg2, grad.view({d.T * d.N, d.C}), wu.t());
    }
    if (needs[2]) g_all = at::empty({d.T, d.N, d.R}, acc_opts);
    if (need_dh) dh_all = at::empty({d.N, d.R}, acc_opts);
  }

  const at::ThreadLocalState tls;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    const BelowAutograd below_autograd;
    Scratch s(d, tile, acc_opts, copy_in, true, whole);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * n_tiles / n_chunks * tile;
      const int64_t r1 = std::min(d.N, (c + 1) * n_tiles / n_chunks * tile);
      for (int64_t i0 = r0; i0 < r1; i0 += tile) {
        const int64_t n = std::min(tile, r1 - i0);
        const Tensor ht = rows_acc(h, i0, n, s.ha);
        // whole with dW_u: Z straight into the G buffer (GELU applied in place below).
        Tensor g_rows = whole && needs[2] ? g_all.narrow(1, i0, n) : Tensor();
        const Tensor probs = g_rows.defined()
                                 ? gates_tile<acc_t>(d, n, ht, wg, sk, s, g_rows.data_ptr<acc_t>(), d.N * d.R)
                                 : gates_tile<acc_t>(d, n, ht, wg, sk, s);
        const Tensor z = g_rows.defined() ? g_rows : s.z.narrow(1, 0, n);
        if (whole) {
          if (need_dz) {
            // dZ = dG ⊙ GELU'(Z) into the scratch, then G = GELU(Z) in place. In
            // place on purpose: gelu_out from a contiguous input into a strided
            // view of another tensor left the view unwritten (torch 2.13, CPU).
            Tensor dz = s.z.narrow(1, 0, n);
            at::gelu_backward_out(dz, dg_all.narrow(1, i0, n), z);
          }
          if (needs[2]) at::gelu_out(g_rows, g_rows);
          if (!need_dz) continue;
        } else {
          Tensor g = s.g.narrow(1, 0, n);
          if (needs[2]) at::gelu_out(g, z);
          Tensor dg = s.dg.narrow(1, 0, n);
          for (int64_t t = 0; t < d.T; ++t) {
            const Tensor dy = rows_acc(grad.select(0, t), i0, n, s.ya);
            if (needs[2]) dwu_p[c].addmm_(g.select(0, t).t(), dy);
            Tensor dgt = dg.select(0, t);
            at::mm_out(dgt, dy, wu.t());
          }
          // dZ = dG ⊙ GELU'(Z), written over Z.
          Tensor dz = s.z.narrow(1, 0, n);
          at::gelu_backward_out(dz, dg, z);
        }
        Tensor dgb = s.dgb.narrow(0, 0, n * d.T * 2);
        Tensor dh = whole && need_dh ? dh_all.narrow(0, i0, n) : s.dh.narrow(0, 0, n);
        gate_grads_rows<acc_t>(d, n, ht.data_ptr<acc_t>(), s.gb.data_ptr<acc_t>(), s.z.data_ptr<acc_t>(),
                               s.z.size(1) * d.R, dgb.data_ptr<acc_t>(), dh.data_ptr<acc_t>());
        const Tensor p2 = probs.view({n * d.T * 2, d.M});
        if (needs[3]) dsk_p[c].addmm_(p2.t(), dgb);
        if (!need_dgates && !need_dh) continue;
        Tensor dl = s.probs_grad.narrow(0, 0, n);
        Tensor dl2 = dl.view({n * d.T * 2, d.M});
        at::mm_out(dl2, dgb, sk.t());
        softmax_backward_groups<acc_t>(dl2.data_ptr<acc_t>(), p2.data_ptr<acc_t>(), n * d.T * 2, d.M);
        if (need_dgates) dwg_p[c].addmm_(ht.t(), dl);
        if (!need_dh) continue;
        dh.addmm_(dl, wg.t());
        if (whole) continue;  // dx and dW_d from all rows below
        if (needs[0]) {
          if (copy_in) {
            Tensor ya = s.ya.narrow(0, 0, n);
            at::mm_out(ya, dh, wd.t());
            dx.narrow(0, i0, n).copy_(ya);
          } else {
            Tensor dst = dx.narrow(0, i0, n);
            at::mm_out(dst, dh, wd.t());
          }
        }
        if (needs[1]) dwd_p[c].addmm_(rows_acc(x, i0, n, s.xa).t(), dh);
      }
    }
  });

  const auto st = x.scalar_type();
  if (whole) {  // scalar_t is the accumulation type here: the GEMMs write the results directly
    if (needs[2]) at::mm_out(dwu, g_all.view({d.T * d.N, d.R}).t(), grad.view({d.T * d.N, d.C}));
    if (needs[1]) at::mm_out(dwd, x.t(), dh_all);
    if (needs[0]) at::mm_out(dx, dh_all, wd.t());
  } else {
    if (needs[1]) dwd = dwd_p.sum(0).to(st);
    if (needs[2]) dwu = dwu_p.sum(0).to(st);
  }
  if (needs[3]) dsk = dsk_p.sum(0).to(st);
  if (need_dgates) {
    Tensor w = dwg_p.sum(0).view({d.R, d.T, 2, d.M}).permute({1, 2, 0, 3});  // (T, 2, R, M)
    if (needs[4]) dwg = w.select(1, 0).to(st).contiguous();
    if (needs[5]) dwb = w.select(1, 1).to(st).contiguous();
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> skill_adapter_bwd_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& w_down, const Tensor& w_up, const Tensor& skills,
    const Tensor& w_gamma, const Tensor& w_beta, const Tensor& h_in, const c10::List<bool>& needs_in) {
  const Dims d = make_dims(x_in, w_down, w_up, skills, w_gamma, w_beta);
  check_operand(grad_in, "grad", x_in);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == d.T && grad_in.size(1) == d.N && grad_in.size(2) == d.C,
              "fastdense skill_adapter (cpp): grad must have shape (T=", d.T, ", N=", d.N, ", C=", d.C, "), got ",
              grad_in.sizes());
  check_operand(h_in, "h", x_in);
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(0) == d.N && h_in.size(1) == d.R,
              "fastdense skill_adapter (cpp): h must have shape (N=", d.N, ", R=", d.R, "), got ", h_in.sizes());
  TORCH_CHECK(needs_in.size() == 6, "fastdense skill_adapter (cpp): needs must have 6 entries (x, w_down, w_up, "
              "skills, w_gamma, w_beta), got ", needs_in.size());
  bool needs[6];
  for (size_t i = 0; i < 6; ++i) needs[i] = needs_in.get(i);

  const auto opts = x_in.options();
  // Zeros only for no rows (nothing accumulates into them); else every gradient
  // asked for is written whole below, and a zero fill of fresh memory is a
  // measurable share of the call at Swin-T stage 4.
  auto zeros_or_empty = [&](bool need, const Tensor& like) {
    if (!need) return at::empty({0}, opts);
    return d.N == 0 ? at::zeros(like.sizes(), opts) : at::empty(like.sizes(), opts);
  };
  Tensor dx = needs[0] ? at::empty(x_in.sizes(), opts) : at::empty({0}, opts);
  Tensor dwd = zeros_or_empty(needs[1], w_down), dwu = zeros_or_empty(needs[2], w_up);
  Tensor dsk = zeros_or_empty(needs[3], skills), dwg = zeros_or_empty(needs[4], w_gamma);
  Tensor dwb = zeros_or_empty(needs[5], w_beta);
  if (d.N == 0) return {dx, dwd, dwu, dsk, dwg, dwb};

  const Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), h = h_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "fastdense_skill_adapter_bwd", [&] {
    backward_impl<scalar_t>(d, grad, x, w_down, w_up, skills, w_gamma, w_beta, h, needs, dx, dwd, dwu, dsk, dwg,
                            dwb);
  });
  return {dx, dwd, dwu, dsk, dwg, dwb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CPU, m) {
  m.impl("_skill_adapter_fwd", &skill_adapter_fwd_cpu);
  m.impl("_skill_adapter_bwd", &skill_adapter_bwd_cpu);
}

}  // namespace fastdense
