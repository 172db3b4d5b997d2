"""Per-task losses, predictions and metrics for the tasks of fastdense.models.

Every loss is a sum over valid pixels divided by the number of *all* pixels
of the batch (invalid pixels contribute 0). Dividing by the valid count
instead would weight images differently depending on how they are split into
batches, and the mean of two half-batch losses (what DDP's gradient average
computes) would no longer equal the full-batch loss.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn.functional as F

from fastdense import metrics as M
from fastdense.models.tiny_mtl import NUM_SEMSEG_CLASSES

IGNORE_INDEX = 255


def semseg_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(out.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / target.numel()


def normal_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the unit-normalised prediction and the target, on pixels with a normal."""
    pred = F.normalize(out.float(), dim=1)
    valid = (target.norm(dim=1, keepdim=True) > 0).float()
    return ((pred - target).abs() * valid).sum() / (target.numel() // target.shape[1])


def depth_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on pixels with a depth (background/sky has depth 0 and is not a surface)."""
    valid = (target > 0).float()
    return ((out.float() - target).abs() * valid).sum() / target.numel()


def saliency_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = (target != IGNORE_INDEX).float()
    bce = F.binary_cross_entropy_with_logits(out.float(), target * valid, reduction="none")
    return (bce * valid).sum() / target.numel()


LOSSES = {"semseg": semseg_loss, "normal": normal_loss, "depth_euclidean": depth_loss, "saliency": saliency_loss}


def task_losses(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {t: LOSSES[t](out, batch[t]) for t, out in outputs.items()}


def total_loss(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None) -> torch.Tensor:
    weights = weights or {}
    return sum(float(weights.get(t, 1.0)) * l for t, l in losses.items())


@torch.no_grad()
def predict(task: str, out: torch.Tensor) -> torch.Tensor:
    """Raw model output -> the prediction the metric scores: class ids (B,H,W),
    unit normals, depth clamped at 0, saliency probability."""
    out = out.float()
    if task == "semseg":
        return out.argmax(1)
    if task == "normal":
        return F.normalize(out, dim=1)
    if task == "depth_euclidean":
        return out.clamp(min=0)
    if task == "saliency":
        return out.sigmoid()
    raise ValueError(f"unknown task {task!r}")


# The number reported per task, the key in the metric's compute() and whether higher is better.
PRIMARY = {
    "semseg": ("miou", True),
    "normal": ("mean", False),
    "depth_euclidean": ("rmse", False),
    "saliency": ("maxf", True),
}


def make_metric(task: str) -> M.Metric:
    if task == "semseg":
        return M.MeanIoU(NUM_SEMSEG_CLASSES, ignore_index=IGNORE_INDEX)
    if task == "normal":
        return M.NormalsError(num_bins=1800)
    if task == "depth_euclidean":
        return M.DepthError()
    if task == "saliency":
        return M.SaliencyMetrics()
    raise ValueError(f"unknown task {task!r}")


def summarize(task: str, result: Mapping) -> Dict[str, float]:
    """The scalar entries of a metric's compute() (drops per-class/per-threshold tensors)."""
    keep = {"semseg": ("miou", "pixel_acc"), "normal": ("mean", "median", "within_11.25"),
            "depth_euclidean": ("rmse", "abs_rel", "delta1"), "saliency": ("maxf", "miou")}[task]
    return {k: float(result[k]) for k in keep if k in result}
