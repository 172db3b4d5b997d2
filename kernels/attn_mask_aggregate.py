"""Triton kernels of ``attn_mask_aggregate`` (M_attn = M_saᵀ M_ca without M_sa).

Concept-codebook paper §3.3; the tiling is FlashAttention-2's: P is rebuilt
tile by tile from the row log-sum-exp and never stored.

Forward
    ``_lse_kernel``    (query block, b·h): lse_i = logsumexp_j s_ij, online over
                       key blocks (skipped when the caller gives SDPA's lse).
    ``_fwd_kernel``    (key block, b·h): out_h[J] = Σ_I exp(s_IJ − lse_I)ᵀ m_I, the
                       dV = Pᵀ dO loop of flash-attention's backward with m_ca
                       in the place of dO. Heads are written to an fp32
                       (B, H, L, N) buffer and reduced by torch ("mean"/"sum"):
                       O(H·L·N), a few MB at SD sizes, keeps the sum
                       deterministic and the grid B·H·L/BLOCK wide.
Backward, with G = dOut (× 1/H for "mean")
    ``_bwd_rows_kernel`` (query block, b·h): first sweep dM_I = Σ_J P_IJ G_J and
                       δ_I = ⟨m_I, dM_I⟩; second sweep dq_I = scale Σ_J dS_IJ k_J
                       with dS = P ⊙ (m_I G_Jᵀ − δ_I).
    ``_bwd_cols_kernel`` (key block, b·h): dk_J = scale Σ_I dS_IJᵀ q_I.
    dm_ca is dM (summed over the heads by torch when m_ca is shared).

Head dims d ∈ {40, 64, 80, 128} and N ≤ 256 are padded to the next power of
two inside the kernels (masked loads, zeros never touch memory); odd L is
masked: padded query rows get lse = +inf, so their probabilities are 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import launch

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- configs
# The interpreter runs every tile op in numpy: one small config. On a GPU each
# kernel has its own short list, (BLOCK_M query rows, BLOCK_N key rows, warps,
# stages), every one free of register spills on sm_90 for head dims up to 128
# (BLOCK_D <= 128) and up to 128 concepts (BLOCK_C <= 128) in bf16/fp16.
# What decides it is how many (rows, BLOCK_C) / (rows, BLOCK_D) fp32
# accumulators and (BLOCK_M, BLOCK_N) score tiles live per thread: 64 x 128 tiles
# with 4 warps spilled in every kernel, the backward kernels need 8 warps for 64
# query rows once BLOCK_C = 128.
# The last config of every list, 32 x 32 with 4 warps, is the only one kept for
# tiles past 128 (d or N up to TRITON_MAX_D / TRITON_MAX_N = 256): the others
# spilled or asked for more than the 227 KB of shared memory a block can have;
# it is also the one kept for fp32 inputs, whose tiles take twice the registers.
_SMALL = (32, 32, 4, 2)


def _tuned(shapes, interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [*shapes, _SMALL]]


def _prune(configs, named_args, **kwargs):
    small = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == _SMALL]
    if max(kwargs["BLOCK_D"], kwargs["BLOCK_C"]) > 128 or named_args["q_ptr"].dtype.itemsize >= 4:
        return small or configs[-1:]
    return [c for c in configs if c not in small] or configs


def _lse_configs(interpreting: bool):
    # Only a (BLOCK_M, BLOCK_D) q tile and the running max/sum live: < 130 registers.
    return _tuned([(128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 4, 3)], interpreting)


def _fwd_configs(interpreting: bool):
    # A key block of BLOCK_N rows accumulates (BLOCK_N, BLOCK_C); query tiles of BLOCK_M stream.
    return _tuned([(128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)], interpreting)


def _rows_configs(interpreting: bool):
    # dM (BLOCK_M, BLOCK_C), then dq (BLOCK_M, BLOCK_D) next to P, dP and dS tiles.
    return _tuned([(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)], interpreting)


def _cols_configs(interpreting: bool):
    # dk (BLOCK_N, BLOCK_D) with k and G of the key block held, query tiles streaming.
    return _tuned([(128, 64, 8, 2), (64, 32, 4, 3), (64, 32, 8, 2)], interpreting)


_KEY = ["L", "BLOCK_D", "BLOCK_C"]


# ----------------------------------------------------------------------------- kernels
@_launch.autotune(_lse_configs, key=_KEY, prune=_prune)
@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, lse_ptr, L, H, qk_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_lb, s_lh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=(offs_m[:, None] < L) & in_d[None, :],
                other=0.0)
    # Running max and sum of 2^(s·log2e), flash-attention's online softmax.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + offs_n
        k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :], mask=(cols[:, None] < L) & in_d[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(cols[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(lse_ptr + b.to(tl.int64) * s_lb + h * s_lh + offs_m, lse, mask=offs_m < L)


@_launch.autotune(_fwd_configs, key=_KEY, prune=_prune)
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, m_ptr, lse_ptr, out_ptr, L, H, N, qk_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_mb, s_mh, s_ml, s_lb, s_lh, s_ob, s_oh, s_ol,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    in_d = offs_d < D
    in_c = offs_c < N
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    m_base = m_ptr + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh
    lse_base = lse_ptr + b.to(tl.int64) * s_lb + h * s_lh
    k = tl.load(k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + cols[:, None] * s_kl + offs_d[None, :],
                mask=(cols[:, None] < L) & in_d[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        rows = m0 + offs_m
        in_rows = rows < L
        q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :], mask=in_rows[:, None] & in_d[None, :], other=0.0)
        mc = tl.load(m_base + rows[:, None] * s_ml + offs_c[None, :], mask=in_rows[:, None] & in_c[None, :],
                     other=0.0)
        # Padded rows: lse = +inf gives p = 0.
        lse = tl.load(lse_base + rows, mask=in_rows, other=float("inf")) * 1.4426950408889634
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        acc = tl.dot(tl.trans(p.to(mc.dtype)), mc, acc, input_precision=DOT_PRECISION)
    out = out_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + cols[:, None] * s_ol + offs_c[None, :]
    tl.store(out, acc, mask=(cols[:, None] < L) & in_c[None, :])


@_launch.autotune(_rows_configs, key=_KEY, prune=_prune)
@triton.jit
def _bwd_rows_kernel(
    q_ptr, k_ptr, m_ptr, g_ptr, lse_ptr, dm_ptr, delta_ptr, dq_ptr, L, H, N, qk_scale, scale, g_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_mb, s_mh, s_ml, s_gb, s_gh, s_gl, s_lb, s_lh,
    s_db, s_dh, s_dl, s_qgb, s_qgh, s_qgl,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WRITE_DM: tl.constexpr, WRITE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    in_d = offs_d < D
    in_c = offs_c < N
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    g_base = g_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + rows[:, None] * s_ql + offs_d[None, :],
                mask=in_rows[:, None] & in_d[None, :], other=0.0)
    mc = tl.load(m_ptr + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh + rows[:, None] * s_ml + offs_c[None, :],
                 mask=in_rows[:, None] & in_c[None, :], other=0.0)
    lse = tl.load(lse_ptr + b.to(tl.int64) * s_lb + h * s_lh + rows, mask=in_rows, other=float("inf"))
    lse = lse * 1.4426950408889634

    # Sweep 1: dM_I = g_scale Σ_J P_IJ G_J.
    d_m = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + offs_n
        in_cols = cols < L
        k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :], mask=in_cols[:, None] & in_d[None, :], other=0.0)
        g = tl.load(g_base + cols[:, None] * s_gl + offs_c[None, :], mask=in_cols[:, None] & in_c[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        p = tl.where(in_cols[None, :], p, 0.0)
        d_m = tl.dot(p.to(g.dtype), g, d_m, input_precision=DOT_PRECISION)
    d_m = d_m * g_scale
    delta = tl.sum(mc.to(tl.float32) * d_m, 1)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rows, delta, mask=in_rows)
    if WRITE_DM:
        dm = dm_ptr + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + rows[:, None] * s_dl + offs_c[None, :]
        tl.store(dm, d_m.to(dm_ptr.dtype.element_ty), mask=in_rows[:, None] & in_c[None, :])

    # Sweep 2: dq_I = scale Σ_J P_IJ ⊙ (g_scale m_I G_Jᵀ − δ_I) k_J.
    if WRITE_DQ:
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, L, BLOCK_N):
            cols = n0 + offs_n
            in_cols = cols < L
            k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :], mask=in_cols[:, None] & in_d[None, :],
                        other=0.0)
            g = tl.load(g_base + cols[:, None] * s_gl + offs_c[None, :], mask=in_cols[:, None] & in_c[None, :],
                        other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
            p = tl.where(in_cols[None, :], p, 0.0)
            dp = tl.dot(mc, tl.trans(g), input_precision=DOT_PRECISION) * g_scale
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        out = dq_ptr + b.to(tl.int64) * s_qgb + h.to(tl.int64) * s_qgh + rows[:, None] * s_qgl + offs_d[None, :]
        tl.store(out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=in_rows[:, None] & in_d[None, :])


@_launch.autotune(_cols_configs, key=_KEY, prune=_prune)
@triton.jit
def _bwd_cols_kernel(
    q_ptr, k_ptr, m_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, L, H, N, qk_scale, scale, g_scale,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_mb, s_mh, s_ml, s_gb, s_gh, s_gl, s_lb, s_lh,
    s_kgb, s_kgh, s_kgl,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < L
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    in_d = offs_d < D
    in_c = offs_c < N
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    m_base = m_ptr + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh
    lse_base = lse_ptr + b.to(tl.int64) * s_lb + h * s_lh
    k = tl.load(k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + cols[:, None] * s_kl + offs_d[None, :],
                mask=in_cols[:, None] & in_d[None, :], other=0.0)
    g = tl.load(g_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + cols[:, None] * s_gl + offs_c[None, :],
                mask=in_cols[:, None] & in_c[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, L, BLOCK_M):
        rows = m0 + offs_m
        in_rows = rows < L
        q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :], mask=in_rows[:, None] & in_d[None, :], other=0.0)
        mc = tl.load(m_base + rows[:, None] * s_ml + offs_c[None, :], mask=in_rows[:, None] & in_c[None, :],
                     other=0.0)
        lse = tl.load(lse_base + rows, mask=in_rows, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=in_rows, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(mc, tl.trans(g), input_precision=DOT_PRECISION) * g_scale
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    out = dk_ptr + b.to(tl.int64) * s_kgb + h.to(tl.int64) * s_kgh + cols[:, None] * s_kgl + offs_d[None, :]
    tl.store(out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=in_cols[:, None] & in_d[None, :])


# ----------------------------------------------------------------------------- host side
def _dot_precision(dtype) -> str:
    # As kernels/lora.py: as exact as torch's fp32 matmuls unless TF32 is allowed.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _blocks(d: int, n: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(n))


def _m_strides(m_ca: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides; a shared (B, L, N) map has head stride 0."""
    if m_ca.dim() == 3:
        return m_ca.stride(0), 0, m_ca.stride(1)
    return m_ca.stride(0), m_ca.stride(1), m_ca.stride(2)


