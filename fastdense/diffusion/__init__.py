"""Diffusion-model integrations: attention-map extraction from diffusers U-Nets."""
from fastdense.diffusion.attention_masks import (
    AttentionMaskRecorder,
    CrossAttentionTapProcessor,
    SelfAttentionTapProcessor,
    default_layer_indices,
    transformer_block_names,
)

__all__ = [
    "AttentionMaskRecorder",
    "CrossAttentionTapProcessor",
    "SelfAttentionTapProcessor",
    "default_layer_indices",
    "transformer_block_names",
]
