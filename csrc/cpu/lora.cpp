// CPU kernels of fastdense::_mt_lora_fwd / _mt_lora_bwd (contract: fastdense/ops/lora.py,
// algorithm: fastdense/ops/_lora_torch.py).
//
// Every GEMM runs on all M rows through ATen's BLAS, which threads it itself:
// per-row-tile BLAS calls measured ~1.5x slower here for the skinny LoRA GEMMs
// (MKL's small-M path), so tiles are left to the memory-bound work BLAS cannot
// fuse, done by the row kernels of lora_rows.h under at::parallel_for:
//   forward:  one pass writes all G outputs from the base row (bias, the shared
//             and task updates of small rank added from registers);
//   backward: one pass reads the G output gradients once to form their sum, the
//             small-rank dh columns, and per-thread partials of dB and dbias.
// Adapters of larger rank (MTLoRA's shared rank 64) are real GEMMs.
// at::parallel_for is an inline template: it only spreads rows over threads
// when this file is compiled with OpenMP (-fopenmp, matching torch's OpenMP
// backend); otherwise the row passes run on the calling thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/MaybeOwned.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "lora_rows.h"

// The extension is built for the baseline ISA; the row kernels get AVX2 and
// AVX-512 clones picked at load time where the toolchain supports it.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define FASTDENSE_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDENSE_ROW_CLONES
#endif