def _lse(q, k, scale):
    b, h, length, d = q.shape
    lse = torch.empty((b, h, length), device=q.device, dtype=torch.float32)
    block_d, _ = _blocks(d, 1)

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), b * h)

    launch(
        _lse_kernel, grid, q, k, lse, length, h, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0), lse.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_C=16, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return lse


def forward(q, k, m_ca, scale, lse, head_reduce):
    b, h, length, d = q.shape
    n = m_ca.shape[-1]
    lse = _lse(q, k, scale) if lse is None else lse.float().contiguous()
    out_h = torch.empty((b, h, length, n), device=q.device, dtype=torch.float32)
    if n > 0:
        block_d, block_c = _blocks(d, n)
        s_mb, s_mh, s_ml = _m_strides(m_ca)

        def grid(meta):
            return (triton.cdiv(length, meta["BLOCK_N"]), b * h)

        launch(
            _fwd_kernel, grid, q, k, m_ca, lse, out_h, length, h, n, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), s_mb, s_mh, s_ml,
            lse.stride(0), lse.stride(1), out_h.stride(0), out_h.stride(1), out_h.stride(2),
            D=d, BLOCK_D=block_d, BLOCK_C=block_c, DOT_PRECISION=_dot_precision(q.dtype),
        )
    if head_reduce == "mean":
        out = out_h.mean(dim=1)
    elif head_reduce == "sum":
        out = out_h.sum(dim=1)
    else:
        out = out_h
    return out.to(q.dtype), lse


