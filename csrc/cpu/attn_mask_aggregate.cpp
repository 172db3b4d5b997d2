// CPU kernels of fastdense::_attn_aggregate_fwd / _attn_aggregate_bwd
// (contract: fastdense/ops/attn_mask_aggregate.py; algorithm:
// fastdense/ops/_attn_mask_aggregate_torch.py).
//
// M_attn = M_sa^T M_ca (concept-codebook paper §3.3) without the L x L matrix
// M_sa: the work is cut into tasks (b, h, row range) run under
// at::parallel_for, and a task walks its query rows in tiles of T rows. A tile
// of scores S_I = scale q_I k^T (T x L) holds complete softmax rows, so its
// log-sum-exp, probabilities P_I and contributions follow in one visit:
//
//   forward   lse_I = logsumexp_j S_Ij;  P_I = exp(S_I - lse_I);  out += a P_I^T m_I
//   backward  dM_I = a P_I G;  delta_I = <m_I, dM_I>;  dS_I = scale P_I (a m_I G^T - delta_I)
//             dm_I = dM_I;  dq_I = dS_I k;  dk += dS_I^T q_I
//
// with a = 1/H for head_reduce="mean", else 1, and G the output gradient of
// the batch (every head) or of the head ("none"). The only buffers a thread
// holds are its tiles (T x L, T from tile_rows: at most 256K values unless
// L > 8192) and, for outputs several tasks add into (the head-reduced map, dk
// when a head's rows are split, the gradient of a shared m_ca), a private
// accumulator of the task's share that is added into the output under a mutex
// when the task ends -- never a per-head (B, H, L, N) buffer, never L x L.
//
// The tile GEMMs and element-wise passes are ATen calls on views of the
// thread's buffers: inside at::parallel_for they run on the calling thread
// (MKL/oneDNN GEMMs and ATen's vectorised exp), and the tile stays in cache
// between them. The pool's threads run them under the caller's thread-local
// state, so the profiler (bench/conftest.py reads peak memory from it) sees
// the tiles' allocations.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

namespace fastdense {
namespace {

using at::Tensor;

enum class Reduce { kMean, kSum, kNone };

Reduce parse_reduce(const std::string& s) {
  if (s == "mean") return Reduce::kMean;
  if (s == "sum") return Reduce::kSum;
  TORCH_CHECK(s == "none", "fastdense attn_mask_aggregate (cpp): head_reduce must be 'mean', 'sum' or 'none', got '",
              s, "'");
  return Reduce::kNone;
}

struct Dims {
  int64_t B = 0, H = 0, L = 0, D = 0, N = 0;
  bool shared = false;  // one m_ca (B, L, N) for every head
};

Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& m_ca) {
  TORCH_CHECK(q.device().is_cpu(), "fastdense attn_mask_aggregate (cpp): q must be a CPU tensor, got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "fastdense attn_mask_aggregate (cpp): supports float32/float64, got q of dtype ", st);
  TORCH_CHECK(q.dim() == 4, "fastdense attn_mask_aggregate (cpp): q must have shape (B, H, L, d), got ", q.sizes());
  Dims s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.L = q.size(2);
  s.D = q.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), "fastdense attn_mask_aggregate (cpp): k must have the shape of q ", q.sizes(),
              ", got ", k.sizes());
  for (const Tensor* t : {&k, &m_ca}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == st,
                "fastdense attn_mask_aggregate (cpp): k and m_ca must be CPU tensors of q's dtype ", st, ", got ",
                t->scalar_type(), " on ", t->device());
  }
  s.shared = m_ca.dim() == 3;
  const bool ok = s.shared ? (m_ca.size(0) == s.B && m_ca.size(1) == s.L)
                           : (m_ca.dim() == 4 && m_ca.size(0) == s.B && m_ca.size(1) == s.H && m_ca.size(2) == s.L);
  TORCH_CHECK(ok, "fastdense attn_mask_aggregate (cpp): m_ca must have shape (B=", s.B, ", L=", s.L, ", N) or (B=",
              s.B, ", H=", s.H, ", L=", s.L, ", N), got ", m_ca.sizes());
  s.N = m_ca.size(-1);
  return s;
}

