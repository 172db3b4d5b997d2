"""A small multi-task dense-prediction network built from fastdense's LoRA layers.

Patchify stem (4x4 conv) -> token-mixing blocks -> one light head per task.
Each block mixes tokens spatially with a depthwise 3x3 convolution and
channels with an MLP whose linear layers are fastdense LoRA layers, so that
training the model runs the fused LoRA op forward and backward. The last
block's first MLP layer is a :class:`MultiTaskLoRALinear`: besides the shared
features it returns one task-specific feature map per task (MTLoRA's
task-adapted features), and each task head reads its own map.

The model is trained from scratch, so the base weights of the LoRA layers are
trainable here (``train_base=True``); with ``train_base=False`` they stay frozen
as in parameter-efficient fine-tuning and only adapters, stem, norms and heads
learn.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.models._tasks import validate_tasks
from fastdense.models.registry import register_model
from fastdense.nn import LoRALinear, MultiTaskLoRALinear

# Output channels of each supported task; semseg has one logit per class of
# fastdense.data.SyntheticScenes.CLASSES (background, floor, wall, sphere, box, cylinder).
NUM_SEMSEG_CLASSES = 6
TASK_CHANNELS = {"semseg": NUM_SEMSEG_CLASSES, "normal": 3, "depth_euclidean": 1, "saliency": 1}
SUPPORTED_TASKS = tuple(TASK_CHANNELS)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate a task list against :data:`SUPPORTED_TASKS`; returns it as a list."""
    return validate_tasks(tasks, SUPPORTED_TASKS)


class _Block(nn.Module):
    """x + dwconv(LN(x)), then x + fc2(GELU(fc1(LN(x)))); with tasks, fc1 also
    yields per-task hidden states that go through the same fc2 to per-task features."""

    def __init__(self, dim: int, hidden: int, tasks: Sequence[str], shared_rank: int, task_rank: int,
                 dropout: float, train_base: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = MultiTaskLoRALinear(dim, hidden, tasks=list(tasks), shared_rank=shared_rank,
                                       task_ranks=task_rank, dropout=dropout)
        self.fc2 = LoRALinear(hidden, dim, r=shared_rank, alpha=float(shared_rank), dropout=0.0)
        if train_base:
            for layer in (self.fc1, self.fc2):
                layer.weight.requires_grad_(True)
                layer.bias.requires_grad_(True)
        # A fresh LoRA's B is zero, so its A gets no gradient in the first step; with a trainable
        # base that is harmless, and it keeps the op's documented initialisation.

    def forward(self, x: torch.Tensor):  # x: (B, H, W, C), channels last for the linears
        y = self.norm1(x).permute(0, 3, 1, 2)
        x = x + self.dwconv(y).permute(0, 2, 3, 1)
        shared, per_task = self.fc1(self.norm2(x))
        x = x + self.fc2(F.gelu(shared))
        feats = None
        if per_task is not None:
            feats = {t: x + self.fc2(F.gelu(h)) for t, h in per_task.items()}
        return x, feats


class _Head(nn.Module):
    """3x3 conv + GELU + 1x1 conv at the token resolution, then bilinear upsampling."""

    def __init__(self, dim: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.out = nn.Conv2d(dim, out_channels, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(F.gelu(self.conv(x)))
        return F.interpolate(y, scale_factor=self.scale, mode="bilinear", align_corners=False)


class TinyMTL(nn.Module):
    """Multi-task dense network: ``forward(image (B,3,H,W)) -> {task: raw output (B,C_t,H,W)}``.

    Raw outputs are logits for semseg and saliency, unnormalised vectors for
    normals and depth in metres; :func:`fastdense.engine.losses.predict` turns
    them into predictions. H and W must be multiples of ``patch``.
    """

    def __init__(self, tasks: Sequence[str], dim: int = 48, depth: int = 3, patch: int = 4, mlp_ratio: int = 2,
                 shared_rank: int = 8, task_rank: int = 4, dropout: float = 0.0, train_base: bool = True) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.patch = patch
        self.stem = nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.blocks = nn.ModuleList(
            # Only the last block has task adapters: earlier per-task outputs would be unused
            # parameters, which DDP rejects.
            _Block(dim, dim * mlp_ratio, self.tasks if i == depth - 1 else [], shared_rank, task_rank,
                   dropout, train_base)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({t: _Head(dim, TASK_CHANNELS[t], patch) for t in self.tasks})

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        if image.shape[-1] % self.patch or image.shape[-2] % self.patch:
            raise ValueError(f"image height and width must be multiples of {self.patch}, got {tuple(image.shape)}")
        x = self.stem(image).permute(0, 2, 3, 1)
        feats = None
        for block in self.blocks:
            x, feats = block(x)
        return {t: self.heads[t](self.norm(feats[t]).permute(0, 3, 1, 2)) for t in self.tasks}


@register_model(kind="multitask")
def tiny_mtl(tasks: Sequence[str] = SUPPORTED_TASKS, **kwargs) -> TinyMTL:
    """The demo's network (dim 48, 3 blocks) for the synthetic scenes' tasks."""
    return TinyMTL(tasks, **kwargs)


@register_model(kind="multitask")
def tiny_mtl_small(tasks: Sequence[str] = SUPPORTED_TASKS, **kwargs) -> TinyMTL:
    """A smaller TinyMTL (dim 32, 2 blocks) for quick tests."""
    return TinyMTL(tasks, **{"dim": 32, "depth": 2, **kwargs})