def backward(grad, q, k, m_ca, scale, lse, head_reduce, needs):
    b, h, length, d = q.shape
    n = m_ca.shape[-1]
    need_q, need_k, need_m = (bool(v) for v in needs)
    empty = q.new_empty(0)
    shared = m_ca.dim() == 3
    lse = lse.float().contiguous()
    grad = grad.to(q.dtype).contiguous()
    if head_reduce == "none":
        s_gb, s_gh, s_gl = grad.stride(0), grad.stride(1), grad.stride(2)
    else:  # every head reads the batch's output gradient
        s_gb, s_gh, s_gl = grad.stride(0), 0, grad.stride(1)
    g_scale = 1.0 / h if head_reduce == "mean" else 1.0
    if n == 0:
        return (torch.zeros_like(q) if need_q else empty, torch.zeros_like(k) if need_k else empty,
                torch.zeros_like(m_ca) if need_m else empty)

    block_d, block_c = _blocks(d, n)
    s_mb, s_mh, s_ml = _m_strides(m_ca)
    # A shared map's gradient sums the heads: per-head fp32 rows, reduced by torch.
    dm_h = torch.empty((b, h, length, n), device=q.device, dtype=torch.float32 if shared else m_ca.dtype)
    delta = torch.empty((b, h, length), device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q) if need_q else q
    common = dict(D=d, BLOCK_D=block_d, BLOCK_C=block_c, DOT_PRECISION=_dot_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), s_mb, s_mh, s_ml,
               s_gb, s_gh, s_gl, lse.stride(0), lse.stride(1))

    def rows_grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), b * h)

    def cols_grid(meta):
        return (triton.cdiv(length, meta["BLOCK_N"]), b * h)

    launch(
        _bwd_rows_kernel, rows_grid, q, k, m_ca, grad, lse, dm_h, delta, dq, length, h, n, scale * LOG2E, scale,
        g_scale,
        *strides, dm_h.stride(0), dm_h.stride(1), dm_h.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        WRITE_DM=need_m, WRITE_DQ=need_q, **common,
    )
    dk = empty
    if need_k:
        dk = torch.empty_like(k)
        launch(
            _bwd_cols_kernel, cols_grid, q, k, m_ca, grad, lse, delta, dk, length, h, n, scale * LOG2E, scale, g_scale,
            *strides, dk.stride(0), dk.stride(1), dk.stride(2), **common,
        )
    dm = empty
    if need_m:
        dm = dm_h.sum(dim=1).to(m_ca.dtype) if shared else dm_h
    return dq if need_q else empty, dk, dm