void check_lse(const Tensor& lse, const Dims& s, at::ScalarType st) {
  TORCH_CHECK(lse.device().is_cpu() && lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H &&
                  lse.size(2) == s.L,
              "fastdense attn_mask_aggregate (cpp): lse must be a CPU tensor of shape (B=", s.B, ", H=", s.H,
              ", L=", s.L, "), got ", lse.sizes(), " on ", lse.device());
}

// Query rows per tile: up to about 256K scores (1 MiB of fp32) so that a tile
// and the k rows it is multiplied with stay in L2; 32 to 128 rows, at least 32
// for the GEMMs (so above L = 8192 a tile holds more than 256K scores).
int64_t tile_rows(int64_t L) { return std::max<int64_t>(32, std::min<int64_t>(128, (int64_t(1) << 18) / L)); }

// Row splits per (b, h): enough tasks to keep every thread busy when B * H is small.
int64_t row_splits(const Dims& s, int64_t tile) {
  const int64_t tiles = (s.L + tile - 1) / tile;
  const int64_t heads = std::max<int64_t>(1, s.B * s.H);
  const int64_t want = (2 * at::get_num_threads() + heads - 1) / heads;
  return std::max<int64_t>(1, std::min(tiles, want));
}

// Rows [r0, r1) of split `part` of `splits`, on tile boundaries.
std::pair<int64_t, int64_t> split_rows(int64_t L, int64_t tile, int64_t splits, int64_t part) {
  const int64_t tiles = (L + tile - 1) / tile;
  const int64_t per = (tiles + splits - 1) / splits;
  const int64_t r0 = std::min(L, part * per * tile);
  const int64_t r1 = std::min(L, (part + 1) * per * tile);
  return {r0, r1};
}

// ============================================================================ forward
std::tuple<Tensor, Tensor> attn_aggregate_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& m_in,
                                                  double scale, const std::optional<Tensor>& lse_in,
                                                  c10::string_view head_reduce_sv) {
  const Dims s = check_inputs(q_in, k_in, m_in);
  const Reduce reduce = parse_reduce(std::string(head_reduce_sv));
  // Detached: the op is differentiated as a whole (fastdense/ops/attn_mask_aggregate.py).
  const Tensor q = q_in.detach().contiguous(), k = k_in.detach().contiguous(), m_ca = m_in.detach().contiguous();
  const auto opts = q.options();
  const bool have_lse = lse_in.has_value();
  Tensor lse;
  if (have_lse) {
    check_lse(*lse_in, s, q.scalar_type());
    lse = lse_in->detach().to(q.scalar_type()).contiguous();
  } else {
    lse = at::empty({s.B, s.H, s.L}, opts);
  }
  Tensor out = reduce == Reduce::kNone ? at::zeros({s.B, s.H, s.L, s.N}, opts) : at::zeros({s.B, s.L, s.N}, opts);
  if (s.B == 0 || s.H == 0 || s.L == 0) return {out, lse};

  const int64_t tile = tile_rows(s.L);
  const int64_t splits = row_splits(s, tile);
  const double alpha = reduce == Reduce::kMean ? 1.0 / static_cast<double>(s.H) : 1.0;
  std::mutex flush;

  const at::ThreadLocalState tls;
  at::parallel_for(0, s.B * s.H * splits, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    // Autograd is already handled by the op: skip it for the tile ops (the
    // caller's state, just restored, may still include it).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor scores = at::empty({tile, s.L}, opts);
    Tensor acc;  // this task's share of a map other tasks also add into
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t part = t % splits, bh = t / splits, b = bh / s.H, h = bh % s.H;
      const auto [r0, r1] = split_rows(s.L, tile, splits, part);
      if (r0 >= r1) continue;
      const Tensor qh = q[b][h], kt = k[b][h].t();
      const Tensor mh = s.shared ? m_ca[b] : m_ca[b][h];
      const Tensor lse_bh = lse[b][h];
      // "none" with the head's rows in one task: it owns out[b][h], no accumulator.
      const bool direct = reduce == Reduce::kNone && splits == 1;
      Tensor target;
      if (direct) {
        target = out[b][h];
      } else {
        if (!acc.defined()) acc = at::empty({s.L, s.N}, opts);
        target = acc.zero_();
      }
      for (int64_t i0 = r0; i0 < r1; i0 += tile) {
        const int64_t rows = std::min(tile, r1 - i0);
        Tensor sc = scores.narrow(0, 0, rows);
        at::addmm_out(sc, sc, qh.narrow(0, i0, rows), kt, /*beta=*/0.0, /*alpha=*/scale);
        Tensor lse_i = lse_bh.narrow(0, i0, rows);
        Tensor m_i = mh.narrow(0, i0, rows);
        if (have_lse) {
          sc.sub_(lse_i.unsqueeze(1)).exp_();
        } else {
          const Tensor row_max = sc.amax(1, /*keepdim=*/true);
          sc.sub_(row_max).exp_();
          const Tensor row_sum = sc.sum(1, /*keepdim=*/true);
          lse_i.copy_((row_max + row_sum.log()).squeeze(1));
          // P^T m = exp(S - max)^T (m / rowsum): the normalisation costs T x N, not T x L.
          m_i = m_i / row_sum;
        }
        at::addmm_out(target, target, sc.t(), m_i, /*beta=*/1.0, /*alpha=*/alpha);
      }
      if (!direct) {
        std::lock_guard<std::mutex> lock(flush);
        (reduce == Reduce::kNone ? out[b][h] : out[b]).add_(acc);
      }
    }
  });
  return {out, lse};
}

