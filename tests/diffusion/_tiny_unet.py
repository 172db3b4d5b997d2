"""The tiny random diffusers U-Net the diffusion tests share (two levels, one
cross-attention level, 16 × 16 latents): fast on CPU, every code path of an SD U-Net."""
from __future__ import annotations

import diffusers
import torch

CROSS_DIM = 32
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)


def tiny_unet(seed: int = 0) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
