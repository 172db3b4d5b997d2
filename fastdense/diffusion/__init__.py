"""Diffusion-model feature extraction: U-Net features at several timesteps in one pass."""
from fastdense.diffusion.multi_timestep import (
    MultiTimestepFeatures,
    TimestepFeatureCache,
    batch_fingerprint,
    sd_alphas_cumprod,
)

__all__ = [
    "MultiTimestepFeatures",
    "TimestepFeatureCache",
    "batch_fingerprint",
    "sd_alphas_cumprod",
]