def compile_specs(batch: int, heads: int, length: int, head_dim: int, concepts: int, dtype, *,
                  shared_map: bool = True, head_reduce: str = "mean", given_lse: bool = False,
                  needs=(True, True, True), forward_pass: bool = True) -> list:
    """What one forward (+ backward when any of ``needs``) call would compile on a GPU.

    q, k (batch, heads, length, head_dim); m_ca (batch, length, concepts) when
    ``shared_map``, else per head; ``given_lse``: the caller passes SDPA's lse
    (no lse pass); ``needs``: gradients of (q, k, m_ca). Runs the launchers
    above on meta tensors (see fastdense.kernels._launch).
    """
    import torch

    meta = _launch.meta_tensor
    q = meta(batch, heads, length, head_dim, dtype=dtype)
    k = meta(batch, heads, length, head_dim, dtype=dtype)
    m_ca = meta(batch, length, concepts, dtype=dtype) if shared_map else meta(batch, heads, length, concepts,
                                                                              dtype=dtype)
    lse = meta(batch, heads, length, dtype=torch.float32) if given_lse else None
    scale = head_dim ** -0.5
    with _launch.recording() as launches:
        out, lse = forward(q, k, m_ca, scale, lse, head_reduce)
        if not forward_pass:
            launches.clear()
        if any(needs):
            backward(torch.empty_like(out), q, k, m_ca, scale, lse, head_reduce, needs)
    case = (f"attn B={batch} H={heads} L={length} d={head_dim} N={concepts} "
            f"{'shared' if shared_map else 'per-head'} {head_reduce}{' lse-given' if given_lse else ''} "
            f"needs={''.join(str(int(v)) for v in needs)}")
    return _launch.specs(launches, case)
