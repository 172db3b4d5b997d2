"""Optimal-dataset-scale F-measure of edge maps with a distance tolerance."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastdense.metrics._base import Metric, Tensor, _check_thresholds, count_above


def _disk_offsets(radius: float):
    r = int(math.floor(radius))
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius]


def disk_max_filter(x: Tensor, radius: float, fill: float = float("-inf")) -> Tensor:
    """out[b, i, j] = max of x[b, i + dy, j + dx] over dy^2 + dx^2 <= radius^2.

    ``x`` is ``(B, H, W)``; outside the image counts as ``fill``. A max over
    shifted copies: the disk is small (a few pixels), so this costs a few dozen
    element-wise maxima and works for any dtype and device.
    """
    r = int(math.floor(radius))
    if r == 0:
        return x.clone()
    h, w = x.shape[-2:]
    padded = F.pad(x.unsqueeze(1), (r, r, r, r), value=fill).squeeze(1)
    out = None
    for dy, dx in _disk_offsets(radius):
        view = padded[:, r + dy:r + dy + h, r + dx:r + dx + w]
        out = view.clone() if out is None else torch.maximum(out, view)
    return out


class EdgeODSF(Metric):
    """Optimal-dataset-scale F-measure (odsF) of edge probability maps.

    For each threshold t in ``thresholds`` (default 0.01, 0.02, ..., 0.99) a
    pixel is a predicted edge when ``p >= t``. With distance tolerance r::

        matched predictions  M_t = #{predicted edge pixels within r of a GT edge pixel}
        recalled GT pixels   R_t = #{GT edge pixels within r of a predicted edge pixel}
        P_t = M_t / #{predicted edge pixels},   Rec_t = R_t / #{GT edge pixels}
        F_t = 2 P_t Rec_t / (P_t + Rec_t)       (0 when undefined)
        odsF = max_t F_t      (counts pooled over the dataset, one t for all images)

    "Within r" is Euclidean distance <= r pixels, implemented by dilating the
    GT edges with a disk of radius r (for precision) and by a disk max-filter
    of the probability map (for recall), so every threshold costs one histogram
    bin instead of one dilation.

    **This is an approximation of the benchmark the papers use** (MATLAB seism /
    the BSDS ``correspondPixels``): that benchmark thins the predicted edges to
    one-pixel width and matches predicted to GT pixels *one-to-one* (a bipartite
    assignment within the tolerance), so one GT pixel can justify only one
    predicted pixel. Here any number of predicted pixels near the same GT pixel
    all count as matched and no thinning is done, so on thick, un-thinned
    predictions precision -- and odsF -- come out higher than seism's. Pass
    thinned (non-maximum-suppressed) edge maps to get closer to it; use the
    number for relative comparisons and validation, not as a drop-in for the
    published odsF.

    ``tolerance_px``: r in pixels. ``None`` (default) uses seism's rule,
    ``r = max_dist * sqrt(H^2 + W^2)`` with ``max_dist = 0.0075`` (the value the
    PASCAL-Context edge evaluation passes to seism), evaluated per batch from
    its image size.

    ``update(pred, target, mask=None)``: ``pred`` probabilities in [0, 1],
    ``(B, 1, H, W)`` or ``(B, H, W)``; ``target`` of the same shape, edge
    pixels > 0.5, pixels equal to ``ignore_index`` (or where ``mask`` is false)
    count nowhere.
    """

    def __init__(self, tolerance_px: Optional[float] = None, thresholds=None, max_dist: float = 0.0075,
                 ignore_index: Optional[int] = 255) -> None:
        super().__init__()
        if tolerance_px is not None and tolerance_px < 0:
            raise ValueError("tolerance_px must be >= 0")
        if thresholds is None:
            thresholds = torch.arange(1, 100, dtype=torch.float64) / 100
        self.thresholds = _check_thresholds(thresholds, "thresholds")
        self.tolerance_px = tolerance_px
        self.max_dist = float(max_dist)
        self.ignore_index = ignore_index
        k = self.thresholds.numel()
        self._add_state("pred_total", torch.zeros(k, dtype=torch.int64))
        self._add_state("pred_matched", torch.zeros(k, dtype=torch.int64))
        self._add_state("gt_total", torch.zeros((), dtype=torch.int64))
        self._add_state("gt_matched", torch.zeros(k, dtype=torch.int64))

    def radius_for(self, height: int, width: int) -> float:
        """The tolerance r, in pixels, used for images of this size."""
        if self.tolerance_px is not None:
            return float(self.tolerance_px)
        return self.max_dist * math.hypot(height, width)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self._ensure_device(target.device)
        if pred.dim() == 4:
            if pred.shape[1] != 1:
                raise ValueError("edge maps must have one channel")
            pred, target = pred[:, 0], target[:, 0]
            if mask is not None and mask.dim() == 4:
                mask = mask[:, 0]
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
            mask = None if mask is None else mask.reshape(pred.shape)
        r = self.radius_for(*pred.shape[-2:])

        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        if mask is not None:
            valid &= mask.bool().reshape(valid.shape)
        gt = (target > 0.5) & valid
        p = pred.float() if pred.dtype != torch.float64 else pred
        p = torch.where(valid, p, torch.full_like(p, float("-inf")))

        near_gt = disk_max_filter(gt.to(torch.uint8), r, fill=0).bool()
        best_near = disk_max_filter(p, r)

        th = self.thresholds
        pred_total = count_above(p[valid], th, inclusive=True)[0]
        pred_matched = count_above(p[valid & near_gt], th, inclusive=True)[0]
        gt_matched = count_above(best_near[gt], th, inclusive=True)[0]
        self._accumulate(pred_total=pred_total, pred_matched=pred_matched,
                         gt_total=gt.sum(), gt_matched=gt_matched)

    def compute(self) -> dict:
        """Returns ``{"ods_f", "ods_threshold", "f", "precision", "recall"}`` (per-threshold tensors)."""
        s = {k: v.cpu() for k, v in self._current().items()}
        pt, pm, gm = s["pred_total"].double(), s["pred_matched"].double(), s["gt_matched"].double()
        gt_total = float(s["gt_total"])
        prec = torch.where(pt > 0, pm / pt.clamp(min=1), torch.zeros_like(pt))
        rec = gm / gt_total if gt_total > 0 else torch.zeros_like(gm)
        den = prec + rec
        f = torch.where(den > 0, 2 * prec * rec / den.clamp(min=1e-300), torch.zeros_like(den))
        i = int(f.argmax())
        return {
            "ods_f": float(f[i]),
            "ods_threshold": float(self.thresholds[i]),
            "f": f,
            "precision": prec,
            "recall": rec,
        }

    def __repr__(self) -> str:
        return (f"EdgeODSF(tolerance_px={self.tolerance_px}, max_dist={self.max_dist}, "
                f"thresholds={self.thresholds.numel()}, ignore_index={self.ignore_index})")
