"""A small VTM-style few-shot dense predictor for tests and demos.

Visual Token Matching predicts a query image's label as a mix of the support
images' label tokens, weighted by how similar the query's image tokens are to
the support's image tokens. This model keeps that structure at toy size:

* image encoder, shared by every task: 4x4 conv patchify, then blocks of
  depthwise 3x3 token mixing and an MLP of :class:`fastdense.nn.LoRALinear`;
  each block first adds a task-specific bias to its input (VTM's bias
  tuning), which is how one encoder is told which task it serves;
* label encoder: conv patchify of the (normalised, zero-padded) label, plus a
  task-specific bias;
* matching: multi-head cross attention, queries from the query-image tokens,
  keys from the support-image tokens, values from the support-label tokens;
  its projections are LoRA layers;
* label decoder: conv head back to pixels, plus a task-specific output bias.

Labels of any task go in and come out with :data:`MAX_LABEL_CHANNELS`
channels (zero-padded) in normalised units (divided by the task's
:data:`LABEL_SCALE`), so that tasks with metres and tasks in [0, 1] weigh
alike when meta-training mixes them; :meth:`TinyFewShot.normalize_label` and
:meth:`TinyFewShot.denormalize` convert.

Few-shot fine-tuning touches only :meth:`TinyFewShot.adaptable_parameters`:
the task's own biases and the LoRA adapters; everything else stays as
meta-training left it.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.models._tasks import validate_tasks
from fastdense.models.registry import register_model
from fastdense.nn import LoRALinear, lora_parameters

#: Channels of the labels of the synthetic scenes' single- and few-channel tasks.
FEWSHOT_TASK_CHANNELS = {
    "reshading": 1, "principal_curvature": 2, "keypoints2d": 1, "keypoints3d": 1, "edge_texture": 1,
    "edge_occlusion": 1, "depth_euclidean": 1, "depth_zbuffer": 1, "saliency": 1, "normal": 3,
}
FEWSHOT_TASKS = tuple(FEWSHOT_TASK_CHANNELS)
MAX_LABEL_CHANNELS = max(FEWSHOT_TASK_CHANNELS.values())
#: Labels are divided by these so that every task's values are of order 1
#: (depths reach about 14 m in the synthetic rooms, curvatures about 5 /m).
LABEL_SCALE = {"depth_euclidean": 10.0, "depth_zbuffer": 10.0, "principal_curvature": 5.0}


def check_fewshot_tasks(tasks: Sequence[str]) -> List[str]:
    return validate_tasks(tasks, FEWSHOT_TASKS, kind="few-shot task")


class _Block(nn.Module):
    """x + dwconv(LN(x + b_task)), then x + fc2(GELU(fc1(LN(x)))) with LoRA linears."""

    def __init__(self, dim: int, hidden: int, rank: int, train_base: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = LoRALinear(dim, hidden, r=rank, alpha=float(rank))
        self.fc2 = LoRALinear(hidden, dim, r=rank, alpha=float(rank))
        _set_base_trainable((self.fc1, self.fc2), train_base)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        y = self.norm1(x + bias).permute(0, 3, 1, 2)
        x = x + self.dwconv(y).permute(0, 2, 3, 1)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _set_base_trainable(layers, flag: bool) -> None:
    # LoRALinear freezes its base by default (fine-tuning semantics); a model
    # meta-trained from scratch has to learn the base weights too.
    for layer in layers:
        layer.weight.requires_grad_(flag)
        if layer.bias is not None:
            layer.bias.requires_grad_(flag)


class TinyFewShot(nn.Module):
    """``forward(task, support_image (S,3,H,W), support_label (S,C,H,W), query_image (Q,3,H,W))``
    -> normalised label prediction (Q, C_task, H, W).

    ``support_label`` is in normalised units (:meth:`normalize_label`), with
    the task's own channel count or already padded. ``tasks`` are every task
    the model may ever see, held-out ones included: each gets its bias
    parameters at construction (zero), and a held-out task's biases stay
    zero until :meth:`adaptable_parameters` of that task are fine-tuned.
    """

    def __init__(self, tasks: Sequence[str] = FEWSHOT_TASKS, dim: int = 32, depth: int = 2, patch: int = 4,
                 mlp_ratio: int = 2, heads: int = 4, rank: int = 4, train_base: bool = True) -> None:
        super().__init__()
        self.tasks = check_fewshot_tasks(tasks)
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.depth, self.patch, self.heads = dim, depth, patch, heads
        self.stem = nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.blocks = nn.ModuleList(_Block(dim, dim * mlp_ratio, rank, train_base) for _ in range(depth))
        self.image_norm = nn.LayerNorm(dim)
        self.label_stem = nn.Sequential(nn.Conv2d(MAX_LABEL_CHANNELS, dim, patch, stride=patch), nn.GELU(),
                                        nn.Conv2d(dim, dim, 1))
        self.q_proj = LoRALinear(dim, dim, r=rank, alpha=float(rank))
        self.k_proj = LoRALinear(dim, dim, r=rank, alpha=float(rank))
        self.v_proj = LoRALinear(dim, dim, r=rank, alpha=float(rank))
        self.out_proj = LoRALinear(dim, dim, r=rank, alpha=float(rank))
        _set_base_trainable((self.q_proj, self.k_proj, self.v_proj, self.out_proj), train_base)
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(),
                                     nn.Conv2d(dim, MAX_LABEL_CHANNELS, 1))
        # Task-specific biases, the only per-task state (a few hundred numbers per task).
        self.encoder_bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(depth, dim)) for t in self.tasks})
        self.label_bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(dim)) for t in self.tasks})
        self.output_bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(MAX_LABEL_CHANNELS)) for t in self.tasks})

    # ------------------------------------------------------------------ parameters
    def _check_task(self, task: str) -> None:
        if task not in self.encoder_bias:
            raise ValueError(f"task {task!r} is not one of this model's tasks {self.tasks}")

    def task_parameters(self, task: str) -> List[nn.Parameter]:
        self._check_task(task)
        return [self.encoder_bias[task], self.label_bias[task], self.output_bias[task]]

    def adaptable_parameters(self, task: str) -> List[nn.Parameter]:
        """What few-shot fine-tuning on ``task`` updates: its biases and every LoRA A/B."""
        return self.task_parameters(task) + list(lora_parameters(self))

    # ------------------------------------------------------------------ labels
    @staticmethod
    def normalize_label(task: str, label: torch.Tensor) -> torch.Tensor:
        """(N, C_task, H, W) raw label -> (N, MAX_LABEL_CHANNELS, H, W) normalised and zero-padded."""
        label = label.float()
        if label.dim() == 3:
            label = label.unsqueeze(1)
        label = label / LABEL_SCALE.get(task, 1.0)
        return F.pad(label, (0, 0, 0, 0, 0, MAX_LABEL_CHANNELS - label.shape[1]))

    @staticmethod
    def denormalize(task: str, pred: torch.Tensor) -> torch.Tensor:
        return pred * LABEL_SCALE.get(task, 1.0)

    # ------------------------------------------------------------------ forward
    def encode_image(self, task: str, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] % self.patch or image.shape[-2] % self.patch:
            raise ValueError(f"image height and width must be multiples of {self.patch}, got {tuple(image.shape)}")
        x = self.stem(image).permute(0, 2, 3, 1)
        bias = self.encoder_bias[task]
        for i, block in enumerate(self.blocks):
            x = block(x, bias[i])
        return self.image_norm(x)  # (B, h, w, dim)

    def encode_label(self, task: str, label: torch.Tensor) -> torch.Tensor:
        if label.shape[1] != MAX_LABEL_CHANNELS:
            label = F.pad(label, (0, 0, 0, 0, 0, MAX_LABEL_CHANNELS - label.shape[1]))
        return self.label_stem(label).permute(0, 2, 3, 1) + self.label_bias[task]

    def forward(self, task: str, support_image: torch.Tensor, support_label: torch.Tensor,
                query_image: torch.Tensor) -> torch.Tensor:
        self._check_task(task)
        s, q = support_image.shape[0], query_image.shape[0]
        # One encoder pass for support and query images together.
        feats = self.encode_image(task, torch.cat([support_image, query_image]))
        h, w = feats.shape[1:3]
        sup, qry = feats[:s].reshape(1, s * h * w, self.dim), feats[s:].reshape(q, h * w, self.dim)
        lab = self.encode_label(task, support_label).reshape(1, s * h * w, self.dim)
        hd = self.dim // self.heads

        def split(x):  # (B, N, dim) -> (B, heads, N, hd)
            return x.reshape(x.shape[0], x.shape[1], self.heads, hd).transpose(1, 2)

        qh = split(self.q_proj(qry))
        kh = split(self.k_proj(sup)).expand(q, -1, -1, -1)
        vh = split(self.v_proj(lab)).expand(q, -1, -1, -1)
        matched = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(q, h, w, self.dim)
        y = self.decoder(self.decoder_norm(self.out_proj(matched)).permute(0, 3, 1, 2))
        y = F.interpolate(y, scale_factor=self.patch, mode="bilinear", align_corners=False)
        y = y + self.output_bias[task].view(1, -1, 1, 1)
        return y[:, :FEWSHOT_TASK_CHANNELS[task]]


@register_model(kind="fewshot")
def tiny_fewshot(tasks: Sequence[str] = FEWSHOT_TASKS, **kwargs) -> TinyFewShot:
    """The tiny episodic few-shot model the demo and the tests adapt."""
    return TinyFewShot(check_fewshot_tasks(tasks), **kwargs)