namespace fastdense {
namespace {

using at::Tensor;
using c10::MaybeOwned;

#define FASTDENSE_ROW_KERNELS(T)                                                                                   \
  FASTDENSE_ROW_CLONES void run_rows(const cpu::ExpandRows<T>& k, int64_t i0, int64_t i1,                       \
                                     at::opmath_type<T>* scratch) {                                              \
    k.run(i0, i1, scratch);                                                                                      \
  }                                                                                                              \
  FASTDENSE_ROW_CLONES void run_rows(const cpu::GradRows<T>& k, int64_t i0, int64_t i1, at::opmath_type<T>* dbt, \
                                     T* gb_row, at::opmath_type<T>* colsum, at::opmath_type<T>* scratch) {       \
    k.run(i0, i1, dbt, gb_row, colsum, scratch);                                                                 \
  }                                                                                                              \
  FASTDENSE_ROW_CLONES void run_rows(const cpu::CombineRows<T>& k, int64_t i0, int64_t i1) { k.run(i0, i1); }

FASTDENSE_ROW_KERNELS(float)
FASTDENSE_ROW_KERNELS(double)
FASTDENSE_ROW_KERNELS(at::BFloat16)
#undef FASTDENSE_ROW_KERNELS

struct Plan {
  int64_t M = 0, K = 0, N = 0, R = 0, G = 0;
  std::vector<int64_t> off, len;
  std::vector<double> scale;
  bool small(int64_t a) const { return len[a] <= cpu::kSmallRank; }
  bool any_small() const {
    for (int64_t a = 0; a < G; ++a)
      if (small(a)) return true;
    return false;
  }
  template <typename acc_t>
  cpu::SmallAdapter<acc_t> adapter(int64_t a) const {
    cpu::SmallAdapter<acc_t> s;
    s.off = off[a];
    s.len = len[a];
    s.scale = static_cast<acc_t>(scale[a]);
    return s;
  }
};

void check_operand(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "fastdense mt_lora (cpp): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastdense mt_lora (cpp): ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type(), "; all tensors must share one dtype");
}

Plan make_plan(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_a,
               const Tensor& lora_b, at::IntArrayRef ranks, at::ArrayRef<double> scales,
               const std::optional<Tensor>& x_lora, const std::optional<Tensor>& x_tasks) {
  TORCH_CHECK(x.device().is_cpu(), "fastdense mt_lora (cpp): x must be a CPU tensor, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "fastdense mt_lora (cpp): supports float32/float64/bfloat16, got x of dtype ", st);
  TORCH_CHECK(x.dim() == 2, "fastdense mt_lora (cpp): x must have shape (M, K), got ", x.sizes());
  Plan p;
  p.M = x.size(0);
  p.K = x.size(1);
  check_operand(weight, "weight", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == p.K, "fastdense mt_lora (cpp): weight must have shape (N, K=",
              p.K, "), got ", weight.sizes());
  p.N = weight.size(0);
  TORCH_CHECK(!ranks.empty(), "fastdense mt_lora (cpp): ranks must be non-empty (shared first, then tasks)");
  TORCH_CHECK(scales.size() == ranks.size(), "fastdense mt_lora (cpp): scales must have one entry per adapter (",
              ranks.size(), "), got ", scales.size());
  p.G = static_cast<int64_t>(ranks.size());
  for (int64_t a = 0; a < p.G; ++a) {
    TORCH_CHECK(ranks[a] >= 1, "fastdense mt_lora (cpp): ranks must be positive, got ", ranks);
    p.off.push_back(p.R);
    p.len.push_back(ranks[a]);
    p.scale.push_back(scales[a]);
    p.R += ranks[a];
  }
  if (bias) {
    check_operand(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.N, "fastdense mt_lora (cpp): bias must have shape (N=", p.N,
                ",), got ", bias->sizes());
  }
  check_operand(lora_a, "lora_a", x);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(0) == p.R && lora_a.size(1) == p.K,
              "fastdense mt_lora (cpp): lora_a must have shape (sum(ranks)=", p.R, ", K=", p.K, "), got ",
              lora_a.sizes());
  check_operand(lora_b, "lora_b", x);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == p.N && lora_b.size(1) == p.R,
              "fastdense mt_lora (cpp): lora_b must have shape (N=", p.N, ", sum(ranks)=", p.R, "), got ",
              lora_b.sizes());
  if (x_lora) {
    check_operand(*x_lora, "x_lora", x);
    TORCH_CHECK(x_lora->sizes() == x.sizes(), "fastdense mt_lora (cpp): x_lora must have the shape of x ",
                x.sizes(), ", got ", x_lora->sizes());
  }
  if (x_tasks) {
    check_operand(*x_tasks, "x_tasks", x);
    TORCH_CHECK(x_tasks->dim() == 3 && x_tasks->size(0) == p.G - 1 && x_tasks->size(1) == p.M &&
                    x_tasks->size(2) == p.K,
                "fastdense mt_lora (cpp): x_tasks must have shape (T=", p.G - 1, ", M=", p.M, ", K=", p.K,
                "), got ", x_tasks->sizes());
  }
  return p;
}

// Contiguous operands without a copy in the (contract) contiguous case.
MaybeOwned<Tensor> contig(const Tensor& t) { return t.expect_contiguous(); }

std::optional<Tensor> contig(const std::optional<Tensor>& t) {
  if (!t) return std::nullopt;
  return t->contiguous();
}

Tensor cols(const Tensor& t, int64_t c0, int64_t n) { return t.narrow(1, c0, n); }

void mm(Tensor out, const Tensor& m1, const Tensor& m2) { at::mm_out(out, m1, m2); }

// out = alpha * m1 @ m2 (+ out when accumulate). beta = 0 makes BLAS ignore
// whatever out held, so out may be uninitialised memory.
void gemm(Tensor out, const Tensor& m1, const Tensor& m2, double alpha, bool accumulate) {
  at::addmm_out(out, out, m1, m2, accumulate ? 1.0 : 0.0, alpha);
}

// Rows per parallel task of a row kernel touching `width` elements per row.
int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, width));
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kBFloat16 ? at::kFloat : st; }

