"""Diffusion-model integrations for diffusers U-Nets: attention-map label maps
(concept-codebook paper) and features at several timesteps in one batched pass
(timestep-selection paper)."""
from fastdense.diffusion.attention_masks import (
    AttentionMaskRecorder,
    CrossAttentionTapProcessor,
    SelfAttentionTapProcessor,
    default_layer_indices,
    transformer_block_names,
)
from fastdense.diffusion.multi_timestep import (
    MultiTimestepFeatures,
    TimestepFeatureCache,
    batch_fingerprint,
    sd_alphas_cumprod,
)

__all__ = [
    "AttentionMaskRecorder",
    "CrossAttentionTapProcessor",
    "MultiTimestepFeatures",
    "SelfAttentionTapProcessor",
    "TimestepFeatureCache",
    "batch_fingerprint",
    "default_layer_indices",
    "sd_alphas_cumprod",
    "transformer_block_names",
]
