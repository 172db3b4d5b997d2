"""Triton kernels of ``skill_gated_transform`` (TDSS TDSA, Eq. 3–7, all T tasks).

Forward, one program per tile of BLOCK_N rows: h = x W_d is accumulated over
BLOCK_C-wide chunks of x (x is read once), stored (it is what backward keeps),
and held in registers; then for each task the two M-wide gate logits, their
softmaxes, γ/β = softmax · S, h_s = γ ⊙ h + β and GELU(h_s) are formed in
registers and multiplied by W_u chunk by chunk into that task's output. No
(N, ·) intermediate other than h goes through memory.

Backward, one program per row tile, recomputing the gates from the saved h:
per task, dG = dY W_uᵀ and the tile's share of dW_u = GELU(h_s)ᵀ dY are taken
in the same sweep over dY's chunks (dY is read once); then dZ, d[γ|β], the
softmax backward, the shares of dS, dW_γ^t, dW_β^t and dh; finally dx = dh W_dᵀ
and the share of dW_d = xᵀ dh in one sweep over x. The parameter-gradient
shares are added with fp32 atomics into (R, C), (M, R), (T, R, M), (C, R)
buffers (their sum order, hence the last bits, varies from run to run).

``tl.dot`` needs dims of at least 16, so R and M are padded to powers of two
(BLOCK_R, BLOCK_M >= 16) by masked loads: padded skills get logit −inf (zero
probability), padded rank lanes read zero weights and stay zero.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import launch

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------- configs
# One small config in the interpreter (every tile op is numpy work there). On
# a GPU the autotuner picks the row tile BLOCK_N, the channel chunk BLOCK_C,
# warps and stages per (rows bucket, C, BLOCK_R, BLOCK_M), among the configs
# listed for the padded rank BLOCK_R below. A program keeps about eight
# (BLOCK_N, BLOCK_R) fp32 tiles (h, dh, γ, β, z, GELU(z), dG, ...) and four
# (BLOCK_R, BLOCK_M) ones live, so the row tile shrinks as the rank grows;
# every listed config compiles without register spills for sm_90 in bf16.
# The backward at BLOCK_R = 256 (Swin-T stage 4, R = 192) spilled a few dozen
# bytes per thread at every config tried, so the op layer keeps R <= 128 here
# (fastdense/ops/skill_gated_transform.py, TRITON_MAX_RANK); the 256 entries
# serve the forward of a direct caller and the interpreter tests.
_FWD_SHAPES = {  # BLOCK_R: [(BLOCK_N, BLOCK_C, warps, stages), ...]
    32: [(64, 64, 4, 2), (32, 64, 4, 2)],
    64: [(64, 64, 4, 2), (16, 64, 4, 2)],
    128: [(32, 64, 8, 2), (16, 64, 4, 2)],
    256: [(16, 32, 8, 1)],
}
_BWD_SHAPES = {
    32: [(16, 32, 4, 2), (16, 32, 8, 2)],
    64: [(16, 32, 8, 2), (32, 32, 8, 2)],
    128: [(16, 32, 8, 2)],
    256: [(16, 16, 8, 2)],
}


def _configs(table: dict, interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_C": 32}, num_warps=4, num_stages=1)]
    shapes = dict.fromkeys(shape for listed in table.values() for shape in listed)
    return [triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=s) for bn, bc, w, s in shapes]


def _fwd_configs(interpreting: bool):
    return _configs(_FWD_SHAPES, interpreting)


def _bwd_configs(interpreting: bool):
    return _configs(_BWD_SHAPES, interpreting)


def _pick(table: dict, configs, block_r: int):
    # Ranks past the table (BLOCK_R > 256) get the smallest tiles.
    wanted = set(table.get(block_r, table[max(table)]))
    kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages) in wanted]
    return kept or configs[-1:]


def _prune_fwd(configs, named_args, **kwargs):
    kept = _pick(_FWD_SHAPES, configs, kwargs["BLOCK_R"])
    # fp32 tiles take twice the registers: the smallest listed config only.
    return kept[-1:] if named_args["x_ptr"].dtype.itemsize >= 4 else kept


def _prune_bwd(configs, named_args, **kwargs):
    kept = _pick(_BWD_SHAPES, configs, kwargs["BLOCK_R"])
    return kept[-1:] if named_args["x_ptr"].dtype.itemsize >= 4 else kept


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _load_2d(ptr, offs_a, offs_b, stride_a, mask_a, mask_b):
    """ptr[a, b] (row-major, stride_a) as a block; zeros outside the masks."""
    return tl.load(ptr + offs_a[:, None] * stride_a + offs_b[None, :], mask=mask_a[:, None] & mask_b[None, :],
                   other=0.0)


@triton.jit
def _softmax_rows(logits, m_mask):
    logits = tl.where(m_mask[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _task_gates(h, w_gamma_ptr, w_beta_ptr, sk, t, R, M, offs_r, r_mask, offs_m, m_mask,
                DOT_PRECISION: tl.constexpr):
    """Task t's gate weights, softmax gates, γ and β for a tile (all fp32)."""
    wg = _load_2d(w_gamma_ptr + t * R * M, offs_r, offs_m, M, r_mask, m_mask).to(tl.float32)
    wb = _load_2d(w_beta_ptr + t * R * M, offs_r, offs_m, M, r_mask, m_mask).to(tl.float32)
    pg = _softmax_rows(tl.dot(h, wg, input_precision=DOT_PRECISION), m_mask)
    pb = _softmax_rows(tl.dot(h, wb, input_precision=DOT_PRECISION), m_mask)
    gamma = tl.dot(pg, sk, input_precision=DOT_PRECISION)
    beta = tl.dot(pb, sk, input_precision=DOT_PRECISION)
    return wg, wb, pg, pb, gamma, beta


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