// ============================================================================ forward
template <typename scalar_t>
void forward_impl(const Plan& p, bool shared_in_tasks, const Tensor& x, const Tensor& weight, const Tensor& bias,
                  const Tensor& lora_a, const Tensor& lora_b, const Tensor& u, const Tensor& x_tasks,
                  const Tensor& out, const Tensor& h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = p.M, N = p.N, G = p.G;

  // Shrink: one GEMM over the stacked A's when every adapter reads u.
  if (!x_tasks.defined()) {
    mm(h, u, lora_a.t());
  } else {
    mm(cols(h, p.off[0], p.len[0]), u, lora_a.narrow(0, p.off[0], p.len[0]).t());
    for (int64_t t = 1; t < G; ++t)
      mm(cols(h, p.off[t], p.len[t]), x_tasks.select(0, t - 1), lora_a.narrow(0, p.off[t], p.len[t]).t());
  }

  // Base without bias: addmm would first copy the broadcast bias into all of
  // out[0], a full extra pass; the row pass adds it to rows it loads anyway.
  Tensor out0 = out.select(0, 0);
  mm(out0, x, weight.t());

  auto big_update = [&](int64_t a, int64_t g) {
    gemm(out.select(0, g), cols(h, p.off[a], p.len[a]), cols(lora_b, p.off[a], p.len[a]).t(), p.scale[a], true);
  };
  const bool shared_small = p.small(0);
  // 'matrixv2' tasks start from base + shared: a large shared update must be
  // in out[0] before the row pass copies it; in 'matrix' it must come after.
  if (!shared_small && shared_in_tasks) big_update(0, 0);

  if (G > 1 || bias.defined() || shared_small) {
    // B^T in the accumulation type, for the small-rank updates only.
    Tensor bt = p.any_small() ? lora_b.t().to(acc_type(x.scalar_type())).contiguous() : Tensor();
    cpu::ExpandRows<scalar_t> k;
    k.n = N;
    k.base = out0.data_ptr<scalar_t>();
    k.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    k.h = h.data_ptr<scalar_t>();
    k.ld_h = p.R;
    k.bt = bt.defined() ? bt.data_ptr<acc_t>() : nullptr;
    k.shared_in_tasks = shared_in_tasks;
    if (shared_small) k.shared = p.adapter<acc_t>(0);
    for (int64_t t = 1; t < G; ++t) {
      k.dst.push_back(out.select(0, t).data_ptr<scalar_t>());
      // Rank 0: a plain copy of the base, the GEMM adds the update later.
      k.tasks.push_back(p.small(t) ? p.adapter<acc_t>(t) : cpu::SmallAdapter<acc_t>());
    }
    at::parallel_for(0, M, row_grain(N * G), [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> scratch(2 * N);
      run_rows(k, i0, i1, scratch.data());
    });
  }

  for (int64_t t = 1; t < G; ++t)
    if (!p.small(t)) big_update(t, t);
  if (!shared_small && !shared_in_tasks) big_update(0, 0);
}

std::tuple<Tensor, Tensor> mt_lora_fwd_cpu(const Tensor& x_in, const Tensor& weight_in,
                                           const std::optional<Tensor>& bias_in, const Tensor& lora_a_in,
                                           const Tensor& lora_b_in, at::IntArrayRef ranks,
                                           at::ArrayRef<double> scales, bool shared_in_tasks,
                                           const std::optional<Tensor>& x_lora_in,
                                           const std::optional<Tensor>& x_tasks_in) {
  const Plan p = make_plan(x_in, weight_in, bias_in, lora_a_in, lora_b_in, ranks, scales, x_lora_in, x_tasks_in);
  auto x = contig(x_in);
  auto weight = contig(weight_in);
  auto lora_a = contig(lora_a_in);
  auto lora_b = contig(lora_b_in);
  auto bias = contig(bias_in);
  auto x_lora = contig(x_lora_in);
  auto x_tasks = contig(x_tasks_in);

  Tensor out = at::empty({p.G, p.M, p.N}, x->options());
  Tensor h = at::empty({p.M, p.R}, x->options());
  if (p.M == 0) return {out, h};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x->scalar_type(), "fastdense_mt_lora_fwd", [&] {
    forward_impl<scalar_t>(p, shared_in_tasks, *x, *weight, bias ? *bias : Tensor(), *lora_a, *lora_b,
                           x_lora ? *x_lora : *x, x_tasks ? *x_tasks : Tensor(), out, h);
  });
  return {out, h};
}

