// CPU kernels of the Dynamic Task Filter's internal ops (schemas:
// csrc/dtf_schema.cpp; contract: fastdense/ops/dtf.py; algorithm:
// fastdense/ops/_dtf_phases.py; window geometry: csrc/dtf_geometry.h).
//
// Tokens stay channels-last (S, H, W, r), the layout the down-projection GEMM
// writes, so no transpose to NCHW is ever made (the grouped-conv trick of the
// reference code needs two). Every kernel works on rows of r contiguous
// channels: a tap of the k x k filter is an r-wide multiply-add the compiler
// vectorises, with the filter pre-transposed to (k*k, r) per (sample, window).
//   forward / dh: at::parallel_for over map rows (S*H); the valid tap range of
//                 each pixel is clipped to its window, which is the zero padding;
//                 dh also adds the GAP's adjoint d_pooled / count in the same pass;
//   dtheta, GAP:  at::parallel_for over (sample, window), each accumulating its
//                 k*k x r (or r) partial sums privately: no atomics, deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../dtf_geometry.h"

namespace fastdense {
namespace {

using at::Tensor;

constexpr const char* kOp = "fastdense dynamic task filter (cpp): ";

DtfGeometry make_geometry(const Tensor& tokens, const char* name, int64_t height, int64_t width, int64_t window) {
  TORCH_CHECK(tokens.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", tokens.device());
  const auto st = tokens.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, kOp, "supports float32/float64, got ", name, " of dtype ", st);
  TORCH_CHECK(tokens.dim() == 3, kOp, name, " must have shape (S, N, r), got ", tokens.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, kOp, "height and width must be positive, got ", height, " x ", width);
  TORCH_CHECK(tokens.size(1) == height * width, kOp, name, " has N = ", tokens.size(1), " tokens but height * width = ",
              height * width);
  TORCH_CHECK(window >= 0, kOp, "window must be >= 0, got ", window);
  return DtfGeometry::make(tokens.size(0), height, width, tokens.size(2), window);
}

int64_t kernel_size_of(const Tensor& theta, const DtfGeometry& g, const Tensor& ref) {
  TORCH_CHECK(theta.device().is_cpu(), kOp, "theta must be a CPU tensor, got ", theta.device());
  TORCH_CHECK(theta.scalar_type() == ref.scalar_type(), kOp, "theta has dtype ", theta.scalar_type(),
              " but the tokens have ", ref.scalar_type());
  TORCH_CHECK(theta.dim() == 4 && theta.size(0) == g.S && theta.size(1) == g.n_windows() && theta.size(2) == g.r, kOp,
              "theta must have shape (S=", g.S, ", n_windows=", g.n_windows(), ", r=", g.r, ", k*k), got ",
              theta.sizes());
  int64_t k = 1;
  while (k * k < theta.size(3)) ++k;
  TORCH_CHECK(k * k == theta.size(3) && k % 2 == 1, kOp, "theta's last dim must be k*k for an odd k, got ",
              theta.size(3));
  return k;
}

// (S, n_win, r, k*k) with any sample/window strides -> contiguous (S, n_win, k*k, r):
// the r channels of one tap become one contiguous, vectorisable row.
Tensor taps_major(const Tensor& theta) { return theta.transpose(2, 3).contiguous(); }

int64_t row_grain(const DtfGeometry& g, int64_t k) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, g.W * g.r * k * k));
}

