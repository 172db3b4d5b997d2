"""Triton kernels of ``mt_lora_linear`` (fused base GEMM + grouped LoRA expand).

Forward: the shrink ``h = [u A_0ᵀ | x_1 A_1ᵀ | ...]`` is a skinny GEMM left to
cuBLAS. ``_fwd_kernel`` then computes each (BLOCK_M, BLOCK_N) tile of the base
``x W0ᵀ + b`` once and, in its epilogue, adds every adapter's
``s_a h_a B_aᵀ`` tile and writes all G = 1 + T outputs, so the base GEMM is
not repeated per task and no (M, N) intermediate goes through memory.

Backward: ``_bwd_kernel`` runs one program per (adapter, row block). The
adapter-0 program sums the G gradient rows into ``grad_base`` and the others
read only their own ``grad[t]`` (launched next to it, so that second read of
grad[t] is meant to come from L2); each writes ``dh_a = s_a dU_a B_a``. The
GEMMs that reduce over M (dW, dA, dB) or produce K-wide outputs (dx) go to
cuBLAS.

Adapters have arbitrary ranks (MTLoRA: shared 64, tasks 4). ``tl.dot`` needs
inner dimensions of at least 16, so each adapter's columns of h / B are read
in BLOCK_R-wide chunks with masked loads: the padding lanes load zeros and
never touch memory, and no padded copies of h or B are made.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import launch


# ----------------------------------------------------------------------------- configs
# The interpreter runs every tile op in numpy, so one small config keeps tests
# fast; on a GPU the autotuner picks per (M_BUCKET, N, K, G). The raw token
# count M is not in the key: every new batch size or resolution would re-tune.
# M_BUCKET (an argument the kernels never read) is M rounded up to a power of
# two, capped where every config has enough row blocks to fill the GPU.
def _fwd_configs(interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    # A program holds the base tile and one adapter's fp32 LoRA tile at once:
    # at most 32 elements of a (BLOCK_M, BLOCK_N) tile per thread keeps sm_90
    # from spilling (64 per thread, e.g. 128 x 128 with 8 warps or 128 x 64
    # with 4, spilled or sat at 255 registers).
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 64, 64, 3, 8),
        (64, 128, 64, 3, 8),
        (128, 64, 32, 4, 8),
        (64, 64, 64, 3, 4),
        (64, 64, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w in shapes]


def _prune_fwd(configs, named_args, **kwargs):
    # fp32 tiles take twice the registers: 128-row tiles spilled (ieee dots) on sm_90.
    if named_args["x_ptr"].dtype.itemsize >= 4:
        return [c for c in configs if c.kwargs["BLOCK_M"] < 128] or configs[-1:]
    return configs


def _bwd_configs(interpreting: bool):
    if interpreting:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # dh (BLOCK_M, BLOCK_R) accumulates while (BLOCK_M, BLOCK_N) gradient tiles
    # stream by: 64 x 128 with 4 warps and 32 x 128 spilled on sm_90,
    # 128 x 128 with 8 warps sat at 247 registers.
    shapes = [  # BLOCK_M, BLOCK_N, stages, warps
        (64, 64, 3, 4),
        (128, 64, 3, 8),
        (64, 128, 3, 8),
        (32, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm, bn, s, w in shapes]


def _prune_bwd(configs, named_args, **kwargs):
    # At most 32 elements of the fp32 dh tile (BLOCK_M, BLOCK_R) per thread:
    # wide ranks (BLOCK_R = 128) spilled 144 B with 64 rows and 4 warps.
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * kwargs["BLOCK_R"] <= 32 * 32 * c.num_warps]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _expand_tile(h_ptr, b_ptr, seg_ptr, rank_ptr, scale_ptr, adapter, rows, cols, stride_hm, stride_hr,
                 stride_bn, stride_br, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """s_a · h[rows, seg_a] B[cols, seg_a]ᵀ as an fp32 (BLOCK_M, BLOCK_N) tile."""
    start = tl.load(seg_ptr + adapter)
    rank = tl.load(rank_ptr + adapter)
    scale = tl.load(scale_ptr + adapter)
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + (start + offs_r)[None, :] * stride_hr
    b_ptrs = b_ptr + cols[None, :] * stride_bn + (start + offs_r)[:, None] * stride_br
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        in_rank = offs_r < rank - r0
        h_blk = tl.load(h_ptrs, mask=in_rank[None, :], other=0.0)
        b_blk = tl.load(b_ptrs, mask=in_rank[:, None], other=0.0)
        lora = tl.dot(h_blk, b_blk, lora, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_R * stride_hr
        b_ptrs += BLOCK_R * stride_br
    return lora * scale


@_launch.autotune(_fwd_configs, key=["M_BUCKET", "N", "K", "G"], prune=_prune_fwd)
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, out_ptr, seg_ptr, rank_ptr, scale_ptr,
    M, N, K, G, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br,
    stride_og, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, SHARED_IN_TASKS: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the column blocks together
    # so the W0 tiles they share stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows/columns re-read valid ones (their results are never
    # stored), so only the K tail needs a mask in the hot loop. int64 because
    # M * K and N * K can pass 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        x_blk = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
        w_blk = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        acc = tl.dot(x_blk, w_blk, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    # The base tile is kept in the output dtype across the adapter loop: the
    # torch backend rounds x W0ᵀ + b (and the shared output) to it before adding
    # a task's LoRA too, and for bf16/fp16 it takes half the registers of an
    # fp32 tile next to each adapter's fp32 LoRA tile (the configs above keep
    # both within 32 elements per thread).
    base = acc.to(out_ptr.dtype.element_ty)

    # The output tile's addresses are rebuilt for every store from the tile's
    # corner (a 64-bit scalar) and 32-bit in-tile offsets: a (BLOCK_M, BLOCK_N)
    # tile of 64-bit pointers kept across the adapter loop would cost two
    # registers per element.
    tile_out = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_om + (pid_n * BLOCK_N).to(tl.int64) * stride_on
    in_tile_m = tl.arange(0, BLOCK_M)
    in_tile_n = tl.arange(0, BLOCK_N)
    lora = _expand_tile(h_ptr, b_ptr, seg_ptr, rank_ptr, scale_ptr, 0, rows, cols, stride_hm, stride_hr,
                        stride_bn, stride_br, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
    out0 = (base.to(tl.float32) + lora).to(out_ptr.dtype.element_ty)
    tl.store(tile_out + in_tile_m[:, None] * stride_om + in_tile_n[None, :] * stride_on, out0,
             mask=mask_m[:, None] & mask_n[None, :])
    if SHARED_IN_TASKS:
        base = out0
    for adapter in range(1, G):
        # Advancing the pointer (64-bit) rather than computing adapter *
        # stride_og keeps G * M * N > 2**31 from overflowing int32.
        tile_out += stride_og
        lora = _expand_tile(h_ptr, b_ptr, seg_ptr, rank_ptr, scale_ptr, adapter, rows, cols, stride_hm,
                            stride_hr, stride_bn, stride_br, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
        tl.store(tile_out + in_tile_m[:, None] * stride_om + in_tile_n[None, :] * stride_on,
                 (base.to(tl.float32) + lora).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_launch.autotune(_bwd_configs, key=["M_BUCKET", "N", "G", "BLOCK_R"], prune=_prune_bwd)
@triton.jit
def _bwd_kernel(
    grad_ptr, b_ptr, gbase_ptr, dh_ptr, seg_ptr, rank_ptr, scale_ptr,
    M, N, G, NUM_PROGRAMS_A, NUM_R_CHUNKS, M_BUCKET,
    stride_gg, stride_gm, stride_gn, stride_bn, stride_br, stride_pm, stride_pn, stride_dm, stride_dr,
    SHARED_IN_TASKS: tl.constexpr, WRITE_BASE: tl.constexpr, WRITE_DH: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The adapter index varies fastest so that the G programs of a row block
    # run side by side and the adapter-0 program's reads of grad[t] hit L2
    # behind (or ahead of) the task-t program's.
    pid = tl.program_id(0)
    adapter = pid % NUM_PROGRAMS_A
    rest = pid // NUM_PROGRAMS_A
    pid_r = rest % NUM_R_CHUNKS
    pid_m = rest // NUM_R_CHUNKS

    start = tl.load(seg_ptr + adapter)
    rank = tl.load(rank_ptr + adapter)
    scale = tl.load(scale_ptr + adapter)
    r0 = pid_r * BLOCK_R
    do_dh = (r0 < rank) & WRITE_DH

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = (offs_m % M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    in_rank = offs_r < rank - r0

    g_ptrs = grad_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + (start + r0 + offs_r)[None, :] * stride_br
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    # Adapter 0 sums all G gradients when it must write grad_base, or when the
    # shared LoRA feeds every output ('matrixv2') and so sees grad_base.
    first_chunk = pid_r == 0
    needs_sum = (adapter == 0) & ((first_chunk & WRITE_BASE) | (do_dh & SHARED_IN_TASKS))
    if needs_sum:
        # Only the first rank chunk writes grad_base; the others sum for dh alone.
        base_rows = tl.where(first_chunk, M, 0)
        p_mask_m = offs_m < base_rows
        p_ptrs = gbase_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
        for n0 in range(0, N, BLOCK_N):
            in_n = offs_n < N - n0
            g0 = tl.load(g_ptrs, mask=in_n[None, :], other=0.0)
            total = g0.to(tl.float32)
            gg_ptrs = g_ptrs
            for _ in range(1, G):
                gg_ptrs += stride_gg
                total += tl.load(gg_ptrs, mask=in_n[None, :], other=0.0).to(tl.float32)
            if WRITE_BASE:
                tl.store(p_ptrs, total.to(gbase_ptr.dtype.element_ty), mask=p_mask_m[:, None] & in_n[None, :])
            if WRITE_DH:
                if SHARED_IN_TASKS:
                    # Rounded to the grad dtype like the grad_base the torch
                    # backend multiplies with.
                    du = total.to(g0.dtype)
                else:
                    du = g0
                b_blk = tl.load(b_ptrs, mask=in_n[:, None] & in_rank[None, :], other=0.0)
                dh = tl.dot(du, b_blk, dh, input_precision=DOT_PRECISION)
            g_ptrs += BLOCK_N * stride_gn
            b_ptrs += BLOCK_N * stride_bn
            p_ptrs += BLOCK_N * stride_pn
    elif do_dh:
        g_ptrs += adapter.to(tl.int64) * stride_gg
        for n0 in range(0, N, BLOCK_N):
            in_n = offs_n < N - n0
            du = tl.load(g_ptrs, mask=in_n[None, :], other=0.0)
            b_blk = tl.load(b_ptrs, mask=in_n[:, None] & in_rank[None, :], other=0.0)
            dh = tl.dot(du, b_blk, dh, input_precision=DOT_PRECISION)
            g_ptrs += BLOCK_N * stride_gn
            b_ptrs += BLOCK_N * stride_bn
    if do_dh:
        dh_ptrs = dh_ptr + offs_m.to(tl.int64)[:, None] * stride_dm + (start + r0 + offs_r)[None, :] * stride_dr
        tl.store(dh_ptrs, (dh * scale).to(dh_ptr.dtype.element_ty), mask=mask_m[:, None] & in_rank[None, :])


# ----------------------------------------------------------------------------- host side
_META_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_META_CACHE_SIZE = 64


def _adapter_meta(ranks, scales, device):
    """(segment starts, ranks, scales) as device tensors, cached: rebuilding them
    costs a host-to-device copy per call and breaks CUDA-graph capture."""
    key = (tuple(ranks), tuple(float(s) for s in scales), device)
    meta = _META_CACHE.get(key)
    if meta is None:
        starts = [0]
        for r in ranks[:-1]:
            starts.append(starts[-1] + r)
        meta = (torch.tensor(starts, dtype=torch.int32, device=device),
                torch.tensor(list(ranks), dtype=torch.int32, device=device),
                torch.tensor(list(key[1]), dtype=torch.float32, device=device))
        _META_CACHE[key] = meta
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    else:
        _META_CACHE.move_to_end(key)
    return meta


def _segments(ranks):
    out, start = [], 0
    for r in ranks:
        out.append((start, start + r))
        start += r
    return out


def _dot_precision(dtype) -> str:
    # Follow torch's fp32 matmul setting so that the triton backend is as exact
    # as the cuBLAS GEMMs it is compared with (ieee unless TF32 is allowed).
    # For fp16/bf16 operands tl.dot ignores it.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _m_bucket(m: int) -> int:
    # Past 16384 rows every config launches more than 128 row blocks (x the
    # column blocks): the best one no longer depends on M.
    return _pow2_clamp(m, 16, 16384)


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(v)))


def _fwd_block_r(ranks) -> int:
    # The expand chunks are padded to BLOCK_R, so a rank-4 task costs a full
    # BLOCK_R-deep dot: size them by the smallest rank, larger ranks loop.
    smallest = min(ranks)
    block = 16
    while block * 2 <= min(smallest, 64):
        block *= 2
    return block


def _bwd_block_r(ranks) -> int:
    # Every rank chunk re-reads the adapter's gradient rows, so one chunk
    # should cover the largest rank; wider ranks get more chunk programs.
    return _pow2_clamp(max(ranks), 16, 128)


def _shrink(lora_a, ranks, u, x_tasks):
    if x_tasks is None:
        return torch.mm(u, lora_a.t())
    seg = _segments(ranks)
    parts = [torch.mm(u, lora_a[seg[0][0]:seg[0][1]].t())]
    for t in range(1, len(ranks)):
        a0, a1 = seg[t]
        parts.append(torch.mm(x_tasks[t - 1], lora_a[a0:a1].t()))
    return torch.cat(parts, dim=1)


def forward(x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks):
    ranks = [int(r) for r in ranks]
    g = len(ranks)
    m, k = x.shape
    n = weight.shape[0]
    u = x if x_lora is None else x_lora
    h = _shrink(lora_a, ranks, u, x_tasks)
    out = x.new_empty((g, m, n))
    if m == 0 or n == 0:
        return out, h

    seg, rank_t, scale_t = _adapter_meta(ranks, scales, x.device)
    bias_arg = bias if bias is not None else x  # never read without HAS_BIAS

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(
        _fwd_kernel, grid, x, weight, bias_arg, h, lora_b, out, seg, rank_t, scale_t,
        m, n, k, g, _m_bucket(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_BIAS=bias is not None, SHARED_IN_TASKS=bool(shared_in_tasks), BLOCK_R=_fwd_block_r(ranks),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return out, h


def _grad_base_and_dh(grad, lora_b, ranks, scales, shared_in_tasks, need_base, need_dh, dh_adapters):
    """grad_base = sum_g grad[g] (M, N) and dh (M, R), each None when not asked for.

    Only the columns of dh of the first ``dh_adapters`` adapters are written.
    """
    g, m, n = grad.shape
    r_total = lora_b.shape[1]
    # One adapter: grad_base is grad[0] itself, no sum to write.
    write_base = need_base and g > 1
    grad_base = grad[0] if (need_base and g == 1) else None
    if write_base:
        grad_base = grad.new_empty((m, n))
    dh = grad.new_empty((m, r_total)) if need_dh else None
    if not (write_base or need_dh):
        return grad_base, dh
    if m == 0 or n == 0:
        if write_base:
            grad_base.zero_()
        if need_dh:
            dh.zero_()
        return grad_base, dh

    seg, rank_t, scale_t = _adapter_meta(ranks, scales, grad.device)
    block_r = _bwd_block_r(ranks[:dh_adapters])
    n_adapters = dh_adapters if need_dh else 1
    n_chunks = triton.cdiv(max(ranks[:dh_adapters]), block_r) if need_dh else 1
    base_arg = grad_base if write_base else grad
    dh_arg = dh if need_dh else grad

    def grid(meta):
        return (n_adapters * n_chunks * triton.cdiv(m, meta["BLOCK_M"]),)

    launch(
        _bwd_kernel, grid, grad, lora_b, base_arg, dh_arg, seg, rank_t, scale_t,
        m, n, g, n_adapters, n_chunks, _m_bucket(m),
        grad.stride(0), grad.stride(1), grad.stride(2), lora_b.stride(0), lora_b.stride(1),
        base_arg.stride(0), base_arg.stride(1), dh_arg.stride(0), dh_arg.stride(1),
        SHARED_IN_TASKS=bool(shared_in_tasks), WRITE_BASE=write_base, WRITE_DH=need_dh,
        BLOCK_R=block_r, DOT_PRECISION=_dot_precision(grad.dtype),
    )
    return grad_base, dh


def backward(grad, x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks,
             x_lora, x_tasks, h, needs):
    ranks = [int(r) for r in ranks]
    needs = [bool(v) for v in needs]
    seg = _segments(ranks)
    empty = x.new_empty(0)
    u = x if x_lora is None else x_lora
    need_du = (needs[0] and x_lora is None) or needs[5]  # gradient of the LoRA input u
    need_dh = need_du or needs[3] or needs[6]
    need_base = needs[0] or needs[1] or needs[2] or (needs[4] and shared_in_tasks)
    # With per-task inputs the task columns of dh only feed dA and dx_tasks.
    only_shared_dh = x_tasks is not None and not (needs[3] or needs[6])
    grad_base, dh = _grad_base_and_dh(grad, lora_b, ranks, scales, shared_in_tasks, need_base, need_dh,
                                      1 if only_shared_dh else len(ranks))

    d_lora_b = empty
    if needs[4]:
        parts = []
        for a, (s0, s1) in enumerate(seg):
            du = grad_base if (a == 0 and shared_in_tasks) else grad[a]
            parts.append(torch.mm(du.t(), h[:, s0:s1]).mul_(scales[a]))
        d_lora_b = torch.cat(parts, dim=1)

    d_lora_a = empty
    d_x_tasks = empty
    if x_tasks is None:
        shared_rows = slice(0, lora_a.shape[0])
        if needs[3]:
            d_lora_a = torch.mm(dh.t(), u)
    else:
        shared_rows = slice(seg[0][0], seg[0][1])
        if needs[3]:
            d_lora_a = torch.cat([torch.mm(dh[:, shared_rows].t(), u)] + [
                torch.mm(dh[:, a0:a1].t(), x_tasks[t - 1]) for t, (a0, a1) in enumerate(seg) if t > 0])
        if needs[6]:
            d_x_tasks = x.new_empty(x_tasks.shape)
            for t, (a0, a1) in enumerate(seg):
                if t > 0:
                    torch.mm(dh[:, a0:a1], lora_a[a0:a1], out=d_x_tasks[t - 1])

    d_x = empty
    d_x_lora = empty
    if needs[0]:
        d_x = torch.mm(grad_base, weight)
        if x_lora is None:
            d_x.addmm_(dh[:, shared_rows], lora_a[shared_rows])
    if needs[5]:
        d_x_lora = torch.mm(dh[:, shared_rows], lora_a[shared_rows])
    d_weight = torch.mm(grad_base.t(), x) if needs[1] else empty
    d_bias = grad_base.sum(0) if (needs[2] and bias is not None) else empty
    return d_x, d_weight, d_bias, d_lora_a, d_lora_b, d_x_lora, d_x_tasks


def compile_specs(rows: int, in_features: int, out_features: int, ranks, dtype, *, bias: bool = True,
                  shared_in_tasks: bool = False, task_inputs: bool = False, needs=(True,) * 7,
                  forward_pass: bool = True) -> list:
    """What one forward (+ backward when any of ``needs``) call would compile on a GPU.

    ``ranks``: shared adapter first, then one per task; ``task_inputs``: each
    task adapter reads its own input (x_tasks); ``needs``: the backward's
    gradient flags (x, W, b, A, B, x_lora, x_tasks). Runs the launchers above
    on meta tensors (see fastdense.kernels._launch).
    """
    meta = _launch.meta_tensor
    ranks = [int(r) for r in ranks]
    g = len(ranks)
    x = meta(rows, in_features, dtype=dtype)
    weight = meta(out_features, in_features, dtype=dtype)
    b = meta(out_features, dtype=dtype) if bias else None
    lora_a = meta(sum(ranks), in_features, dtype=dtype)
    lora_b = meta(out_features, sum(ranks), dtype=dtype)
    x_tasks = meta(g - 1, rows, in_features, dtype=dtype) if task_inputs else None
    scales = [1.0] * g
    with _launch.recording() as launches:
        _, h = forward(x, weight, b, lora_a, lora_b, ranks, scales, shared_in_tasks, None, x_tasks)
        if not forward_pass:
            launches.clear()
        if any(needs):
            backward(meta(g, rows, out_features, dtype=dtype), x, weight, b, lora_a, lora_b, ranks, scales,
                     shared_in_tasks, None, x_tasks, h, needs)
    case = (f"lora M={rows} K={in_features} N={out_features} ranks={ranks} bias={int(bias)} "
            f"shared_in_tasks={int(shared_in_tasks)} task_inputs={int(task_inputs)} "
            f"needs={''.join(str(int(v)) for v in needs)}")
    return _launch.specs(launches, case)
