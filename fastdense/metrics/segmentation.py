"""Mean intersection-over-union from a dataset-wide confusion matrix."""
from __future__ import annotations

import torch

from fastdense.metrics._base import Metric, Tensor


class MeanIoU(Metric):
    """Per-class IoU over the whole dataset and their mean (semseg, human parts).

    With TP_c, FP_c, FN_c counted over every valid pixel of every image::

        IoU_c = TP_c / (TP_c + FP_c + FN_c)
        mIoU  = mean of IoU_c over the classes kept (see ``absent``)

    A pixel is valid when its target is not ``ignore_index``; a prediction on an
    ignored pixel counts nowhere. A prediction outside ``[0, num_classes)``
    (e.g. a 255 written by a post-processing step) is a miss: an FN of the
    target's class and an FP of no class.

    Absent classes (``TP + FP + FN = 0``: never in the targets, never
    predicted) have no defined IoU:

    * ``absent="exclude"`` (default): IoU_c is NaN and the class is left out of
      the mean -- the usual definition, and the only one that stays meaningful
      on subsets of a dataset.
    * ``absent="zero"``: IoU_c = 0 and the class stays in the mean, which is
      what the MTI-Net/ATRC/MTLoRA evaluation code does (it divides by
      ``max(TP + FP + FN, 1e-8)`` and averages all classes).

    The two agree whenever every class occurs, as on the full PASCAL-Context
    val split (21 semseg classes, 7 parts classes). Results are fractions in
    [0, 1]; the papers print percentages.

    ``update(pred, target)``: ``pred`` holds class indices with the shape of
    ``target``, or scores with one more dimension (classes on dim 1), which are
    arg-maxed.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, absent: str = "exclude") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if absent not in ("exclude", "zero"):
            raise ValueError("absent must be 'exclude' or 'zero'")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.absent = absent
        # Rows: target class. Columns: predicted class, plus one column for
        # predictions outside [0, C).
        self._add_state("confmat", torch.zeros(num_classes, num_classes + 1, dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        c = self.num_classes
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self._ensure_device(target.device)
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, pred = target[keep], pred[keep]
        if target.numel() and bool(((target < 0) | (target >= c)).any()):
            raise ValueError(f"target holds labels outside [0, {c}) that are not ignore_index={self.ignore_index}")
        pred = torch.where((pred >= 0) & (pred < c), pred, torch.full_like(pred, c))
        cm = torch.bincount(target * (c + 1) + pred, minlength=c * (c + 1)).view(c, c + 1)
        self._accumulate(confmat=cm)

    def compute(self) -> dict:
        """Returns ``{"miou", "iou" (C,), "pixel_acc", "tp", "fp", "fn"}`` (CPU)."""
        cm = self._current()["confmat"].cpu()
        c = self.num_classes
        tp = torch.diagonal(cm[:, :c])
        fp = cm[:, :c].sum(0) - tp
        fn = cm.sum(1) - tp
        union = tp + fp + fn
        iou = tp.double() / union.clamp(min=1).double()
        if self.absent == "exclude":
            iou = torch.where(union > 0, iou, torch.full_like(iou, float("nan")))
            miou = float(iou.nanmean()) if bool((union > 0).any()) else float("nan")
        else:
            miou = float(iou.mean())
        total = int(cm.sum())
        return {
            "miou": miou,
            "iou": iou,
            "pixel_acc": float(tp.sum()) / total if total else float("nan"),
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    def __repr__(self) -> str:
        return f"MeanIoU(num_classes={self.num_classes}, ignore_index={self.ignore_index}, absent={self.absent!r})"