// out[s, y, x, :] = sum_{a,b} taps[a*k+b, :] * src[s, y + sign*(a-p), x + sign*(b-p), :],
// the source restricted to the pixel's window. sign = +1: forward (correlation);
// sign = -1: dh (the adjoint, the flipped filter). When pooled is given, adds
// pooled[win] / (tokens in the window): the GAP's adjoint.
template <typename scalar_t>
void conv_rows(const scalar_t* src, const scalar_t* taps, const scalar_t* pooled, scalar_t* out, const DtfGeometry& g,
               int64_t k, int sign) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = k / 2, kk = k * k, r = g.r, nwin = g.n_windows();
  at::parallel_for(0, g.S * g.H, row_grain(g, k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(r);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / g.H, y = row % g.H, wy = y / g.wh;
      const int64_t y0 = g.win_y0(wy), y1 = g.win_y1(wy);
      for (int64_t x = 0; x < g.W; ++x) {
        const int64_t wx = x / g.ww, x0 = g.win_x0(wx), x1 = g.win_x1(wx);
        const int64_t win = wy * g.nw + wx;
        const scalar_t* tw = taps + (s * nwin + win) * kk * r;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t* C10_RESTRICT a_ = acc.data();
        for (int64_t a = 0; a < k; ++a) {
          const int64_t yy = y + sign * (a - p);
          if (yy < y0 || yy >= y1) continue;
          for (int64_t b = 0; b < k; ++b) {
            const int64_t xx = x + sign * (b - p);
            if (xx < x0 || xx >= x1) continue;
            const scalar_t* C10_RESTRICT hp = src + ((s * g.H + yy) * g.W + xx) * r;
            const scalar_t* C10_RESTRICT tp = tw + (a * k + b) * r;
            for (int64_t c = 0; c < r; ++c) a_[c] += static_cast<acc_t>(tp[c]) * static_cast<acc_t>(hp[c]);
          }
        }
        scalar_t* C10_RESTRICT o = out + ((s * g.H + y) * g.W + x) * r;
        if (pooled) {
          const scalar_t* C10_RESTRICT pw = pooled + (s * nwin + win) * r;
          const acc_t inv = acc_t(1) / static_cast<acc_t>((y1 - y0) * (x1 - x0));
          for (int64_t c = 0; c < r; ++c) o[c] = static_cast<scalar_t>(a_[c] + static_cast<acc_t>(pw[c]) * inv);
        } else {
          for (int64_t c = 0; c < r; ++c) o[c] = static_cast<scalar_t>(a_[c]);
        }
      }
    }
  });
}

// ============================================================================ ops
Tensor dtf_gap(const Tensor& h_in, int64_t height, int64_t width, int64_t window) {
  const DtfGeometry g = make_geometry(h_in, "h", height, width, window);
  const Tensor h = h_in.contiguous();
  Tensor pooled = at::empty({g.S, g.n_windows(), g.r}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dtf_gap", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* out = pooled.data_ptr<scalar_t>();
    const int64_t r = g.r, nwin = g.n_windows();
    at::parallel_for(0, g.S * nwin, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(r);
      for (int64_t sw = begin; sw < end; ++sw) {
        const int64_t s = sw / nwin, win = sw % nwin, wy = win / g.nw, wx = win % g.nw;
        const int64_t y0 = g.win_y0(wy), y1 = g.win_y1(wy), x0 = g.win_x0(wx), x1 = g.win_x1(wx);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t x = x0; x < x1; ++x) {
            const scalar_t* C10_RESTRICT row = hp + ((s * g.H + y) * g.W + x) * r;
            for (int64_t c = 0; c < r; ++c) acc[c] += static_cast<acc_t>(row[c]);
          }
        const acc_t inv = acc_t(1) / static_cast<acc_t>((y1 - y0) * (x1 - x0));
        for (int64_t c = 0; c < r; ++c) out[sw * r + c] = static_cast<scalar_t>(acc[c] * inv);
      }
    });
  });
  return pooled;
}

Tensor dtf_dwconv_fwd(const Tensor& h_in, const Tensor& theta, int64_t height, int64_t width, int64_t window) {
  const DtfGeometry g = make_geometry(h_in, "h", height, width, window);
  const int64_t k = kernel_size_of(theta, g, h_in);
  const Tensor h = h_in.contiguous();
  const Tensor taps = taps_major(theta);
  Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dtf_dwconv_fwd", [&] {
    conv_rows<scalar_t>(h.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), g, k,
                        +1);
  });
  return out;
}

