"""Depth-estimation errors pooled over all valid pixels of the dataset."""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastdense.metrics._base import Metric, Tensor


class DepthError(Metric):
    """RMSE, log-RMSE, absolute relative error and delta accuracies of depth.

    Over the N valid pixels of the whole dataset (pixels pooled, not a mean of
    per-image values -- the convention of the NYUD-v2 multi-task code), with
    prediction d_i and target g_i::

        rmse      = sqrt((1/N) sum_i (d_i - g_i)^2)
        log_rmse  = sqrt((1/N) sum_i (ln d_i - ln g_i)^2)
        abs_rel   = (1/N) sum_i |d_i - g_i| / g_i
        delta<k>  = #{max(d_i / g_i, g_i / d_i) < 1.25^k} / N,   k = 1, 2, 3

    A pixel is valid when ``target > 0`` and finite, the target is not
    ``ignore_value`` (255: the padding value of the community's augmentation),
    and ``mask`` (if given) is true. Predictions are clamped to at least
    ``min_pred`` (1e-9, as the community code does) in *every* term: a depth
    cannot be <= 0, and the log and ratios need it positive.

    ``update(pred, target, mask=None)``: ``pred`` and ``target`` of one shape,
    e.g. ``(B, 1, H, W)`` or ``(B, H, W)``; ``mask`` with as many elements.
    """

    def __init__(self, ignore_value: Optional[float] = 255.0, min_pred: float = 1e-9) -> None:
        super().__init__()
        self.ignore_value = ignore_value
        self.min_pred = float(min_pred)
        self._add_state("count", torch.zeros((), dtype=torch.int64))
        self._add_state("sum_sq", torch.zeros((), dtype=torch.float64))
        self._add_state("sum_log_sq", torch.zeros((), dtype=torch.float64))
        self._add_state("sum_abs_rel", torch.zeros((), dtype=torch.float64))
        self._add_state("delta_count", torch.zeros(3, dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self._ensure_device(target.device)
        valid = (target > 0) & torch.isfinite(target)
        if self.ignore_value is not None:
            valid &= target != self.ignore_value
        if mask is not None:
            valid &= mask.bool().reshape(target.shape)
        g = target[valid].double()
        d = pred[valid].double().clamp(min=self.min_pred)
        diff = d - g
        log_diff = d.log() - g.log()
        ratio = torch.maximum(d / g, g / d)
        deltas = torch.stack([(ratio < 1.25 ** k).sum() for k in (1, 2, 3)])
        self._accumulate(
            count=torch.tensor(g.numel()),
            sum_sq=(diff * diff).sum(),
            sum_log_sq=(log_diff * log_diff).sum(),
            sum_abs_rel=(diff.abs() / g).sum(),
            delta_count=deltas,
        )

    def compute(self) -> dict:
        """Returns ``{"rmse", "log_rmse", "abs_rel", "delta1", "delta2", "delta3", "count"}``."""
        s = {k: v.cpu() for k, v in self._current().items()}
        n = int(s["count"])
        if n == 0:
            nan = float("nan")
            return {"rmse": nan, "log_rmse": nan, "abs_rel": nan, "delta1": nan, "delta2": nan,
                    "delta3": nan, "count": 0}
        d = s["delta_count"].tolist()
        return {
            "rmse": math.sqrt(float(s["sum_sq"]) / n),
            "log_rmse": math.sqrt(float(s["sum_log_sq"]) / n),
            "abs_rel": float(s["sum_abs_rel"]) / n,
            "delta1": d[0] / n,
            "delta2": d[1] / n,
            "delta3": d[2] / n,
            "count": n,
        }

    def __repr__(self) -> str:
        return f"DepthError(ignore_value={self.ignore_value}, min_pred={self.min_pred})"
