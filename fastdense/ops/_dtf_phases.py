"""The algorithm of the Dynamic Task Filter ops, phase by phase, in PyTorch.

TADFormer's TA-module (paper §3.4, Eq. 3–4) for all T tasks:

    h_t  = f_t Aᵀ                                   phase 1: down-projection
    p_t  = GAP(h_t)          (per sample, per window)         + global average pool
    θ_t  = FilterNorm(φ(p_t))                       phase 2: filter generation
    F̃_t = Φ(f_t) + s · (θ_t ⊛ h_t) Bᵀ              phase 3: depthwise conv + up-projection + add

This file holds the orchestration shared by every backend (``forward``,
``backward``, ``dtf_forward``, ``dtf_backward``) and the ``torch`` backend's
phase kernels (:data:`TORCH_KERNELS`: vectorised, the grouped-conv formulation
over all (sample, window) pairs, no Python loop over samples). The cpp, cuda
and triton backends plug their own kernels into the same orchestration; the
filter generation (tensors of size S · n_windows · r · k², tiny next to the
token tensors) is plain PyTorch for every backend.

Layouts. Tokens are channels-last: h (S, N, r) with N = H · W in raster order.
Filters: theta (S, n_win, r, k²), windows in raster order; a kernel must honour
theta's sample and window strides (a static filter is broadcast over windows
with stride 0). Windows: ``window = 0`` is one window covering the map;
``window = w`` cuts it into w × w windows, the last row/column clipped (see
``reference.dynamic_task_filter``); every window is convolved on its own with
zero padding at its border.

Saved for backward: h (the down-projection), and the small filter tensors
(pooled p, theta, the normalised filters and their std); the filtered tokens
θ ⊛ h are recomputed in backward rather than stored.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

FN_EPS = 1e-10  # DDF's FilterNorm epsilon, added to the std

# Gradient order of the fused op's backward (matches the op's tensor inputs).
GRAD_NAMES = ("f", "base_out", "lora_a", "lora_b", "phi_weight", "phi_bias", "fn_std", "fn_mean",
              "static_weight", "static_bias")
# Gradient order of the DTF-alone op's backward.
DTF_GRAD_NAMES = ("h", "phi_weight", "phi_bias", "fn_std", "fn_mean")


# ----------------------------------------------------------------------------- windows
@dataclasses.dataclass(frozen=True)
class Geometry:
    """An H × W map cut into n_h × n_w windows of wh × ww tokens (last ones clipped)."""

    height: int
    width: int
    wh: int
    ww: int
    nh: int
    nw: int

    @property
    def n_windows(self) -> int:
        return self.nh * self.nw

    @property
    def tokens(self) -> int:
        return self.height * self.width


def geometry(hw, window: int) -> Geometry:
    height, width = int(hw[0]), int(hw[1])
    # A window larger than the map is one clipped window: the map itself.
    wh = min(window, height) if window > 0 else height
    ww = min(window, width) if window > 0 else width
    return Geometry(height, width, wh, ww, -(-height // wh), -(-width // ww))


def window_counts(g: Geometry, device, dtype) -> torch.Tensor:
    """Tokens in each window, (n_h, n_w): the GAP divisor of clipped windows."""
    rows = torch.clamp(g.height - torch.arange(g.nh, device=device) * g.wh, max=g.wh)
    cols = torch.clamp(g.width - torch.arange(g.nw, device=device) * g.ww, max=g.ww)
    return (rows[:, None] * cols[None, :]).to(dtype)


def _padded_grid(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(S, N, c) tokens -> (S, n_h, wh, n_w, ww, c), zero-padded past the map."""
    s, _, c = x.shape
    grid = x.reshape(s, g.height, g.width, c)
    pad_h, pad_w = g.nh * g.wh - g.height, g.nw * g.ww - g.width
    if pad_h or pad_w:
        grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
    return grid.reshape(s, g.nh, g.wh, g.nw, g.ww, c)


