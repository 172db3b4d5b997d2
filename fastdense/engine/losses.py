"""Per-task losses; which task uses which loss is the table in :mod:`fastdense.engine.tasks`.

Two families:

* The synthetic scenes' losses (``semseg_loss``, ``normal_loss``,
  ``depth_loss``, ``saliency_loss``): a sum over valid pixels divided by the
  number of *all* pixels of the batch (invalid pixels contribute 0). Dividing
  by the valid count instead would weight images differently depending on how
  they are split into batches, and the mean of two half-batch losses (what
  DDP's gradient average computes) would no longer equal the full-batch loss.
* MTLoRA's losses for PASCAL-Context and NYUD (its released ``get_loss``):
  ``cross_entropy_loss``, ``normals_l1_loss``, ``depth_l1_loss`` average over
  the valid pixels (elements) of the batch, as the released code does, and
  ``balanced_bce_loss`` over all pixels. Where a batch has no valid pixel
  they return 0 (the released code divides 0 by 0 there).

``MTLORA_LOSS_WEIGHTS`` are MTLoRA's task weights, the defaults of the
PASCAL-Context and NYUD recipes.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from fastdense.engine.tasks import (
    IGNORE_INDEX,
    PRIMARY,
    SYNTHETIC_SEMSEG_CLASSES,
    make_metric,
    predict,
    summarize,
    task_spec,
)

NUM_SEMSEG_CLASSES = SYNTHETIC_SEMSEG_CLASSES  # the synthetic scenes' classes, kept under its old name

#: MTLoRA's task weights (its main.py; TADFormer Eq. 7): L = Σ_t w_t L_t.
MTLORA_LOSS_WEIGHTS: Dict[str, float] = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0,
                                         "normals": 10.0, "depth": 1.0}


# ----------------------------------------------------------------------------- synthetic scenes
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


# ----------------------------------------------------------------------------- MTLoRA's losses
def cross_entropy_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy averaged over the pixels whose label is not 255
    (MTLoRA's ``SoftMaxwithLoss``, semseg and human parts); target (B, H, W) int64."""
    ce = F.cross_entropy(out.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp(min=1)


def normals_l1_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between out / (‖out‖ + 1e-12) and the target over the elements that are not 255,
    divided by their number (MTLoRA's ``NormalsLoss(normalize=True)``)."""
    out = out.float()
    pred = out / (out.norm(dim=1, keepdim=True) + 1e-12)
    valid = target != IGNORE_INDEX
    # Multiplying by the mask (not indexing) keeps the shapes static for torch.compile.
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp(min=1)


def depth_l1_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels whose depth is not 255 (MTLoRA's ``DepthLoss``)."""
    valid = target != IGNORE_INDEX
    return ((out.float() - target).abs() * valid).sum() / valid.sum().clamp(min=1)


def balanced_bce_loss(out: torch.Tensor, target: torch.Tensor, pos_weight: Optional[float] = None) -> torch.Tensor:
    """HED-style class-balanced binary cross-entropy (MTLoRA's ``BalancedCrossEntropyLoss``):

        L = (w Σ_{y=1} BCE + (1 − w) Σ_{y=0} BCE) / #pixels,   y = [target ≥ 0.5]

    with w = ``pos_weight`` (edges: 0.95), or, when None (saliency), the batch's fraction
    of negative pixels. ``target`` may lack the output's channel axis. As in the released
    code there is no ignore label: every pixel counts.
    """
    out = out.float()
    labels = (target.reshape(out.shape) >= 0.5).float()
    w = (1.0 - labels).sum() / labels.numel() if pos_weight is None else pos_weight
    bce = F.binary_cross_entropy_with_logits(out, labels, reduction="none")
    return (w * (bce * labels).sum() + (1.0 - w) * (bce * (1.0 - labels)).sum()) / labels.numel()


#: loss name (``TaskSpec.loss``) -> function(out, target, **loss_kwargs).
LOSS_FUNCTIONS = {
    "synthetic_semseg": semseg_loss,
    "synthetic_normal": normal_loss,
    "synthetic_depth": depth_loss,
    "synthetic_saliency": saliency_loss,
    "cross_entropy": cross_entropy_loss,
    "normals_l1": normals_l1_loss,
    "depth_l1": depth_l1_loss,
    "balanced_bce": balanced_bce_loss,
}

# The synthetic scenes' four original tasks -> their losses (the name older code imports).
LOSSES = {"semseg": semseg_loss, "normal": normal_loss, "depth_euclidean": depth_loss, "saliency": saliency_loss}


def task_loss(task: str, out: torch.Tensor, target: torch.Tensor, dataset: Optional[str] = None) -> torch.Tensor:
    """The loss of ``task`` (see :func:`fastdense.engine.tasks.task_spec` for ``dataset``)."""
    spec = task_spec(task, dataset)
    return LOSS_FUNCTIONS[spec.loss](out, target, **spec.loss_kwargs)


def task_losses(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                dataset: Optional[str] = None) -> Dict[str, torch.Tensor]:
    return {t: task_loss(t, out, batch[t], dataset) for t, out in outputs.items()}


def total_loss(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None) -> torch.Tensor:
    weights = weights or {}
    return sum(float(weights.get(t, 1.0)) * l for t, l in losses.items())


__all__ = ["IGNORE_INDEX", "LOSSES", "LOSS_FUNCTIONS", "MTLORA_LOSS_WEIGHTS", "NUM_SEMSEG_CLASSES", "PRIMARY",
           "balanced_bce_loss", "cross_entropy_loss", "depth_l1_loss", "depth_loss", "make_metric", "normal_loss",
           "normals_l1_loss", "predict", "saliency_loss", "semseg_loss", "summarize", "task_loss", "task_losses",
           "total_loss"]
