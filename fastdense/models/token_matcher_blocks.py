"""Building blocks of the token matcher (fastdense.models.tts_token_matcher): the
label encoder g (a small ViT over one label channel), VTM's multi-head matching
attention σ of Eq. 1 with LoRA on query and value, the DPT-style label decoder
h and the projections of U-Net decoder features to the token grid of a level.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.nn import LoRALinear

__all__ = ["LabelEncoder", "MatchingAttention", "DPTDecoder", "LevelProjection", "LEVELS"]

LEVELS = 4  # VTM's n_levels: the matcher works on four token grids


class _ViTBlock(nn.Module):
    """Pre-norm transformer block (attention through SDPA, GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LabelEncoder(nn.Module):
    """g: a ViT over ONE label channel, trained from scratch (VTM's DPT label
    encoder). Patch embedding to the image token grid, learned position
    embedding (bilinearly resized for other grids), ``depth`` blocks; the
    outputs of blocks ``depth·l/4 − 1`` (l = 1…4) are the four levels, as in
    DPT's hooks. No class token: VTM drops it from every level anyway."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, patch: int, grid: int) -> None:
        super().__init__()
        if depth < LEVELS:
            raise ValueError(f"label_depth must be at least {LEVELS} (one block per level), got {depth}")
        if dim % heads:
            raise ValueError(f"label_heads must divide dim, got dim={dim}, heads={heads}")
        self.patch = patch
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.taps = tuple(depth * (level + 1) // LEVELS - 1 for level in range(LEVELS))

    def forward(self, label: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) -> four (B, N, dim) token sets on the (H/patch, W/patch) grid."""
        x = self.patch_embed(label)
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


class MatchingAttention(nn.Module):
    """σ of Eq. 1, one level: VTM's cross attention (``model/attention.py``'s
    CrossAttention) with LoRA on query and value (§3.4).

    Q and K share one pre-LayerNorm; V (label tokens) is not normalised;
    scores are scaled by 1/√dim (VTM's temperature is √ of the full width,
    not of a head's); the heads' output is LayerNorm-ed and passed through
    ``O + GELU(W_O O)``. No biases on the projections (VTM's ``bias=False``).
    """

    def __init__(self, dim: int, heads: int, lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.2, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        self.heads, self.scale, self.attn_dropout = heads, 1.0 / math.sqrt(dim), float(attn_dropout)
        self.norm_qk = nn.LayerNorm(dim)
        self.q_proj = LoRALinear(dim, dim, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = LoRALinear(dim, dim, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (E, Nq, d), k and v (E, Nk, d) -> (E, Nq, d)."""
        e, nq, d = q.shape
        h = self.heads

        def split(x):
            return x.view(e, x.shape[1], h, d // h).transpose(1, 2)

        qh = split(self.q_proj(self.norm_qk(q)))
        kh = split(self.k_proj(self.norm_qk(k)))
        vh = split(self.v_proj(v))
        p = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=p, scale=self.scale)
        o = self.norm_out(o.transpose(1, 2).reshape(e, nq, d))
        return o + F.gelu(self.o_proj(o))


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """DPT's feature fusion: add the refined skip, refine, upsample, 1×1 conv.
    The upsampling goes to the next skip's size (×2 on even grids), so odd
    token grids (7×7 at 112 px) work too."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.res1 = _ResidualConvUnit(features)
        self.res2 = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        if skip is not None:
            x = x + self.res1(skip)
        x = F.interpolate(self.res2(x), size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(nn.Module):
    """h ≈ g⁻¹: DPT's reassemble and fusion decoder (as VTM uses it), from four
    token maps on one grid g to a one-channel logit map.

    Reassemble: level 1 → 1×1 conv to ``widths[0]`` then ×4 transposed conv;
    level 2 → ×2; level 3 → as is; level 4 → stride-2 conv; each then a 3×3
    conv to ``features``. Fusion from the coarsest level up, ×2 per step (8·g),
    then the head: 3×3 conv, upsampling to the label size (DPT's ×2 at 16
    pixels per token, VTM's 14 → 224), 3×3 conv to 32, ReLU, 1×1 conv.
    """

    def __init__(self, dim: int, widths: Sequence[int], features: int, head_features: int = 32) -> None:
        super().__init__()
        w = list(widths)
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, w[0], 1), nn.ConvTranspose2d(w[0], w[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim, w[1], 1), nn.ConvTranspose2d(w[1], w[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(dim, w[2], 1)),
            nn.Sequential(nn.Conv2d(dim, w[3], 1), nn.Conv2d(w[3], w[3], 3, stride=2, padding=1)),
        ])
        self.rn = nn.ModuleList(nn.Conv2d(wi, features, 3, padding=1, bias=False) for wi in w)
        self.fusion = nn.ModuleList(_FusionBlock(features) for _ in range(LEVELS))
        self.head1 = nn.Conv2d(features, max(1, features // 2), 3, padding=1)
        self.head2 = nn.Sequential(nn.Conv2d(max(1, features // 2), head_features, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(head_features, 1, 1))

    def forward(self, maps: Sequence[torch.Tensor], size) -> torch.Tensor:
        l1, l2, l3, l4 = (rn(re(m)) for rn, re, m in zip(self.rn, self.reassemble, maps))
        x = self.fusion[3](l4, None, l3.shape[-2:])
        x = self.fusion[2](x, l3, l2.shape[-2:])
        x = self.fusion[1](x, l2, l1.shape[-2:])
        x = self.fusion[0](x, l1, (2 * l1.shape[-2], 2 * l1.shape[-1]))
        x = self.head1(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.head2(x)


class LevelProjection(nn.Module):
    """The "small conv projection" of one U-Net block: 1×1 conv to ``dim``,
    resampling to the token grid (area average when the block is finer,
    bilinear when coarser), GELU, 3×3 conv, LayerNorm per token."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, dim, 1)
        self.conv_out = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        """(B, C_l, h, w) -> (B, N, dim) tokens on ``grid`` (row-major)."""
        x = self.conv_in(x.to(self.conv_in.weight.dtype))
        if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
            if tuple(x.shape[-2:]) != tuple(grid):
                x = F.adaptive_avg_pool2d(x, grid)
        else:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        x = self.conv_out(F.gelu(x))
        return self.norm(x.flatten(2).transpose(1, 2))
