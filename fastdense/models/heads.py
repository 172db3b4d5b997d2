"""Per-task dense decoders of the Swin-T multi-task PEFT models (MTLoRA, TADFormer, TDSS).

MTLoRA's released decoder (``swin_mtl.Downsampler`` + ``seg_hrnet.HighResolutionHead``,
reused unchanged by TADFormer), per task:

1. :class:`Downsampler`: a bias-free 1x1 convolution per stage feature, bringing
   the four stages to 18 / 36 / 72 / 144 channels (``DECODER_CHANNELS``).
2. :class:`HRNetHead`: the coarser maps are resized bilinearly to the finest
   one, the 270 channels concatenated, then 1x1 conv (270 -> 4 x 270, with
   bias) -> BatchNorm -> ReLU -> 1x1 conv (-> the task's channels, with bias).
3. :class:`TaskDecoder`: the two, and a bilinear resize of the prediction to
   the output size (the input image's).

All resizes are ``align_corners=False``, the default the released code relies
on. For four PASCAL-Context tasks at Swin-T's stage widths this is 1,946,624
parameters (docs/papers.md, 'Trainable parameter counts').
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: MTLoRA's ``MODEL.DECODER_CHANNELS``: the width of each stage after the Downsampler.
DECODER_CHANNELS = (18, 36, 72, 144)
#: The hidden width of the HRNet head's first convolution, in multiples of its input width.
HRNET_HIDDEN_RATIO = 4


class Downsampler(nn.Module):
    """Bias-free 1x1 convolutions ``proj[i]``: stage i's C_i channels -> ``channels[i]``."""

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(channels):
            raise ValueError(f"{len(in_channels)} stage widths {tuple(in_channels)} but {len(channels)} decoder "
                             f"channels {tuple(channels)}")
        self.proj = nn.ModuleList(nn.Conv2d(c_in, c, 1, bias=False) for c_in, c in zip(in_channels, channels))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} stage features, got {len(feats)}")
        return [proj(f) for proj, f in zip(self.proj, feats)]


class HRNetHead(nn.Module):
    """HRNet-style fusion head (``last_layer``: conv-BN-ReLU-conv on the concatenation
    of all levels resized to the first level's size)."""

    def __init__(self, in_channels: Sequence[int], num_outputs: int, hidden_ratio: int = HRNET_HIDDEN_RATIO) -> None:
        super().__init__()
        width = sum(in_channels)
        hidden = width * hidden_ratio
        self.last_layer = nn.Sequential(
            nn.Conv2d(width, hidden, 1),
            nn.BatchNorm2d(hidden, momentum=0.1),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, num_outputs, 1),
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        levels = [feats[0]] + [F.interpolate(f, size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return self.last_layer(torch.cat(levels, dim=1))


class TaskDecoder(nn.Module):
    """One task's decoder: :class:`Downsampler` -> :class:`HRNetHead` -> bilinear resize.

    ``forward(feats, out_size)``: ``feats`` are the NCHW stage features (finest first),
    ``out_size`` the (H, W) of the prediction.
    """

    def __init__(self, in_channels: Sequence[int], num_outputs: int,
                 channels: Sequence[int] = DECODER_CHANNELS, hidden_ratio: int = HRNET_HIDDEN_RATIO) -> None:
        super().__init__()
        channels = tuple(channels)[:len(in_channels)]
        self.downsampler = Downsampler(in_channels, channels)
        self.head = HRNetHead(channels, num_outputs, hidden_ratio)

    def forward(self, feats: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        out = self.head(self.downsampler(feats))
        return F.interpolate(out, tuple(out_size), mode="bilinear", align_corners=False)


__all__ = ["DECODER_CHANNELS", "Downsampler", "HRNET_HIDDEN_RATIO", "HRNetHead", "TaskDecoder"]
