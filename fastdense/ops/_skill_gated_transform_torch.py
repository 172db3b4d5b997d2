"""The ``torch`` backend of the skill-gated transform: explicit forward and backward.

It spells out the fused algorithm the cpp and Triton kernels implement, with
batched PyTorch calls and no Python loop over tasks:

* the 2T gate projections of all tasks are ONE GEMM ``h @ W_g`` with the packed
  gate weights ``W_g`` (R, T·2·M) (see :func:`pack_gates`);
* the two softmaxes of every task are one softmax over the last dim of the
  (rows, T, 2, M) logits, and γ, β of every task one GEMM with S;
* the T outputs are one batched GEMM (T, rows, R) @ (R, C).

Backward recomputes everything from h (the only activation saved besides x):

    dG_t  = dY_t W_uᵀ                    dW_u = Σ_t G_tᵀ dY_t
    dZ_t  = dG_t ⊙ GELU'(Z_t)            dh  += Σ_t dZ_t ⊙ γ_t
    dγ_t  = dZ_t ⊙ h,  dβ_t = dZ_t       dS   = Σ_t γ̂_tᵀ dγ_t + β̂_tᵀ dβ_t
    dγ̂_t  = dγ_t Sᵀ,   dβ̂_t = dβ_t Sᵀ
    dL    = P ⊙ (dP − ⟨P, dP⟩)           (softmax backward, per (t, γ/β) row)
    dW_g  = hᵀ dL                        dh  += dL W_gᵀ
    dW_d  = xᵀ dh                        dx   = dh W_dᵀ

``reference.skill_gated_transform`` stays the ground truth; this file is
checked against it like every other backend.
"""
from __future__ import annotations

import functools
import math

import torch

# Order of the gradients returned by every backend's backward.
GRAD_NAMES = ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def pack_gates(w_gamma: torch.Tensor, w_beta: torch.Tensor) -> torch.Tensor:
    """(T, R, M) × 2 -> (R, T·2·M): column block (t, 0) is W_γ^t, (t, 1) is W_β^t."""
    t, r, m = w_gamma.shape
    return torch.stack((w_gamma, w_beta), dim=1).permute(2, 0, 1, 3).reshape(r, t * 2 * m)


def unpack_gates(w_packed: torch.Tensor, tasks: int, skills: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gates` (for the gradient of the packed weights)."""
    r = w_packed.shape[0]
    w = w_packed.reshape(r, tasks, 2, skills).permute(1, 2, 0, 3)
    return w[:, 0].contiguous(), w[:, 1].contiguous()


def gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT2))


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d GELU_erf / dz = Φ(z) + z φ(z)."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def gates(h: torch.Tensor, w_packed: torch.Tensor, skills: torch.Tensor, tasks: int):
    """Softmax gates P (rows, T, 2, M) and γ/β = P S (rows, T, 2, R) of every task."""
    m = skills.shape[0]
    logits = (h @ w_packed).view(h.shape[0], tasks, 2, m)
    p = torch.softmax(logits, dim=-1)
    return p, p @ skills


def transformed(h: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
    """Z = γ ⊙ h + β, laid out (T, rows, R) for the batched up-projection."""
    return (gb[:, :, 0] * h[:, None] + gb[:, :, 1]).transpose(0, 1)


def _opmath(fn):
    """Run ``fn`` in fp32 for fp16/bf16 inputs and cast its tensor results back, as the cpp
    kernels compute in at::opmath_type: in half precision the M-wide softmax of the gates and
    the sums over tasks lose more than the op's tolerance (the fuzz tests found fp16 gradients
    of w_gamma off by more than it)."""
    @functools.wraps(fn)
    def run(*args):
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor)
                    and a.dtype in (torch.float16, torch.bfloat16)), None)
        if low is None:
            return fn(*args)
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return tuple(r.to(low) for r in fn(*up))
    return run


@_opmath
def forward(x, w_down, w_up, skills, w_gamma, w_beta):
    """x (N, C) -> out (T, N, C) and h (N, R), saved for backward."""
    tasks = w_gamma.shape[0]
    h = x @ w_down
    _, gb = gates(h, pack_gates(w_gamma, w_beta), skills, tasks)
    g = gelu(transformed(h, gb))
    return torch.matmul(g, w_up), h


@_opmath
def backward(grad, x, w_down, w_up, skills, w_gamma, w_beta, h, needs):
    tasks, _, m = w_gamma.shape
    n = x.shape[0]
    w_packed = pack_gates(w_gamma, w_beta)
    p, gb = gates(h, w_packed, skills, tasks)
    z = transformed(h, gb)                                        # (T, N, R)
    empty = x.new_empty(0)

    d_w_up = empty
    if needs[2]:
        d_w_up = gelu(z).reshape(tasks * n, z.shape[-1]).t() @ grad.reshape(tasks * n, grad.shape[-1])
    dz = torch.matmul(grad, w_up.t()) * gelu_grad(z)              # (T, N, R)
    dz = dz.transpose(0, 1)                                       # (N, T, R)
    d_gb = torch.stack((dz * h[:, None], dz), dim=2)              # (N, T, 2, R)
    dh = (dz * gb[:, :, 0]).sum(1)

    d_skills = empty
    if needs[3]:
        d_skills = p.reshape(-1, m).t() @ d_gb.reshape(-1, d_gb.shape[-1])
    dp = d_gb @ skills.t()                                        # (N, T, 2, M)
    d_logits = (p * (dp - (p * dp).sum(-1, keepdim=True))).reshape(n, tasks * 2 * m)
    d_w_gamma = d_w_beta = empty
    if needs[4] or needs[5]:
        d_w_gamma, d_w_beta = unpack_gates(h.t() @ d_logits, tasks, m)
        d_w_gamma = d_w_gamma if needs[4] else empty
        d_w_beta = d_w_beta if needs[5] else empty
    dh = dh + d_logits @ w_packed.t()

    d_x = dh @ w_down.t() if needs[0] else empty
    d_w_down = x.t() @ dh if needs[1] else empty
    return d_x, d_w_down, d_w_up, d_skills, d_w_gamma, d_w_beta