def to_windows(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(S, N, c) tokens -> (S · n_win · c, wh, ww): one channel map per (sample, window, channel)."""
    grid = _padded_grid(x, g)
    return grid.permute(0, 1, 3, 5, 2, 4).reshape(-1, g.wh, g.ww)


def from_windows(xw: torch.Tensor, g: Geometry, samples: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`, dropping the padding: -> (S, N, c)."""
    grid = xw.reshape(samples, g.nh, g.nw, -1, g.wh, g.ww).permute(0, 1, 4, 2, 5, 3)
    grid = grid.reshape(samples, g.nh * g.wh, g.nw * g.ww, -1)[:, :g.height, :g.width]
    return grid.reshape(samples, g.tokens, -1)


# ----------------------------------------------------------------------------- torch phase kernels
def gap(h: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Per-window global average pool: (S, N, r) -> (S, n_win, r)."""
    sums = _padded_grid(h, g).sum(dim=(2, 4))  # (S, n_h, n_w, r)
    means = sums / window_counts(g, h.device, h.dtype)[None, :, :, None]
    return means.reshape(h.shape[0], g.n_windows, h.shape[2])


def gap_backward(d_pooled: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Adjoint of :func:`gap`: every token of a window gets d_pooled / count. -> (S, N, r)."""
    s, _, r = d_pooled.shape
    per_token = d_pooled.reshape(s, g.nh, g.nw, r) / window_counts(g, d_pooled.device, d_pooled.dtype)[..., None]
    grid = per_token[:, :, None, :, None, :].expand(s, g.nh, g.wh, g.nw, g.ww, r)
    grid = grid.reshape(s, g.nh * g.wh, g.nw * g.ww, r)[:, :g.height, :g.width]
    return grid.reshape(s, g.tokens, r)


def _flat_filters(theta: torch.Tensor, g: Geometry, samples: int, k: int) -> torch.Tensor:
    r = theta.shape[2]
    return theta.expand(samples, g.n_windows, r, k * k).reshape(-1, 1, k, k)


def dwconv_forward(h: torch.Tensor, theta: torch.Tensor, g: Geometry, k: int) -> torch.Tensor:
    """θ ⊛ h per (sample, window, channel): the grouped-conv trick over all of them at once."""
    s = h.shape[0]
    if h.numel() == 0:  # conv2d has no zero-group form: empty in, empty out
        return torch.zeros_like(h)
    xw = to_windows(h, g)
    groups = xw.shape[0]
    out = F.conv2d(xw.unsqueeze(0), _flat_filters(theta, g, s, k), padding=k // 2, groups=groups)
    return from_windows(out.squeeze(0), g, s)


def dwconv_dh(grad: torch.Tensor, theta: torch.Tensor, g: Geometry, k: int,
              d_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """dh (S, N, r) of y = θ ⊛ h, plus the GAP's share ``d_pooled / count`` when given.

    The conv part is the correlation of dy with the flipped filter (stride 1, same padding).
    """
    s = grad.shape[0]
    if grad.numel() == 0:
        return torch.zeros_like(grad) if d_pooled is None else gap_backward(d_pooled, g)
    gw = to_windows(grad, g)
    flipped = _flat_filters(theta, g, s, k).flip(-1, -2)
    dh = from_windows(F.conv2d(gw.unsqueeze(0), flipped, padding=k // 2, groups=gw.shape[0]).squeeze(0), g, s)
    if d_pooled is not None:
        dh = dh + gap_backward(d_pooled, g)
    return dh


def dwconv_dtheta(grad: torch.Tensor, h: torch.Tensor, g: Geometry, k: int) -> torch.Tensor:
    """dθ (S, n_win, r, k²) of y = θ ⊛ h: dθ[a, b] = Σ_{y,x} dy[y, x] · h_pad[y + a, x + b] per window."""
    s, _, r = h.shape
    pad = k // 2
    gw = to_windows(grad, g)
    hp = F.pad(to_windows(h, g), (pad, pad, pad, pad))
    taps = [(gw * hp[:, a:a + g.wh, b:b + g.ww]).sum(dim=(-2, -1)) for a in range(k) for b in range(k)]
    return torch.stack(taps, dim=-1).reshape(s, g.n_windows, r, k * k)


def conv_up_add(h, theta, g, k, lora_b, scale, base, bias, tasks, out):
    """Phase 3: out[t] = base[t or 0] + s · (θ ⊛ h (+ bias_t)) Bᵀ, written into ``out`` (T, M, Cout).

    h, theta cover the conv samples: T · B of them (one per task and sample),
    or B when every task shares them (dynamic filter on a shared input).
    """
    filtered = dwconv_forward(h, theta, g, k)
    up_add(filtered, bias, lora_b, scale, base, tasks, out)


def up_add(filtered, bias, lora_b, scale, base, tasks, out):
    """out[t] = base + s · (filtered_t + bias_t) Bᵀ, the add fused into the GEMM (addmm / baddbmm).

    filtered (S_c, N, r) holds one map per task (S_c · N = T · M rows) or one
    map shared by every task (S_c · N = M rows); base (T_b, M, C_out).
    """
    tasks_, m, cout = out.shape
    r = filtered.shape[-1]
    bt = lora_b.t()
    if filtered.shape[0] * filtered.shape[1] == m and bias is None:
        update = torch.mm(filtered.reshape(m, r), bt)
        torch.add(base.expand(tasks, m, cout), update, alpha=scale, out=out)
        return
    per_task = filtered.reshape(tasks, m, r)
    if bias is not None:
        per_task = per_task + bias[:, None, :]
    if base.shape[0] == tasks:
        torch.addmm(base.reshape(-1, cout), per_task.reshape(-1, r), bt, alpha=scale, out=out.view(-1, cout))
    else:
        torch.baddbmm(base.expand(tasks, m, cout), per_task, bt.expand(tasks, r, cout), alpha=scale, out=out)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The phase kernels a backend plugs into the shared orchestration."""

    gap: Callable = gap
    dwconv_forward: Callable = dwconv_forward
    dwconv_dh: Callable = dwconv_dh
    dwconv_dtheta: Callable = dwconv_dtheta
    conv_up_add: Callable = conv_up_add


TORCH_KERNELS = Kernels()


def _window_arg(g: Geometry) -> int:
    # The compiled kernels take the window edge; a window covering the map is 0. Windows are square.
    return 0 if (g.nh == 1 and g.nw == 1) else max(g.wh, g.ww)


def _ext_kernels() -> Kernels:
    """Phase kernels of fastdense._C (CPU: csrc/cpu/dtf.cpp; CUDA: csrc/cuda/dtf_bind.cpp).

    The compiled extension has no fused phase 3: its conv output goes through
    the PyTorch GEMM of :func:`up_add`.
    """
    ops = torch.ops.fastdense

    def fwd(h, theta, g: Geometry, k):
        return ops._dtf_dwconv_fwd(h, theta, g.height, g.width, _window_arg(g))

    def dh(grad, theta, g: Geometry, k, d_pooled=None):
        return ops._dtf_dwconv_dh(grad, theta, g.height, g.width, _window_arg(g), d_pooled)

    def dtheta(grad, h, g: Geometry, k):
        return ops._dtf_dwconv_dtheta(grad, h, g.height, g.width, _window_arg(g), k)

    def fused(h, theta, g, k, lora_b, scale, base, bias, tasks, out):
        up_add(fwd(h, theta, g, k), bias, lora_b, scale, base, tasks, out)

    def pool(h, g: Geometry):
        return ops._dtf_gap(h, g.height, g.width, _window_arg(g))

    return Kernels(gap=pool, dwconv_forward=fwd, dwconv_dh=dh, dwconv_dtheta=dtheta, conv_up_add=fused)


def _triton_kernels() -> Kernels:
    from fastdense.kernels import dtf as module  # imports triton: only when a Triton backend runs

    return Kernels(**{f.name: getattr(module, f.name) for f in dataclasses.fields(Kernels)})


_KERNELS = {"torch": lambda: TORCH_KERNELS, "cpp": _ext_kernels, "cuda": _ext_kernels, "triton": _triton_kernels}


def bind(fn: Callable, backend: str) -> Callable:
    """``fn`` (an orchestration function below) running ``backend``'s phase kernels."""
    def run(*args):
        return fn(*args, kernels=_KERNELS[backend]())

    run.__qualname__ = f"{fn.__name__}[{backend}]"
    return run


# ----------------------------------------------------------------------------- phase 2: filters
def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 squares of filter logits of a few hundred overflow: statistics run in fp32 (fp64 for fp64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def filters_forward(pooled, phi_weight, phi_bias, fn_std, fn_mean, k: int):
    """θ = FilterNorm(φ(p)) (DDF's 'channel' FilterNorm; eps added to the unbiased std).

    pooled (S, n_win, r) -> theta, normed (S, n_win, r, k²), denom = std + eps (S, n_win, r, 1),
    in pooled's dtype; the mean, std and normalisation are computed in fp32 (fp64).
    """
    s, nwin, r = pooled.shape
    kk = k * k
    dtype = pooled.dtype
    raw = F.linear(pooled, phi_weight, phi_bias).reshape(s, nwin, r, kk).to(_stats_dtype(dtype))
    centred = raw - raw.mean(dim=-1, keepdim=True)
    denom = (centred.square().sum(dim=-1, keepdim=True) / (kk - 1)).sqrt() + FN_EPS
    normed = centred / denom
    theta = normed * fn_std.reshape(r, kk)
    if fn_mean is not None:
        theta = theta + fn_mean.reshape(r, kk)
    return theta.to(dtype), normed.to(dtype), denom.to(dtype)


def filters_backward(d_theta, pooled, normed, denom, phi_weight, fn_std, has_phi_bias, has_mean):
    """Gradients of :func:`filters_forward`: (d_pooled, d_phi_weight, d_phi_bias, d_std, d_mean)."""
    s, nwin, r, kk = d_theta.shape
    dtype = d_theta.dtype
    acc = _stats_dtype(dtype)
    d_theta, normed, denom = d_theta.to(acc), normed.to(acc), denom.to(acc)
    d_std = (d_theta * normed).sum(dim=(0, 1)).reshape(-1)
    d_mean = d_theta.sum(dim=(0, 1)).reshape(-1) if has_mean else None
    d_norm = d_theta * fn_std.reshape(r, kk)
    # normed = c / (σ + ε), σ = sqrt(Σ c² / (k² − 1)), c = raw − mean(raw);
    # ∂σ/∂c = c / ((k² − 1) σ). A filter with equal taps has σ = 0 and c = 0:
    # its σ term is 0 (the limit, and what autograd of torch.std gives), not 0/0.
    sigma = denom - FN_EPS
    d_denom = -(d_norm * normed).sum(dim=-1, keepdim=True) / denom
    centred_over_sigma = torch.where(sigma > 0, normed * denom / sigma.clamp_min(torch.finfo(acc).tiny), 0.0)
    d_centred = d_norm / denom + d_denom * centred_over_sigma / (kk - 1)
    d_raw = (d_centred - d_centred.mean(dim=-1, keepdim=True)).reshape(s * nwin, r * kk).to(dtype)
    d_pooled = (d_raw @ phi_weight).reshape(s, nwin, r)
    d_phi_weight = d_raw.t() @ pooled.reshape(s * nwin, r)
    d_phi_bias = d_raw.sum(dim=0) if has_phi_bias else None
    return (d_pooled, d_phi_weight, d_phi_bias, d_std.to(dtype), None if d_mean is None else d_mean.to(dtype))


# ----------------------------------------------------------------------------- the fused TA-module
def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _static_theta(static_weight, tasks: int, batch: int, g: Geometry):
    """(T, r, k, k) -> (T · B, n_win, r, k²), a broadcast view (stride 0 over the windows)."""
    t, r, k, _ = static_weight.shape
    per_sample = static_weight.reshape(t, 1, r, k * k).expand(t, batch, r, k * k).reshape(t * batch, 1, r, k * k)
    return per_sample.expand(t * batch, g.n_windows, r, k * k)


def forward(f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
            phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias, kernels: Kernels = TORCH_KERNELS):
    """The TA-module for all tasks. f (T_f, B, N, C), T_f ∈ {1, T}; base_out (T_b, B, N, C_out), T_b ∈ {1, T}.

    Returns (out (T, B, N, C_out), h (T_f, B, N, r), theta, pooled, normed, denom);
    the last four are the filter tensors saved for backward (empty for the static filter).
    """
    g = geometry(hw, window)
    k = kernel_size
    tasks = num_tasks
    tf, batch, n, c = f.shape
    cout = lora_b.shape[0]
    r = lora_a.shape[0]
    h = torch.mm(f.reshape(-1, c), lora_a.t()).reshape(tf * batch, n, r)  # phase 1
    dynamic = static_weight is None
    if dynamic:
        pooled = kernels.gap(h, g)
        theta, normed, denom = filters_forward(pooled, phi_weight, phi_bias, fn_std, fn_mean, k)  # phase 2
        hc = h
    else:
        pooled = normed = denom = _empty(h)
        theta = _static_theta(static_weight, tasks, batch, g)
        hc = h if tf == tasks else h.reshape(1, batch * n, r).expand(tasks, batch * n, r).reshape(tasks * batch, n, r)
    out = base_out.new_empty((tasks, batch * n, cout))
    kernels.conv_up_add(hc, theta, g, k, lora_b, scale, base_out.reshape(base_out.shape[0], batch * n, cout),
                        static_bias, tasks, out)  # phase 3
    if not dynamic:
        theta = _empty(h)
    return out.reshape(tasks, batch, n, cout), h.reshape(tf, batch, n, r), theta, pooled, normed, denom


def backward(grad, f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
             phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias,
             h, theta, pooled, normed, denom, needs, kernels: Kernels = TORCH_KERNELS):
    """Gradients in :data:`GRAD_NAMES` order (None where not needed)."""
    g = geometry(hw, window)
    k = kernel_size
    tasks = num_tasks
    tf, batch, n, c = f.shape
    cout, r = lora_b.shape
    m = batch * n
    dynamic = static_weight is None
    grad = grad.reshape(tasks, m, cout)
    d_base = None
    if needs[1]:
        d_base = grad.clone() if base_out.shape[0] == tasks else grad.sum(dim=0)
        d_base = d_base.reshape(base_out.shape)

    h = h.reshape(tf * batch, n, r)
    if dynamic:
        hc = h
    else:
        theta = _static_theta(static_weight, tasks, batch, g)
        hc = h if tf == tasks else h.reshape(1, m, r).expand(tasks, m, r).reshape(tasks * batch, n, r)
    # Gradient reaching the filtered tokens: one map per conv sample.
    g_up = grad.sum(dim=0) if hc.shape[0] == batch and tasks > 1 else grad.reshape(hc.shape[0] * n, cout)
    g_up = g_up.reshape(-1, cout)
    d_filtered = torch.mm(g_up, lora_b).mul_(scale).reshape(hc.shape[0], n, r)

    d_lora_b = None
    if needs[3]:
        filtered = kernels.dwconv_forward(hc, theta, g, k)  # recomputed, not saved
        if static_bias is not None:
            filtered = (filtered.reshape(tasks, m, r) + static_bias[:, None, :]).reshape(-1, n, r)
        d_lora_b = torch.mm(g_up.t(), filtered.reshape(-1, r)).mul_(scale)
    d_static_bias = d_filtered.reshape(tasks, m, r).sum(dim=1) if (not dynamic and needs[9]) else None

    need_dh = needs[0] or needs[2]
    # With the dynamic filter, h also reaches the output through GAP -> θ.
    need_dtheta = (dynamic and (need_dh or any(needs[4:8]))) or (not dynamic and needs[8])
    d_theta = kernels.dwconv_dtheta(d_filtered, hc, g, k) if need_dtheta else None
    d_phi_w = d_phi_b = d_std = d_mean = d_static_w = d_pooled = None
    if dynamic and d_theta is not None:
        d_pooled, d_phi_w, d_phi_b, d_std, d_mean = filters_backward(
            d_theta, pooled, normed, denom, phi_weight, fn_std, phi_bias is not None, fn_mean is not None)
    elif needs[8]:
        d_static_w = d_theta.reshape(tasks, -1, r, k * k).sum(dim=1).reshape(static_weight.shape)
    dhc = kernels.dwconv_dh(d_filtered, theta, g, k, d_pooled) if need_dh else None

    d_f = d_a = None
    if dhc is not None:
        dh = dhc if hc.shape[0] == tf * batch else dhc.reshape(tasks, m, r).sum(dim=0)
        dh = dh.reshape(-1, r)
        if needs[0]:
            d_f = torch.mm(dh, lora_a).reshape(f.shape)
        if needs[2]:
            d_a = torch.mm(dh.t(), f.reshape(-1, c))
    grads = (d_f, d_base, d_a, d_lora_b, d_phi_w, d_phi_b, d_std, d_mean, d_static_w, d_static_bias)
    return tuple(gr if need else None for gr, need in zip(grads, needs))


# ----------------------------------------------------------------------------- the DTF alone
def dtf_forward(h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean,
                kernels: Kernels = TORCH_KERNELS):
    """DynamicTaskFilter on tokens h (S, N, r): (out, theta, pooled, normed, denom)."""
    g = geometry(hw, window)
    pooled = kernels.gap(h, g)
    theta, normed, denom = filters_forward(pooled, phi_weight, phi_bias, fn_std, fn_mean, kernel_size)
    out = kernels.dwconv_forward(h, theta, g, kernel_size)
    return out, theta, pooled, normed, denom


def dtf_backward(grad, grad_theta, h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean,
                 theta, pooled, normed, denom, needs, kernels: Kernels = TORCH_KERNELS):
    """Gradients in :data:`DTF_GRAD_NAMES` order; ``grad_theta`` (or None) is the gradient reaching θ itself."""
    g = geometry(hw, window)
    d_theta = kernels.dwconv_dtheta(grad, h, g, kernel_size)
    if grad_theta is not None:
        d_theta = d_theta + grad_theta
    d_pooled, d_phi_w, d_phi_b, d_std, d_mean = filters_backward(
        d_theta, pooled, normed, denom, phi_weight, fn_std, phi_bias is not None, fn_mean is not None)
    dh = kernels.dwconv_dh(grad, theta, g, kernel_size, d_pooled) if needs[0] else None
    grads = (dh, d_phi_w, d_phi_b, d_std, d_mean)
    return tuple(gr if need else None for gr, need in zip(grads, needs))


def static_filter_forward(h, hw, window, weight, bias, kernels: Kernels = TORCH_KERNELS):
    """NaiveConvFilter on tokens h (S, N, r) with one (r, k, k) filter for every sample."""
    g = geometry(hw, window)
    s, _, r = h.shape
    k = weight.shape[-1]
    theta = weight.reshape(1, 1, r, k * k).expand(s, g.n_windows, r, k * k)
    out = kernels.dwconv_forward(h, theta, g, k)
    return out if bias is None else out + bias


def num_windows(hw, window) -> int:
    return geometry(hw, window).n_windows


def isqrt_kernel(rows: int, r: int) -> int:
    """k from φ's output size r · k²; 0 when it is not r times a square."""
    if r <= 0 or rows % r:
        return 0
    k = math.isqrt(rows // r)
    return k if k * k * r == rows else 0
