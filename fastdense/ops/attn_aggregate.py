"""Attention-mask aggregation M_attn = M_saᵀ M_ca: ``fastdense.ops.attn_mask_aggregate``.

Until the fused backends land this runs the reference (materialising M_sa).
"""
from __future__ import annotations

import torch

from fastdense.ops import reference


def attn_mask_aggregate(
    q: torch.Tensor,
    k: torch.Tensor,
    m_ca: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """out[b, j, n] = mean_h Σ_i softmax_j(q_h k_hᵀ·scale)[i, j] · m_ca[b, i, n].

    q, k (B, H, L, d); m_ca (B, L, N) or (B, H, L, N); lse (B, H, L), the
    log-sum-exp of the scaled scores' rows, when the caller has it. Returns
    (B, L, N), or (B, H, L, N) with head_reduce="none".
    """
    return reference.attn_mask_aggregate(q, k, m_ca, scale, head_reduce)
