"""Attention-mask aggregation M_attn = M_saᵀ M_ca: ``torch.ops.fastdense.attn_mask_aggregate``.

Concept-codebook paper §3.3: from a U-Net layer's self-attention
M_sa,h = softmax_j(q_h k_hᵀ·scale) (L × L per head) and the cross-attention map
M_ca (L × N, normalised over the N concept tokens), out_h = M_sa,hᵀ M_ca, then
averaged over the heads. The backends never materialise M_sa (8 × 4096² values
per sample at 64×64 latents): like FlashAttention's dV = Pᵀ dO they rebuild
tiles of P from the row log-sum-exp, in the forward and in the backward.

Tensor contract shared by all backends (all contiguous):

    q, k     (B, H, L, d)       one dtype
    m_ca     (B, L, N)          shared by the heads, or (B, H, L, N); q's dtype
    scale    float
    lse      (B, H, L) | None   logsumexp_j(q_i·k_j·scale) in float32 (float64
                                for float64 inputs); None: computed
    head_reduce "mean" | "sum" | "none"
    forward  -> out (B, L, N) or (B, H, L, N) in q's dtype, lse (B, H, L) as
                used, saved for the backward
    backward(grad, q, k, m_ca, scale, lse, head_reduce, needs[q, k, m_ca])
             -> dq, dk, dm_ca (an empty tensor where not needed)

The backward is the full gradient through the softmax; a given lse is trusted
to be the rows' log-sum-exp and gets no gradient.
"""
from __future__ import annotations

import math

import torch

from fastdense.ops import _attn_mask_aggregate_torch
from fastdense.ops._define import Limit, autocast_inputs, cpp_backend, define_op, torch_backend, triton_backend
from fastdense.ops._validate import float_tensor, shape_str

HEAD_REDUCE = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- validation
def check_args(q, k, m_ca, scale, lse=None, head_reduce="mean") -> None:
    """Raise TypeError/ValueError naming the bad argument and the expected shape."""
    for name, t in (("q", q), ("k", k), ("m_ca", m_ca), ("lse", lse)):
        float_tensor(name, t, optional=name == "lse")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float (e.g. d ** -0.5), got {scale!r}")
    if head_reduce not in HEAD_REDUCE:
        raise ValueError(f"head_reduce must be 'mean', 'sum' or 'none', got {head_reduce!r}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, L, d), got {shape_str(q)}")
    b, h, length, d = q.shape
    if h < 1 or length < 1 or d < 1:
        raise ValueError(f"q must have H >= 1 heads, L >= 1 tokens and d >= 1 channels, got {shape_str(q)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (B={b}, H={h}, L={length}, d={d}), got {shape_str(k)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; q and k must share one dtype")
    if m_ca.dim() == 3:
        if m_ca.shape[:2] != (b, length):
            raise ValueError(f"m_ca must have shape (B={b}, L={length}, N) or (B={b}, H={h}, L={length}, N) "
                             f"to match q {shape_str(q)}, got {shape_str(m_ca)}")
    elif m_ca.dim() == 4:
        if m_ca.shape[:3] != (b, h, length):
            raise ValueError(f"m_ca must have shape (B={b}, L={length}, N) or (B={b}, H={h}, L={length}, N) "
                             f"to match q {shape_str(q)}, got {shape_str(m_ca)}")
    else:
        raise ValueError(f"m_ca must have shape (B={b}, L={length}, N) or (B={b}, H={h}, L={length}, N) "
                         f"to match q {shape_str(q)}, got {shape_str(m_ca)}")
    if lse is not None and tuple(lse.shape) != (b, h, length):
        raise ValueError(f"lse must have shape (B={b}, H={h}, L={length}) to match q {shape_str(q)}, the "
                         f"log-sum-exp of each scaled score row, got {shape_str(lse)}")
    for name, t in (("k", k), ("m_ca", m_ca), ("lse", lse)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must be on one device")


# ----------------------------------------------------------------------------- backends and operator
def _ext_forward(q, k, m_ca, scale, lse, head_reduce):
    return tuple(torch.ops.fastdense._attn_aggregate_fwd(q, k, m_ca, scale, lse, head_reduce))


def _ext_backward(grad, q, k, m_ca, scale, lse, head_reduce, needs):
    return tuple(torch.ops.fastdense._attn_aggregate_bwd(grad, q, k, m_ca, scale, lse, head_reduce,
                                                          [bool(v) for v in needs]))


def _out_shape(q, m_ca, head_reduce):
    b, h, length, _ = q.shape
    n = m_ca.shape[-1]
    return (b, h, length, n) if head_reduce == "none" else (b, length, n)


# Head dims and concept counts the Triton kernels hold in one tile (padded to
# powers of two): SD's d is 40/64/80/128, N at most a few hundred tokens.
TRITON_MAX_D = 256
TRITON_MAX_N = 256

# The backward gets the lse the forward used (computed, or the caller's), never
# the caller's argument itself: hence "lse_out" in place of "lse".
OP = define_op(
    "attn_mask_aggregate",
    schema="Tensor q, Tensor k, Tensor m_ca, float scale, Tensor? lse, str head_reduce",
    outputs="Tensor out, Tensor lse_out",
    lead="q",
    differentiable=("q", "k", "m_ca"),
    grad_outputs=("out",),
    saved=("q", "k", "m_ca", "scale", "lse_out", "head_reduce"),
    fake=lambda q, k, m_ca, scale, lse, head_reduce: (
        q.new_empty(_out_shape(q, m_ca, head_reduce)),
        q.new_empty(q.shape[:3], dtype=_attn_mask_aggregate_torch.acc_dtype(q.dtype))),
    backends=(
        torch_backend(_attn_mask_aggregate_torch.forward, _attn_mask_aggregate_torch.backward),
        cpp_backend(_ext_forward, _ext_backward, kernels=("_attn_aggregate_fwd", "_attn_aggregate_bwd"),
                    dtypes=(torch.float32, torch.float64)),
        triton_backend("attn_mask_aggregate", limits=(
            Limit("head dims d", lambda q, *rest: q.shape[-1], maximum=TRITON_MAX_D),
            Limit("N concept tokens", lambda q, k, m_ca, *rest: m_ca.shape[-1], maximum=TRITON_MAX_N),
        )),
    ),
)


# ----------------------------------------------------------------------------- public API
def attn_mask_aggregate(
    q: torch.Tensor,
    k: torch.Tensor,
    m_ca: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """out[b, j, n] = mean_h Σ_i softmax_j(q_h k_hᵀ·scale)[i, j] · m_ca[b, (h,) i, n].

    q, k (B, H, L, d); m_ca (B, L, N) shared by the heads, or (B, H, L, N),
    cast to q's dtype like the reference does; lse (B, H, L), the log-sum-exp
    of the scaled score rows, when the caller has it (SDPA's forward computes
    it), else computed in a first pass. Returns (B, L, N) for
    head_reduce="mean"/"sum", or (B, H, L, N) for "none", in q's dtype.
    Differentiable to q, k and m_ca (through the softmax; lse gets no
    gradient). No L × L tensor is materialised by any fused backend.
    """
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    q, k, m_ca = autocast_inputs(q, k, m_ca)
    check_args(q, k, m_ca, scale, lse, head_reduce)
    acc = _attn_mask_aggregate_torch.acc_dtype(q.dtype)
    if lse is not None:
        lse = lse.detach().to(acc)
    return OP(q, k, m_ca.to(q.dtype), float(scale), lse, head_reduce)[0]

