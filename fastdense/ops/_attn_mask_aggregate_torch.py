"""The ``torch`` backend of ``attn_mask_aggregate``: the fused algorithm in plain PyTorch.

The score matrix S = q kᵀ·scale is never built whole: the query rows are cut
into chunks of C rows, and a chunk's (C × L) scores hold complete softmax rows,
so one pass per chunk gives its log-sum-exp, its probabilities and its share
of the output (concept-codebook paper §3.3, M_attn = M_saᵀ M_ca):

    forward   lse_I = logsumexp_j S_Ij;  P_I = exp(S_I − lse_I);  out += P_Iᵀ m_I
              (a row whose lse is not finite is NaN, as softmax gives)
    backward  G = dOut (÷ H for "mean", broadcast over the heads)
              dM_I = P_I G          -> grad of m_ca (summed over heads if shared)
              δ_I  = ⟨m_I, dM_I⟩    (the softmax-backward row term, Σ_j P_ij dP_ij)
              dS_I = P_I ⊙ (m_I Gᵀ − δ_I)
              dq_I = scale dS_I k;   dk += scale dS_Iᵀ q_I

C is chosen so that a chunk holds about ``CHUNK_ELEMENTS`` scores: memory is
O(B·H·C·L + B·H·L·(d + N)), never L × L. Everything runs in float32 (float64
for float64 inputs), whatever the input dtype, because this is the fallback on
GPUs without Triton too and the softmax of low-precision scores is inaccurate.
"""
from __future__ import annotations

import torch

# Scores per chunk (all batches and heads together): 16 MiB of float32.
CHUNK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(b: int, h: int, length: int) -> int:
    return max(1, min(length, CHUNK_ELEMENTS // max(1, b * h * length)))


def _per_head(m_ca: torch.Tensor) -> torch.Tensor:
    """m_ca as (B, H or 1, L, N): a shared map broadcasts over the heads."""
    return m_ca.unsqueeze(1) if m_ca.dim() == 3 else m_ca


def probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S − lse) in place, and a NaN row where lse is not finite.

    softmax of a row holding +inf (or NaN) is NaN everywhere; exp(S − lse)
    alone would give NaN only at the +inf entries and 0 elsewhere.
    """
    p = s.sub_(lse[..., None]).exp_()
    return p.masked_fill_(~torch.isfinite(lse)[..., None], float("nan"))


def _reduce(out_h: torch.Tensor, head_reduce: str) -> torch.Tensor:
    if head_reduce == "mean":
        return out_h.mean(dim=1)
    if head_reduce == "sum":
        return out_h.sum(dim=1)
    return out_h


def forward(q, k, m_ca, scale, lse, head_reduce):
    b, h, length, _ = q.shape
    acc = acc_dtype(q.dtype)
    qa, ka, ma = q.to(acc), k.to(acc), _per_head(m_ca).to(acc)
    kt = ka.transpose(-1, -2)
    out_h = qa.new_zeros((b, h, length, ma.shape[-1]))
    lse_out = qa.new_empty((b, h, length)) if lse is None else lse.to(acc).clone()
    step = _chunk_rows(b, h, length)
    for i0 in range(0, length, step):
        rows = slice(i0, min(length, i0 + step))
        s = torch.matmul(qa[:, :, rows], kt).mul_(scale)  # (B, H, C, L): whole rows
        if lse is None:
            lse_out[:, :, rows] = torch.logsumexp(s, dim=-1)
        p = probabilities(s, lse_out[:, :, rows])
        out_h += torch.matmul(p.transpose(-1, -2), ma[:, :, rows])
    return _reduce(out_h, head_reduce).to(q.dtype), lse_out


def backward(grad, q, k, m_ca, scale, lse, head_reduce, needs):
    b, h, length, _ = q.shape
    need_q, need_k, need_m = (bool(v) for v in needs)
    acc = acc_dtype(q.dtype)
    qa, ka, ma = q.to(acc), k.to(acc), _per_head(m_ca).to(acc)
    lse = lse.to(acc)
    g = grad.to(acc)
    if head_reduce != "none":
        g = g.unsqueeze(1)  # every head receives the same output gradient ...
        if head_reduce == "mean":
            g = g / h  # ... divided by H for the mean
    gt = g.transpose(-1, -2)
    kt = ka.transpose(-1, -2)
    shared = m_ca.dim() == 3
    dq = qa.new_empty(q.shape) if need_q else None
    dk = qa.new_zeros(k.shape) if need_k else None
    dm = qa.new_empty(ma.shape) if need_m else None
    step = _chunk_rows(b, h, length)
    for i0 in range(0, length, step):
        rows = slice(i0, min(length, i0 + step))
        m_i = ma[:, :, rows]
        p = probabilities(torch.matmul(qa[:, :, rows], kt).mul_(scale), lse[:, :, rows])
        d_m = torch.matmul(p, g)  # (B, H, C, N)
        if need_m:
            dm[:, :, rows] = d_m.sum(dim=1, keepdim=True) if shared else d_m
        if need_q or need_k:
            delta = (m_i * d_m).sum(dim=-1, keepdim=True)
            # m_i Gᵀ has one head when both are shared: broadcast by the (B, H, C, 1) δ.
            ds = (torch.matmul(m_i, gt) - delta).mul_(p).mul_(scale)  # (B, H, C, L)
            if need_q:
                dq[:, :, rows] = torch.matmul(ds, ka)
            if need_k:
                dk += torch.matmul(ds.transpose(-1, -2), qa[:, :, rows])
    empty = q.new_empty(0)
    return (dq.to(q.dtype) if need_q else empty,
            dk.to(k.dtype) if need_k else empty,
            (dm.squeeze(1) if shared else dm).to(m_ca.dtype) if need_m else empty)