// ============================================================================ backward
std::tuple<Tensor, Tensor, Tensor> attn_aggregate_bwd_cpu(const Tensor& grad_in, const Tensor& q_in,
                                                          const Tensor& k_in, const Tensor& m_in, double scale,
                                                          const Tensor& lse_in, c10::string_view head_reduce_sv,
                                                          const c10::List<bool>& needs_in) {
  const Dims s = check_inputs(q_in, k_in, m_in);
  const Reduce reduce = parse_reduce(std::string(head_reduce_sv));
  check_lse(lse_in, s, q_in.scalar_type());
  TORCH_CHECK(needs_in.size() == 3, "fastdense attn_mask_aggregate (cpp): needs must have 3 entries (q, k, m_ca), got ",
              needs_in.size());
  const bool need_q = needs_in.get(0), need_k = needs_in.get(1), need_m = needs_in.get(2);
  const bool grad_ok = reduce == Reduce::kNone
                           ? (grad_in.dim() == 4 && grad_in.size(0) == s.B && grad_in.size(1) == s.H &&
                              grad_in.size(2) == s.L && grad_in.size(3) == s.N)
                           : (grad_in.dim() == 3 && grad_in.size(0) == s.B && grad_in.size(1) == s.L &&
                              grad_in.size(2) == s.N);
  TORCH_CHECK(grad_ok, "fastdense attn_mask_aggregate (cpp): grad must have the output's shape, got ",
              grad_in.sizes());
  const Tensor q = q_in.detach().contiguous(), k = k_in.detach().contiguous(), m_ca = m_in.detach().contiguous();
  const Tensor grad = grad_in.detach().to(q.scalar_type()).contiguous();
  const Tensor lse = lse_in.detach().to(q.scalar_type()).contiguous();
  const auto opts = q.options();
  const Tensor empty = at::empty({0}, opts);
  Tensor dq = need_q ? at::empty_like(q) : empty;
  Tensor dk = need_k ? at::zeros_like(q) : empty;
  // Rows of a per-head m_ca's gradient belong to one task; a shared one sums the heads.
  Tensor dm = need_m ? (s.shared ? at::zeros_like(m_ca) : at::empty_like(m_ca)) : empty;
  if (!(need_q || need_k || need_m) || s.B == 0 || s.H == 0 || s.L == 0) return {dq, dk, dm};

  const int64_t tile = tile_rows(s.L);
  const int64_t splits = row_splits(s, tile);
  const double alpha = reduce == Reduce::kMean ? 1.0 / static_cast<double>(s.H) : 1.0;
  const bool need_ds = need_q || need_k;
  std::mutex flush;

  const at::ThreadLocalState tls;
  at::parallel_for(0, s.B * s.H * splits, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    // Autograd is already handled by the op: skip it for the tile ops (the
    // caller's state, just restored, may still include it).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor probs = at::empty({tile, s.L}, opts);
    Tensor dscores = need_ds ? at::empty({tile, s.L}, opts) : Tensor();
    Tensor dm_tile = at::empty({tile, s.N}, opts);
    Tensor dk_acc, dm_acc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t part = t % splits, bh = t / splits, b = bh / s.H, h = bh % s.H;
      const auto [r0, r1] = split_rows(s.L, tile, splits, part);
      if (r0 >= r1) continue;
      const Tensor qh = q[b][h], kh = k[b][h], kt = kh.t();
      const Tensor mh = s.shared ? m_ca[b] : m_ca[b][h];
      const Tensor gh = reduce == Reduce::kNone ? grad[b][h] : grad[b];
      const Tensor lse_bh = lse[b][h];
      // dk of a head whose rows are split adds up over tasks.
      Tensor dk_target;
      if (need_k) {
        if (splits == 1) {
          dk_target = dk[b][h];
        } else {
          if (!dk_acc.defined()) dk_acc = at::empty({s.L, s.D}, opts);
          dk_target = dk_acc.zero_();
        }
      }
      if (need_m && s.shared) {
        if (!dm_acc.defined()) dm_acc = at::empty({s.L, s.N}, opts);
        dm_acc.narrow(0, r0, r1 - r0).zero_();
      }
      for (int64_t i0 = r0; i0 < r1; i0 += tile) {
        const int64_t rows = std::min(tile, r1 - i0);
        const Tensor q_i = qh.narrow(0, i0, rows), m_i = mh.narrow(0, i0, rows);
        Tensor p = probs.narrow(0, 0, rows);
        at::addmm_out(p, p, q_i, kt, /*beta=*/0.0, /*alpha=*/scale);
        p.sub_(lse_bh.narrow(0, i0, rows).unsqueeze(1)).exp_();
        Tensor d_m = dm_tile.narrow(0, 0, rows);
        at::addmm_out(d_m, d_m, p, gh, /*beta=*/0.0, /*alpha=*/alpha);  // dM_I = a P_I G
        if (need_m) {
          Tensor dst = s.shared ? dm_acc.narrow(0, i0, rows) : dm[b][h].narrow(0, i0, rows);
          dst.copy_(d_m);
        }
        if (need_ds) {
          const Tensor delta = (m_i * d_m).sum(1, /*keepdim=*/true);
          Tensor ds = dscores.narrow(0, 0, rows);
          at::addmm_out(ds, ds, m_i, gh.t(), /*beta=*/0.0, /*alpha=*/alpha);  // dP_I = a m_I G^T
          ds.sub_(delta).mul_(p).mul_(scale);
          if (need_q) {
            Tensor dq_i = dq[b][h].narrow(0, i0, rows);
            at::mm_out(dq_i, ds, kh);
          }
          if (need_k) at::addmm_out(dk_target, dk_target, ds.t(), q_i, /*beta=*/1.0, /*alpha=*/1.0);
        }
      }
      if ((need_k && splits > 1) || (need_m && s.shared)) {
        std::lock_guard<std::mutex> lock(flush);
        if (need_k && splits > 1) dk[b][h].add_(dk_acc);
        if (need_m && s.shared) dm[b].narrow(0, r0, r1 - r0).add_(dm_acc.narrow(0, r0, r1 - r0));
      }
    }
  });
  return {dq, dk, dm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdense, CPU, m) {
  m.impl("_attn_aggregate_fwd", &attn_aggregate_fwd_cpu);
  m.impl("_attn_aggregate_bwd", &attn_aggregate_bwd_cpu);
}

}  // namespace fastdense
