"""The ``torch`` backend of ``q_sample_multi``: z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε in plain PyTorch.

It computes what the kernels do (coefficients gathered by index, math in
float32 -- float64 for float64 inputs --, one cast on store) with a few
vectorised calls, and is the fallback on every device. The tensor contract is
the one in ``fastdense/ops/q_sample_multi.py``; ``reference.q_sample_multi``
stays the ground truth.
"""
from __future__ import annotations

import torch


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(timesteps, alphas_cumprod, dtype):
    """(√ᾱ_t, √(1 − ᾱ_t)) per timestep in the op's math dtype; NaN for t outside [0, T)."""
    num_train = alphas_cumprod.shape[0]
    invalid = (timesteps < 0) | (timesteps >= num_train)
    abar = alphas_cumprod[timesteps.clamp(0, num_train - 1)].to(_opmath(dtype)).masked_fill_(invalid, float("nan"))
    return abar.sqrt(), (1 - abar).sqrt()


def _rows(t: torch.Tensor, sample_major: bool) -> torch.Tensor:
    """(k, B, N) -> the output's (k·B, N) row order."""
    k, batch, n = t.shape
    if sample_major:
        t = t.transpose(0, 1)
    return t.reshape(k * batch, n)


def _unrows(g: torch.Tensor, k: int, batch: int, sample_major: bool) -> torch.Tensor:
    """(k·B, N) in the output's row order -> (k, B, N)."""
    n = g.shape[1]
    if sample_major:
        return g.view(batch, k, n).transpose(0, 1)
    return g.view(k, batch, n)


def forward(z0, noise, timesteps, alphas_cumprod, sample_major):
    c_signal, c_noise = coefficients(timesteps, alphas_cumprod, z0.dtype)
    math = c_signal.dtype
    # Two passes over the (k, B, N) result: the noise term, then z0's added in place.
    z_t = (c_noise.view(-1, 1, 1) * noise.to(math)).addcmul_(c_signal.view(-1, 1, 1), z0.to(math))
    return _rows(z_t, sample_major).to(z0.dtype)


def backward(grad, timesteps, alphas_cumprod, batch, sample_major, shared_noise, needs):
    k = timesteps.shape[0]
    c_signal, c_noise = coefficients(timesteps, alphas_cumprod, grad.dtype)
    g = _unrows(grad, k, batch, sample_major).to(c_signal.dtype)  # (k, B, N)
    empty = grad.new_empty(0)
    d_z0 = (c_signal.view(-1, 1, 1) * g).sum(0).to(grad.dtype) if needs[0] else empty
    d_noise = empty
    if needs[1]:
        d_noise = c_noise.view(-1, 1, 1) * g
        d_noise = (d_noise.sum(0, keepdim=True) if shared_noise else d_noise).to(grad.dtype)
    return d_z0, d_noise