// ============================================================================ backward
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mt_lora_bwd_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& weight_in, const std::optional<Tensor>& bias_in,
    const Tensor& lora_a_in, const Tensor& lora_b_in, at::IntArrayRef ranks, at::ArrayRef<double> scales,
    bool shared_in_tasks, const std::optional<Tensor>& x_lora_in, const std::optional<Tensor>& x_tasks_in,
    const Tensor& h_in, const c10::List<bool>& needs_in) {
  const Plan p = make_plan(x_in, weight_in, bias_in, lora_a_in, lora_b_in, ranks, scales, x_lora_in, x_tasks_in);
  check_operand(grad_in, "grad", x_in);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == p.G && grad_in.size(1) == p.M && grad_in.size(2) == p.N,
              "fastdense mt_lora (cpp): grad must have shape (G=", p.G, ", M=", p.M, ", N=", p.N, "), got ",
              grad_in.sizes());
  check_operand(h_in, "h", x_in);
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(0) == p.M && h_in.size(1) == p.R,
              "fastdense mt_lora (cpp): h must have shape (M=", p.M, ", sum(ranks)=", p.R, "), got ", h_in.sizes());
  TORCH_CHECK(needs_in.size() == 7, "fastdense mt_lora (cpp): needs must have 7 entries (x, weight, bias, lora_a, "
              "lora_b, x_lora, x_tasks), got ", needs_in.size());
  bool needs[7];
  for (size_t i = 0; i < 7; ++i) needs[i] = needs_in.get(i);
  // A gradient of an absent input is never produced.
  needs[2] = needs[2] && bias_in.has_value();
  needs[5] = needs[5] && x_lora_in.has_value();
  needs[6] = needs[6] && x_tasks_in.has_value();

  auto grad = contig(grad_in);
  auto x = contig(x_in);
  auto weight = contig(weight_in);
  auto lora_a = contig(lora_a_in);
  auto lora_b = contig(lora_b_in);
  auto h = contig(h_in);
  auto x_lora = contig(x_lora_in);
  auto x_tasks = contig(x_tasks_in);
  const Tensor& u = x_lora ? *x_lora : *x;
  const auto opts = x->options();
  const auto acc_opts = opts.dtype(acc_type(x->scalar_type()));
  const int64_t M = p.M, N = p.N, K = p.K, R = p.R, G = p.G;

  // Gradients not asked for are empty (numel 0), each its own tensor.
  auto grad_or_empty = [&](bool need, at::IntArrayRef shape) {
    return at::empty(need ? shape : at::IntArrayRef{0}, opts);
  };
  Tensor dx = grad_or_empty(needs[0], {M, K});
  Tensor dw = grad_or_empty(needs[1], {N, K});
  Tensor dbias = grad_or_empty(false, {0});
  Tensor da = grad_or_empty(needs[3], {R, K});
  Tensor db = grad_or_empty(needs[4], {N, R});
  Tensor dxl = grad_or_empty(needs[5], {M, K});
  Tensor dxt = grad_or_empty(needs[6], {G - 1, M, K});

  // Which dh blocks are consumed: dA takes all; d_u = dh @ A takes the blocks of
  // the adapters reading u (all of them, or only the shared one with x_tasks);
  // d x_tasks takes the task blocks.
  const bool x_lora_given = x_lora.has_value();
  const bool need_du = (needs[0] && !x_lora_given) || needs[5];
  std::vector<bool> need_dh(G);
  bool any_dh = false;
  for (int64_t a = 0; a < G; ++a) {
    const bool reads_u = a == 0 || !x_tasks;
    need_dh[a] = needs[3] || (reads_u ? need_du : needs[6]);
    any_dh = any_dh || need_dh[a];
  }
  // The summed gradient feeds dx, dW, dbias, and the shared adapter in
  // 'matrixv2'. It is kept whole only for the GEMMs that read it afterwards.
  const bool shared_reads_gb = shared_in_tasks && (need_dh[0] || needs[4]);
  const bool gb_store = needs[0] || needs[1] || (shared_reads_gb && !p.small(0));
  const bool need_gb = gb_store || needs[2] || shared_reads_gb;
  Tensor gb = gb_store ? at::empty({M, N}, opts) : Tensor();
  Tensor dh = any_dh ? at::empty({M, R}, opts) : Tensor();

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = row_grain(N * G);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(threads, (M + grain - 1) / grain));

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x->scalar_type(), "fastdense_mt_lora_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cpu::GradRows<scalar_t> k;
    k.n = N;
    k.groups = G;
    k.ld_group = M * N;
    k.grad = grad->data_ptr<scalar_t>();
    k.need_gb = need_gb;
    k.gb_store = gb_store;
    k.gb = gb_store ? gb.data_ptr<scalar_t>() : nullptr;
    k.dh = any_dh ? dh.data_ptr<scalar_t>() : nullptr;
    k.ld_dh = R;
    k.h = h->data_ptr<scalar_t>();
    k.ld_h = R;
    int64_t packed = 0;
    for (int64_t a = 0; a < G; ++a) {
      if (!p.small(a) || !(need_dh[a] || needs[4])) continue;
      typename cpu::GradRows<scalar_t>::Adapter ad;
      ad.a = p.adapter<acc_t>(a);
      ad.index = a;
      ad.from_gb = a == 0 && shared_in_tasks;
      ad.need_dh = need_dh[a];
      ad.need_db = needs[4];
      ad.packed = packed;
      if (ad.need_db) packed += p.len[a];
      k.adapters.push_back(ad);
    }
    Tensor bt;
    if (!k.adapters.empty()) {
      bt = lora_b->t().to(acc_opts.dtype()).contiguous();
      k.bt = bt.data_ptr<acc_t>();
    }
    // Per-chunk partial sums, reduced below in a fixed order (deterministic for
    // a given thread count).
    Tensor db_part = packed ? at::zeros({n_chunks, packed, N}, acc_opts) : Tensor();
    Tensor bias_part = needs[2] ? at::zeros({n_chunks, N}, acc_opts) : Tensor();
    Tensor gb_rows = need_gb && !gb_store ? at::empty({n_chunks, N}, opts) : Tensor();
    if (need_gb || !k.adapters.empty()) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<acc_t> scratch(2 * N);
        for (int64_t c = c0; c < c1; ++c) {
          run_rows(k, c * M / n_chunks, (c + 1) * M / n_chunks,
                   packed ? db_part.select(0, c).data_ptr<acc_t>() : nullptr,
                   gb_rows.defined() ? gb_rows.select(0, c).data_ptr<scalar_t>() : nullptr,
                   needs[2] ? bias_part.select(0, c).data_ptr<acc_t>() : nullptr, scratch.data());
        }
      });
    }
    if (needs[2]) dbias = bias_part.sum(0).to(opts.dtype());
    if (packed) {
      Tensor db_small = db_part.sum(0);
      for (const auto& ad : k.adapters)
        db.narrow(1, ad.a.off, ad.a.len).copy_(db_small.narrow(0, ad.packed, ad.a.len).t());
    }

    // Large-rank adapters: dh and dB as GEMMs over all rows.
    for (int64_t a = 0; a < G; ++a) {
      if (p.small(a)) continue;
      const Tensor ga = a == 0 && shared_in_tasks ? gb : grad->select(0, a);
      if (need_dh[a]) gemm(cols(dh, p.off[a], p.len[a]), ga, cols(*lora_b, p.off[a], p.len[a]), p.scale[a], false);
      if (needs[4]) gemm(cols(db, p.off[a], p.len[a]), ga.t(), cols(*h, p.off[a], p.len[a]), p.scale[a], false);
    }

    const int64_t u_rank = x_tasks ? p.len[0] : R;
    if (needs[0]) {
      mm(dx, gb, *weight);
      if (!x_lora_given) gemm(dx, cols(dh, 0, u_rank), lora_a->narrow(0, 0, u_rank), 1.0, true);
    }
    if (needs[5]) mm(dxl, cols(dh, 0, u_rank), lora_a->narrow(0, 0, u_rank));
    if (needs[6]) {
      Tensor a_acc = lora_a->to(acc_opts.dtype());
      for (int64_t t = 1; t < G; ++t) {
        Tensor dst = dxt.select(0, t - 1);
        if (p.small(t)) {
          cpu::CombineRows<scalar_t> c;
          c.n = K;
          c.dst = dst.data_ptr<scalar_t>();
          c.coef = dh.data_ptr<scalar_t>();
          c.ld_coef = R;
          c.mat = a_acc.data_ptr<acc_t>();
          c.a = p.adapter<acc_t>(t);
          c.a.scale = acc_t(1);
          at::parallel_for(0, M, row_grain(K * (p.len[t] + 1)), [&](int64_t i0, int64_t i1) { run_rows(c, i0, i1); });
        } else {
          mm(dst, cols(dh, p.off[t], p.len[t]), lora_a->narrow(0, p.off[t], p.len[t]));
        }
      }
    }
  });

  if (needs[1]) mm(dw, gb.t(), *x);
  if (needs[3]) {
    if (!x_tasks) {
      mm(da, dh.t(), u);
    } else {
      mm(da.narrow(0, p.off[0], p.len[0]), cols(dh, p.off[0], p.len[0]).t(), u);
      for (int64_t t = 1; t < G; ++t)
        mm(da.narrow(0, p.off[t], p.len[t]), cols(dh, p.off[t], p.len[t]).t(), x_tasks->select(0, t - 1));
    }
  }
  return {dx, dw, dbias, da, db, dxl, dxt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CPU, m) {
  m.impl("_mt_lora_fwd", &mt_lora_fwd_cpu);
  m.impl("_mt_lora_bwd", &mt_lora_bwd_cpu);
}

}  // namespace fastdense