# ----------------------------------------------------------------------------- kernels
@_launch.autotune(_fwd_configs, key=["N_BUCKET", "C", "BLOCK_R", "BLOCK_M"], prune=_prune_fwd)
@triton.jit
def _fwd_kernel(x_ptr, w_down_ptr, w_up_ptr, skills_ptr, w_gamma_ptr, w_beta_ptr, out_ptr, h_ptr,
                N, C, R, M, T, N_BUCKET,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_c = tl.arange(0, BLOCK_C)

    # (3) h = x W_d, x read once in BLOCK_C-wide chunks.
    h = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        c_mask = cols < C
        xb = _load_2d(x_ptr, rows, cols, C, row_mask, c_mask)
        wd = _load_2d(w_down_ptr, cols, offs_r, R, c_mask, r_mask)
        h += tl.dot(xb, wd, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rows[:, None] * R + offs_r[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & r_mask[None, :])

    sk = _load_2d(skills_ptr, offs_m, offs_r, R, m_mask, r_mask).to(tl.float32)
    for t in range(T):
        # (4)-(6) gates, γ, β and h_s of task t; (7) GELU(h_s) W_u.
        _, _, _, _, gamma, beta = _task_gates(h, w_gamma_ptr, w_beta_ptr, sk, t, R, M, offs_r, r_mask, offs_m,
                                              m_mask, DOT_PRECISION)
        g = _gelu(gamma * h + beta)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            c_mask = cols < C
            wu = _load_2d(w_up_ptr, offs_r, cols, C, r_mask, c_mask)
            y = tl.dot(g.to(wu.dtype), wu, input_precision=DOT_PRECISION)
            tl.store(out_ptr + t * N * C + rows[:, None] * C + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & c_mask[None, :])


# The parameter gradients are atomically added shares: the autotuner zeroes
# them before each trial run.
@_launch.autotune(_bwd_configs, key=["N_BUCKET", "C", "BLOCK_R", "BLOCK_M"], prune=_prune_bwd,
                  reset_to_zero=["dwd_ptr", "dwu_ptr", "dsk_ptr", "dwg_ptr", "dwb_ptr"])
@triton.jit
def _bwd_kernel(grad_ptr, x_ptr, w_down_ptr, w_up_ptr, skills_ptr, w_gamma_ptr, w_beta_ptr, h_ptr,
                dx_ptr, dwd_ptr, dwu_ptr, dsk_ptr, dwg_ptr, dwb_ptr,
                N, C, R, M, T, N_BUCKET,
                NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DSK: tl.constexpr,
                NEED_DGATES: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_c = tl.arange(0, BLOCK_C)
    rm_mask = r_mask[:, None] & m_mask[None, :]

    # Padded rows load h = 0 and dY = 0, so they add nothing to any gradient.
    h = _load_2d(h_ptr, rows, offs_r, R, row_mask, r_mask).to(tl.float32)
    sk = _load_2d(skills_ptr, offs_m, offs_r, R, m_mask, r_mask).to(tl.float32)
    dh = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dsk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(T):
        wg, wb, pg, pb, gamma, beta = _task_gates(h, w_gamma_ptr, w_beta_ptr, sk, t, R, M, offs_r, r_mask,
                                                  offs_m, m_mask, DOT_PRECISION)
        z = gamma * h + beta
        g = _gelu(z)
        # One sweep over dY_t: dG = dY W_uᵀ and this tile's GELU(h_s)ᵀ dY.
        dg = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            c_mask = cols < C
            dy = _load_2d(grad_ptr + t * N * C, rows, cols, C, row_mask, c_mask)
            wu = _load_2d(w_up_ptr, offs_r, cols, C, r_mask, c_mask)
            dg += tl.dot(dy, tl.trans(wu), input_precision=DOT_PRECISION)
            if NEED_DWU:
                part = tl.dot(tl.trans(g.to(dy.dtype)), dy, input_precision=DOT_PRECISION)
                tl.atomic_add(dwu_ptr + offs_r[:, None] * C + cols[None, :], part,
                              mask=r_mask[:, None] & c_mask[None, :])
        dz = dg * _gelu_grad(z)
        dgamma = dz * h
        dh += dz * gamma
        if NEED_DSK:
            dsk += tl.dot(tl.trans(pg), dgamma, input_precision=DOT_PRECISION)
            dsk += tl.dot(tl.trans(pb), dz, input_precision=DOT_PRECISION)
        # Softmax backward: dL = P ⊙ (dP − ⟨P, dP⟩), dP = d[γ|β] Sᵀ.
        dpg = tl.dot(dgamma, tl.trans(sk), input_precision=DOT_PRECISION)
        dpb = tl.dot(dz, tl.trans(sk), input_precision=DOT_PRECISION)
        dlg = pg * (dpg - tl.sum(pg * dpg, axis=1)[:, None])
        dlb = pb * (dpb - tl.sum(pb * dpb, axis=1)[:, None])
        if NEED_DGATES:
            gate_offs = t * R * M + offs_r[:, None] * M + offs_m[None, :]
            tl.atomic_add(dwg_ptr + gate_offs, tl.dot(tl.trans(h), dlg, input_precision=DOT_PRECISION),
                          mask=rm_mask)
            tl.atomic_add(dwb_ptr + gate_offs, tl.dot(tl.trans(h), dlb, input_precision=DOT_PRECISION),
                          mask=rm_mask)
        dh += tl.dot(dlg, tl.trans(wg), input_precision=DOT_PRECISION)
        dh += tl.dot(dlb, tl.trans(wb), input_precision=DOT_PRECISION)
    if NEED_DSK:
        tl.atomic_add(dsk_ptr + offs_m[:, None] * R + offs_r[None, :], dsk, mask=m_mask[:, None] & r_mask[None, :])

    if NEED_DX or NEED_DWD:
        # One sweep over x / dx: dx = dh W_dᵀ and this tile's xᵀ dh.
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            c_mask = cols < C
            wd = _load_2d(w_down_ptr, cols, offs_r, R, c_mask, r_mask)
            dh_low = dh.to(wd.dtype)
            if NEED_DX:
                dxb = tl.dot(dh_low, tl.trans(wd), input_precision=DOT_PRECISION)
                tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dxb.to(dx_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & c_mask[None, :])
            if NEED_DWD:
                xb = _load_2d(x_ptr, rows, cols, C, row_mask, c_mask)
                tl.atomic_add(dwd_ptr + cols[:, None] * R + offs_r[None, :],
                              tl.dot(tl.trans(xb), dh_low, input_precision=DOT_PRECISION),
                              mask=c_mask[:, None] & r_mask[None, :])


# ----------------------------------------------------------------------------- host side
def _dot_precision(dtype) -> str:
    # As kernels/lora.py: as exact as the cuBLAS GEMMs the backend is compared
    # with (ieee for fp32 unless TF32 is allowed); ignored for bf16/fp16 operands.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _blocks(r: int, m: int) -> dict:
    """The padded rank and skill tiles (the row and channel tiles are autotuned)."""
    return dict(BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_M=max(16, triton.next_power_of_2(m)))


def _rows_bucket(n: int) -> int:
    # Rows decide how many programs fill the GPU; past 32768 rows every config has enough.
    return max(16, min(32768, triton.next_power_of_2(n)))


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)


def forward(x, w_down, w_up, skills, w_gamma, w_beta):
    n, c = x.shape
    t, r, m = w_gamma.shape
    out = torch.empty((t, n, c), device=x.device, dtype=x.dtype)
    h = torch.empty((n, r), device=x.device, dtype=x.dtype)
    if n == 0:
        return out, h
    launch(_fwd_kernel, _grid(n), x, w_down, w_up, skills, w_gamma, w_beta, out, h, n, c, r, m, t,
           _rows_bucket(n), DOT_PRECISION=_dot_precision(x.dtype), **_blocks(r, m))
    return out, h


def backward(grad, x, w_down, w_up, skills, w_gamma, w_beta, h, needs):
    n, c = x.shape
    t, r, m = w_gamma.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    empty = x.new_empty(0)
    need_gates = needs[4] or needs[5]
    dx = torch.empty_like(x) if needs[0] else empty
    # fp32 accumulators of the atomically added per-tile shares.
    dwd = torch.zeros((c, r), **f32) if needs[1] else empty
    dwu = torch.zeros((r, c), **f32) if needs[2] else empty
    dsk = torch.zeros((m, r), **f32) if needs[3] else empty
    dwg = torch.zeros((t, r, m), **f32) if need_gates else empty
    dwb = torch.zeros((t, r, m), **f32) if need_gates else empty
    if n > 0 and any(needs):
        launch(_bwd_kernel, _grid(n), grad, x, w_down, w_up, skills, w_gamma, w_beta, h, dx, dwd, dwu, dsk, dwg,
               dwb, n, c, r, m, t, _rows_bucket(n),
               NEED_DX=bool(needs[0]), NEED_DWD=bool(needs[1]), NEED_DWU=bool(needs[2]),
               NEED_DSK=bool(needs[3]), NEED_DGATES=bool(need_gates),
               DOT_PRECISION=_dot_precision(x.dtype), **_blocks(r, m))

    def cast(g, need):
        return g.to(x.dtype) if need else empty

    return (dx, cast(dwd, needs[1]), cast(dwu, needs[2]), cast(dsk, needs[3]), cast(dwg, needs[4]),
            cast(dwb, needs[5]))


def compile_specs(rows: int, channels: int, rank: int, skills: int, tasks: int, dtype, *,
                  needs=(True,) * 6, forward_pass: bool = True) -> list:
    """What one forward (+ backward when any of ``needs``) call would compile on a GPU.

    x (rows, channels), rank R, M = ``skills``, T = ``tasks``; ``needs``:
    gradients of (x, W_d, W_u, S, W_γ, W_β). Runs the launchers above on meta
    tensors (see fastdense.kernels._launch).
    """
    meta = _launch.meta_tensor
    x = meta(rows, channels, dtype=dtype)
    params = (meta(channels, rank, dtype=dtype), meta(rank, channels, dtype=dtype), meta(skills, rank, dtype=dtype),
              meta(tasks, rank, skills, dtype=dtype), meta(tasks, rank, skills, dtype=dtype))
    with _launch.recording() as launches:
        _, h = forward(x, *params)
        if not forward_pass:
            launches.clear()
        if any(needs):
            backward(meta(tasks, rows, channels, dtype=dtype), x, *params, h, needs)
    case = (f"skill N={rows} C={channels} R={rank} M={skills} T={tasks} "
            f"needs={''.join(str(int(v)) for v in needs)}")
    return _launch.specs(launches, case)
