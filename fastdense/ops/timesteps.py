"""Multi-timestep noising: ``fastdense.ops.q_sample_multi``.

Until the fused backends land this runs the reference.
"""
from __future__ import annotations

import torch

from fastdense.ops import reference


def q_sample_multi(
    z0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    layout: str = "timestep",
) -> torch.Tensor:
    """k noised copies of z0 (B, C, h, w) as one (k·B, C, h, w) batch; see
    ``reference.q_sample_multi`` for the layouts."""
    return reference.q_sample_multi(z0, noise, timesteps, alphas_cumprod, layout)