Tensor dtf_dwconv_dh(const Tensor& grad_in, const Tensor& theta, int64_t height, int64_t width, int64_t window,
                     const std::optional<Tensor>& d_pooled_in) {
  const DtfGeometry g = make_geometry(grad_in, "grad", height, width, window);
  const int64_t k = kernel_size_of(theta, g, grad_in);
  const Tensor grad = grad_in.contiguous();
  const Tensor taps = taps_major(theta);
  Tensor d_pooled;
  if (d_pooled_in.has_value() && d_pooled_in->defined()) {
    d_pooled = d_pooled_in->contiguous();
    TORCH_CHECK(d_pooled.scalar_type() == grad.scalar_type() && d_pooled.device().is_cpu(), kOp,
                "d_pooled must be a CPU tensor of the gradient's dtype");
    TORCH_CHECK(d_pooled.dim() == 3 && d_pooled.size(0) == g.S && d_pooled.size(1) == g.n_windows() &&
                    d_pooled.size(2) == g.r,
                kOp, "d_pooled must have shape (S=", g.S, ", n_windows=", g.n_windows(), ", r=", g.r, "), got ",
                d_pooled.sizes());
  }
  Tensor dh = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dtf_dwconv_dh", [&] {
    conv_rows<scalar_t>(grad.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(),
                        d_pooled.defined() ? d_pooled.data_ptr<scalar_t>() : nullptr, dh.data_ptr<scalar_t>(), g, k,
                        -1);
  });
  return dh;
}

Tensor dtf_dwconv_dtheta(const Tensor& grad_in, const Tensor& h_in, int64_t height, int64_t width, int64_t window,
                         int64_t kernel_size) {
  const DtfGeometry g = make_geometry(grad_in, "grad", height, width, window);
  TORCH_CHECK(h_in.sizes() == grad_in.sizes() && h_in.scalar_type() == grad_in.scalar_type() && h_in.device().is_cpu(),
              kOp, "h must be a CPU tensor of grad's shape ", grad_in.sizes(), " and dtype, got ", h_in.sizes());
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, kOp, "kernel_size must be odd, got ", kernel_size);
  const Tensor grad = grad_in.contiguous(), h = h_in.contiguous();
  const int64_t k = kernel_size, kk = k * k, p = k / 2, r = g.r, nwin = g.n_windows();
  Tensor dtheta = at::empty({g.S, nwin, r, kk}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dtf_dwconv_dtheta", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* out = dtheta.data_ptr<scalar_t>();
    at::parallel_for(0, g.S * nwin, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kk * r);
      for (int64_t sw = begin; sw < end; ++sw) {
        const int64_t s = sw / nwin, win = sw % nwin, wy = win / g.nw, wx = win % g.nw;
        const int64_t y0 = g.win_y0(wy), y1 = g.win_y1(wy), x0 = g.win_x0(wx), x1 = g.win_x1(wx);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t x = x0; x < x1; ++x) {
            const scalar_t* C10_RESTRICT gr = gp + ((s * g.H + y) * g.W + x) * r;
            for (int64_t a = 0; a < k; ++a) {
              const int64_t yy = y + a - p;
              if (yy < y0 || yy >= y1) continue;
              for (int64_t b = 0; b < k; ++b) {
                const int64_t xx = x + b - p;
                if (xx < x0 || xx >= x1) continue;
                const scalar_t* C10_RESTRICT hr = hp + ((s * g.H + yy) * g.W + xx) * r;
                acc_t* C10_RESTRICT ap = acc.data() + (a * k + b) * r;
                for (int64_t c = 0; c < r; ++c) ap[c] += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(hr[c]);
              }
            }
          }
        scalar_t* o = out + sw * r * kk;
        for (int64_t c = 0; c < r; ++c)
          for (int64_t t = 0; t < kk; ++t) o[c * kk + t] = static_cast<scalar_t>(acc[t * r + c]);
      }
    });
  });
  return dtheta;
}

}  // namespace
}  // namespace fastdense

TORCH_LIBRARY_IMPL(fastdense, CPU, m) {
  m.impl("_dtf_gap", &fastdense::dtf_gap);
  m.impl("_dtf_dwconv_fwd", &fastdense::dtf_dwconv_fwd);
  m.impl("_dtf_dwconv_dh", &fastdense::dtf_dwconv_dh);
  m.impl("_dtf_dwconv_dtheta", &fastdense::dtf_dwconv_dtheta);
}
