"""Triton kernels of TADFormer's Dynamic Task Filter (``ta_lora_dtf``, ``dynamic_task_filter``).

Phase 3 of the TA-module is one kernel, ``_conv_up_add_kernel``: a program
takes BLOCK_M tokens of one conv sample, computes θ ⊛ h for them in registers
(the k×k taps read the neighbour tokens, the halo, straight from the
channels-last h; a tap whose source lies outside the token's window is the
zero padding), scales by s (adds the static filter's bias), and sweeps the
output channels: ``tl.dot`` with Bᵀ, plus the base output, stored for every
task that reads this map. The filtered tokens never go through memory. When the
tasks share the map (dynamic filter on one shared input) it is computed once
and written T times.

Backward: ``_conv_kernel`` gives dh (the flipped filter, plus the GAP's
adjoint d_pooled / count) and the recomputed θ ⊛ h for dB; ``_dtheta_kernel``
reduces the window's pixels for every tap and channel, slices of the pixels
per program added atomically in fp32, as does ``_gap_kernel`` for the pool of
phase 1. The GEMMs (down-projection, dF, dA, dB) go to cuBLAS; the filter
generation (phase 2) is a few tiny PyTorch ops (fastdense/ops/_dtf_phases.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import interpreting as _interpreting
from ._launch import launch


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


# ----------------------------------------------------------------------------- configs
# One small config in the interpreter (every tile op is numpy work there). On a
# GPU the token tile of the conv kernels and the pixel slice of the filter
# gradient depend on the map: a 14x14 stage at batch 8 has 6k tokens, a 112x112
# one 400k, so small tiles keep the small maps' grids full and large tiles cut
# the large maps' halo re-reads. The autotuners key on the padded rank, the
# kernel size and a power-of-two bucket of the token count (TOKENS, never read
# by the kernels), not on the raw sizes: a new resolution does not re-tune.
# A program holds a (BLOCK_M, R_PAD) fp32 accumulator (conv) or that and a
# (BLOCK_M, BLOCK_N) fp32 product (conv + up-projection): _prune keeps the
# configs with at most 32 elements of those per thread for 16-bit inputs and 8
# for fp32, whose loaded tiles take twice the registers (128-token tiles with 4
# warps spilled at R_PAD = 64 in bf16, 32-token ones in fp32).
def _conv_configs(interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=2) for bm, w in ((16, 4), (64, 4), (128, 8))]


def _up_add_configs(interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn, w in ((16, 64, 4), (64, 64, 4), (128, 64, 8))]


def _dtheta_configs(interpreting: bool):
    # The (KK_PAD, R_PAD) accumulator is small; a 128-pixel slice spilled with 8 warps.
    if interpreting:
        return [triton.Config({"BLOCK_P": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_P": bp}, num_warps=4, num_stages=2) for bp in (32, 64)]


def _per_thread_limit(named_args, pointer: str) -> int:
    return 8 if named_args[pointer].dtype.itemsize >= 4 else 32


def _prune_conv(configs, named_args, **kwargs):
    limit = _per_thread_limit(named_args, "src_ptr")
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * kwargs["R_PAD"] <= limit * 32 * c.num_warps]
    return kept or configs[:1]


def _prune_up_add(configs, named_args, **kwargs):
    limit = _per_thread_limit(named_args, "h_ptr")
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] * max(c.kwargs["BLOCK_N"], kwargs["R_PAD"]) <= limit * 32 * c.num_warps]
    return kept or configs[:1]


# Geometry arguments are not specialised (no divisibility hints, no "== 1"
# variants): they only feed index arithmetic, and specialising them compiled a
# kernel per Swin stage and window size on the GPU.
_GEOMETRY = ["H", "W", "WH", "WW", "NW"]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _conv_tile(src_ptr, theta_ptr, s, offs_n, mask_n, offs_c, mask_c, H, W, WH, WW, NW, R, ts0, ts1,
               K: tl.constexpr, SIGN: tl.constexpr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """Σ_taps θ[s, win, c, tap] · src[s, y ± (a − k/2), x ± (b − k/2), c] for BLOCK_M tokens, fp32."""
    y = offs_n // W
    x = offs_n % W
    wy = y // WH
    wx = x // WW
    y0 = wy * WH
    y1 = tl.minimum(y0 + WH, H)
    x0 = wx * WW
    x1 = tl.minimum(x0 + WW, W)
    win = wy * NW + wx
    src = src_ptr + s.to(tl.int64) * H * W * R
    th = theta_ptr + s.to(tl.int64) * ts0 + win[:, None].to(tl.int64) * ts1 + offs_c[None, :] * (K * K)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for a in tl.static_range(K):
        yy = y + SIGN * (a - K // 2)
        for b in tl.static_range(K):
            xx = x + SIGN * (b - K // 2)
            ok = mask_n & (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            m2 = ok[:, None] & mask_c[None, :]
            hv = tl.load(src + (yy * W + xx).to(tl.int64)[:, None] * R + offs_c[None, :], mask=m2, other=0.0)
            tv = tl.load(th + (a * K + b), mask=m2, other=0.0)
            acc += hv.to(tl.float32) * tv.to(tl.float32)
    # Rows past the map (masked, never stored) would give an empty window.
    count = tl.maximum((y1 - y0) * (x1 - x0), 1).to(tl.float32)
    return acc, win, count


@_launch.autotune(_up_add_configs, key=["R_PAD", "K", "COUT", "TOKENS"], prune=_prune_up_add)
@triton.jit(do_not_specialize=["N", *_GEOMETRY])
def _conv_up_add_kernel(
    h_ptr, theta_ptr, b_ptr, bias_ptr, base_ptr, out_ptr,
    N, H, W, WH, WW, NW, R, COUT, BATCH, TASKS, M_TOTAL, BASE_TSTRIDE, ts0, ts1, scale, TOKENS,
    K: tl.constexpr, SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    offs_n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    offs_c = tl.arange(0, R_PAD)
    mask_c = offs_c < R
    filt, win, count = _conv_tile(h_ptr, theta_ptr, s, offs_n, mask_n, offs_c, mask_c, H, W, WH, WW, NW, R,
                                  ts0, ts1, K, 1, BLOCK_M, R_PAD)
    if SHARED:
        sample = s
        task = 0
    else:
        task = s // BATCH
        sample = s % BATCH
    if HAS_BIAS:
        filt += tl.load(bias_ptr + task * R + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    filt = (filt * scale).to(b_ptr.dtype.element_ty)
    rows = (sample * N + offs_n).to(tl.int64)
    for n0 in range(0, COUT, BLOCK_N):
        offs_o = n0 + tl.arange(0, BLOCK_N)
        mask_o = offs_o < COUT
        bt = tl.load(b_ptr + offs_o[None, :] * R + offs_c[:, None], mask=mask_c[:, None] & mask_o[None, :], other=0.0)
        upd = tl.dot(filt, bt, input_precision=DOT_PRECISION)
        mask = mask_n[:, None] & mask_o[None, :]
        if SHARED:
            for t in range(0, TASKS):
                base = tl.load(base_ptr + t * BASE_TSTRIDE + rows[:, None] * COUT + offs_o[None, :], mask=mask,
                               other=0.0)
                tl.store(out_ptr + (t * M_TOTAL + rows)[:, None] * COUT + offs_o[None, :],
                         (base.to(tl.float32) + upd).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            base = tl.load(base_ptr + task * BASE_TSTRIDE + rows[:, None] * COUT + offs_o[None, :], mask=mask,
                           other=0.0)
            tl.store(out_ptr + (task * M_TOTAL + rows)[:, None] * COUT + offs_o[None, :],
                     (base.to(tl.float32) + upd).to(out_ptr.dtype.element_ty), mask=mask)


@_launch.autotune(_conv_configs, key=["R_PAD", "K", "TOKENS"], prune=_prune_conv)
@triton.jit(do_not_specialize=["N", *_GEOMETRY, "NWIN"])
def _conv_kernel(src_ptr, theta_ptr, dp_ptr, out_ptr, N, H, W, WH, WW, NW, NWIN, R, ts0, ts1, TOKENS,
                 K: tl.constexpr, SIGN: tl.constexpr, HAS_DP: tl.constexpr, BLOCK_M: tl.constexpr,
                 R_PAD: tl.constexpr):
    """y = θ ⊛ src (SIGN = 1) or dh = θᵀ ⊛ grad (+ d_pooled / count) (SIGN = −1)."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    offs_n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    offs_c = tl.arange(0, R_PAD)
    mask_c = offs_c < R
    acc, win, count = _conv_tile(src_ptr, theta_ptr, s, offs_n, mask_n, offs_c, mask_c, H, W, WH, WW, NW, R,
                                 ts0, ts1, K, SIGN, BLOCK_M, R_PAD)
    mask = mask_n[:, None] & mask_c[None, :]
    if HAS_DP:
        dp = tl.load(dp_ptr + (s.to(tl.int64) * NWIN + win)[:, None] * R + offs_c[None, :], mask=mask, other=0.0)
        acc += dp.to(tl.float32) / count[:, None]
    tl.store(out_ptr + (s.to(tl.int64) * N + offs_n)[:, None] * R + offs_c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_range(sw, part, CHUNK, H, W, WH, WW, NW, NWIN):
    win = sw % NWIN
    wy = win // NW
    wx = win % NW
    y0 = wy * WH
    y1 = tl.minimum(y0 + WH, H)
    x0 = wx * WW
    x1 = tl.minimum(x0 + WW, W)
    width = x1 - x0
    count = (y1 - y0) * width
    p_start = part * CHUNK
    p_end = tl.minimum(p_start + CHUNK, count)
    return y0, y1, x0, x1, width, count, p_start, p_end


# dθ is added atomically: the autotuner zeroes it before each trial run.
@_launch.autotune(_dtheta_configs, key=["R_PAD", "K", "TOKENS"], reset_to_zero=["dt_ptr"])
@triton.jit(do_not_specialize=[*_GEOMETRY, "NWIN", "CHUNK"])
def _dtheta_kernel(g_ptr, h_ptr, dt_ptr, H, W, WH, WW, NW, NWIN, R, CHUNK, TOKENS,
                   K: tl.constexpr, KK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, R_PAD: tl.constexpr):
    sw = tl.program_id(0)
    part = tl.program_id(1)
    s = sw // NWIN
    y0, y1, x0, x1, width, count, p_start, p_end = _window_range(sw, part, CHUNK, H, W, WH, WW, NW, NWIN)
    offs_c = tl.arange(0, R_PAD)
    mask_c = offs_c < R
    taps = tl.arange(0, KK_PAD)
    base_off = s.to(tl.int64) * H * W * R
    acc = tl.zeros((KK_PAD, R_PAD), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mp = p < p_end
        y = y0 + p // width
        x = x0 + p % width
        gv = tl.load(g_ptr + base_off + (y * W + x).to(tl.int64)[:, None] * R + offs_c[None, :],
                     mask=mp[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        for a in tl.static_range(K):
            yy = y + (a - K // 2)
            for b in tl.static_range(K):
                xx = x + (b - K // 2)
                ok = mp & (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
                hv = tl.load(h_ptr + base_off + (yy * W + xx).to(tl.int64)[:, None] * R + offs_c[None, :],
                             mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                contrib = tl.sum(gv * hv, axis=0)
                acc += tl.where(taps[:, None] == a * K + b, contrib[None, :], 0.0)
    ptrs = dt_ptr + (sw.to(tl.int64) * R + offs_c[None, :]) * (K * K) + taps[:, None]
    tl.atomic_add(ptrs, acc, mask=(taps[:, None] < K * K) & mask_c[None, :])


# The pool is one streaming read of h at a fixed 64-pixel slice: no tile
# choice for an autotuner to make.
@triton.jit(do_not_specialize=[*_GEOMETRY, "NWIN", "CHUNK"])
def _gap_kernel(h_ptr, pooled_ptr, H, W, WH, WW, NW, NWIN, R, CHUNK, BLOCK_P: tl.constexpr, R_PAD: tl.constexpr):
    sw = tl.program_id(0)
    part = tl.program_id(1)
    s = sw // NWIN
    y0, y1, x0, x1, width, count, p_start, p_end = _window_range(sw, part, CHUNK, H, W, WH, WW, NW, NWIN)
    offs_c = tl.arange(0, R_PAD)
    mask_c = offs_c < R
    base_off = s.to(tl.int64) * H * W * R
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mp = p < p_end
        y = y0 + p // width
        x = x0 + p % width
        hv = tl.load(h_ptr + base_off + (y * W + x).to(tl.int64)[:, None] * R + offs_c[None, :],
                     mask=mp[:, None] & mask_c[None, :], other=0.0)
        acc += tl.sum(hv.to(tl.float32), axis=0)
    tl.atomic_add(pooled_ptr + sw.to(tl.int64) * R + offs_c, acc / count.to(tl.float32), mask=mask_c)


# ----------------------------------------------------------------------------- launchers
def _tokens_bucket(tokens: int) -> int:
    return max(1024, min(1 << 20, triton.next_power_of_2(tokens)))


def _dense_taps(theta: torch.Tensor) -> torch.Tensor:
    kk = theta.shape[3]
    if theta.stride(3) == 1 and theta.stride(2) == kk:
        return theta
    return theta.contiguous()


def _geo_args(g):
    return g.height, g.width, g.wh, g.ww, g.nw


def _reduction_grid(samples: int, g, device) -> tuple[int, int, int]:
    """(programs per window, pixels per program): enough programs to fill the GPU, or one per window."""
    windows = max(1, samples * g.n_windows)
    pixels = g.wh * g.ww
    if _interpreting():
        parts = 1
    else:
        sms = _launch.sm_count(device)
        parts = max(1, min(-(-4 * sms // windows), pixels // 256 or 1))
    chunk = -(-pixels // parts)
    return parts, chunk


def gap(h: torch.Tensor, g) -> torch.Tensor:
    s, _, r = h.shape
    pooled = torch.zeros((s, g.n_windows, r), device=h.device, dtype=torch.float32)
    parts, chunk = _reduction_grid(s, g, h.device)
    if h.numel():
        launch(_gap_kernel, (s * g.n_windows, parts), h, pooled, *_geo_args(g), g.n_windows, r, chunk,
               BLOCK_P=16 if _interpreting() else 64, R_PAD=_pow2(r, 2))
    return pooled.to(h.dtype)


def _conv(src, theta, g, k, sign, d_pooled=None):
    s, n, r = src.shape
    theta = _dense_taps(theta)
    out = torch.empty_like(src)
    if src.numel():
        launch(
            _conv_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), s), src, theta,
            d_pooled if d_pooled is not None else src, out, n, *_geo_args(g), g.n_windows, r,
            theta.stride(0), theta.stride(1), _tokens_bucket(s * n), K=k, SIGN=sign, HAS_DP=d_pooled is not None,
            R_PAD=_pow2(r, 2))
    return out


def dwconv_forward(h, theta, g, k):
    return _conv(h.contiguous(), theta, g, k, 1)


def dwconv_dh(grad, theta, g, k, d_pooled=None):
    return _conv(grad.contiguous(), theta, g, k, -1, None if d_pooled is None else d_pooled.contiguous())


def dwconv_dtheta(grad, h, g, k):
    s, _, r = h.shape
    out = torch.zeros((s, g.n_windows, r, k * k), device=h.device, dtype=torch.float32)
    parts, chunk = _reduction_grid(s, g, h.device)
    if h.numel():
        launch(_dtheta_kernel, (s * g.n_windows, parts), grad.contiguous(), h.contiguous(), out, *_geo_args(g),
               g.n_windows, r, chunk, _tokens_bucket(s * g.tokens), K=k, KK_PAD=_pow2(k * k, 2), R_PAD=_pow2(r, 2))
    return out.to(h.dtype)


def conv_up_add(h, theta, g, k, lora_b, scale, base, bias, tasks, out):
    """Phase 3 fused: out[t] = base + s · (θ ⊛ h (+ bias_t)) Bᵀ (contract: fastdense.ops._dtf_phases.conv_up_add)."""
    samples, n, r = h.shape
    m, cout = out.shape[1], out.shape[2]
    batch = m // n
    shared = samples == batch and bias is None
    theta = _dense_taps(theta)
    precision = "ieee" if h.dtype == torch.float32 else "tf32"
    if out.numel():
        launch(
            _conv_up_add_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), samples), h.contiguous(), theta,
            lora_b.contiguous(), bias if bias is not None else h, base, out,
            n, *_geo_args(g), r, cout, batch, tasks, m, m * cout if base.shape[0] > 1 else 0,
            theta.stride(0), theta.stride(1), float(scale), _tokens_bucket(samples * n),
            K=k, SHARED=shared, HAS_BIAS=bias is not None, R_PAD=_pow2(r), DOT_PRECISION=precision)



def compile_specs(g, samples: int, rank: int, dtype, *, kernel_size: int = 3, tasks: int = 1,
                  out_features: int = 0, shared: bool = False, static_bias: bool = False,
                  phases=("gap", "dwconv_forward", "dwconv_dh", "dwconv_dh_pooled", "dwconv_dtheta",
                          "conv_up_add")) -> list:
    """What the phase launchers above would compile on a GPU for one problem.

    ``g``: the window geometry (fastdense.ops._dtf_phases.Geometry or anything
    with its fields); ``samples`` conv samples (tasks x batch, or the batch when
    ``shared``) of g.tokens tokens and ``rank`` channels. conv_up_add writes
    ``tasks`` outputs of ``out_features`` channels; ``shared``: one map for all
    tasks; ``static_bias``: the static filter's per-task bias. Runs the
    launchers on meta tensors (see fastdense.kernels._launch).
    """
    meta = _launch.meta_tensor
    k = kernel_size
    n = g.tokens
    h = meta(samples, n, rank, dtype=dtype)
    theta = meta(samples, g.n_windows, rank, k * k, dtype=dtype)
    with _launch.recording() as launches:
        if "gap" in phases:
            gap(h, g)
        if "dwconv_forward" in phases:
            dwconv_forward(h, theta, g, k)
        if "dwconv_dh" in phases:
            dwconv_dh(h, theta, g, k)
        if "dwconv_dh_pooled" in phases:
            dwconv_dh(h, theta, g, k, meta(samples, g.n_windows, rank, dtype=dtype))
        if "dwconv_dtheta" in phases:
            dwconv_dtheta(h, h, g, k)
        if "conv_up_add" in phases:
            batch = samples if shared else samples // tasks
            cout = out_features
            base = meta(tasks, batch * n, cout, dtype=dtype)
            out = meta(tasks, batch * n, cout, dtype=dtype)
            bias = meta(tasks, rank, dtype=dtype) if static_bias else None
            conv_up_add(h, theta, g, k, meta(cout, rank, dtype=dtype), 1.0, base, bias, tasks, out)
    case = (f"dtf S={samples} {g.height}x{g.width} win={g.wh}x{g.ww} r={rank} k={k} T={tasks} "
            f"Cout={out_features}{' shared' if shared else ''}{' bias' if static_bias else ''}")
    return _launch.specs(launches, case)
