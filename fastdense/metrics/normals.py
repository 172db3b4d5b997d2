"""Angular error of surface-normal predictions."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fastdense.metrics._base import Metric, Tensor


class NormalsError(Metric):
    """Angular error, in degrees, between predicted and target normals.

    For each valid pixel i, with p_i the prediction and g_i the target::

        theta_i = atan2(|p_i x g_i|, p_i . g_i) * 180 / pi

    which equals ``arccos(p̂_i . ĝ_i)`` for the normalised vectors but keeps full
    precision near 0 and 180 degrees (arccos loses it there) and needs no
    clamping. A zero prediction has no direction and scores 90 degrees (what
    ``arccos(0)`` gives in the community code, which puts zeros into the dot
    product). Over the N valid pixels of the dataset::

        mean        = (1/N) sum_i theta_i
        rmse_angle  = sqrt((1/N) sum_i theta_i^2)        (the true RMSE)
        mtl_rmse    = mean                               (see below)
        within_t    = #{theta_i < t} / N,  t in (11.25, 22.5, 30)
        median      = median of theta_i, from a histogram (see below)

    ``mtl_rmse``: the evaluation code shared by MTI-Net, ATRC, MTLoRA and
    TADFormer accumulates ``sqrt(theta^2)`` = theta per pixel and reports the
    *mean* angle under the key "rmse". The "Normals (rmse)" columns of those
    papers (e.g. 17.97 for the Swin-T single-task baseline) are therefore mean
    angular errors; ``mtl_rmse`` is that number under an honest name, and
    ``rmse_angle`` is the real root-mean-square, which is always >= the mean.

    Median: an exact median would need every angle kept, which is neither
    bounded in memory nor summable across ranks. Angles are instead counted in
    ``num_bins`` equal bins over [0, 180] degrees (default 18000, i.e. 0.01
    degree wide); the median is the average of the centres of the bins holding
    the two middle order statistics, so it is within half a bin (0.005 degree
    by default) of the exact median.

    Validity: a pixel counts when no target channel equals ``ignore_value``
    (255 marks invalid normals in the PASCAL-Context loader), the target has a
    non-zero norm (NYUD marks missing normals with zeros), and ``mask`` (if
    given) is true. Targets need not be unit vectors: the angle formula is
    invariant to the length of either vector.

    ``update(pred, target, mask=None)``: ``pred`` and ``target`` are
    ``(B, 3, H, W)`` (vector on dim 1); ``mask`` is ``(B, H, W)`` or
    ``(B, 1, H, W)``.
    """

    def __init__(self, ignore_value: Optional[float] = 255.0, num_bins: int = 18000,
                 within: Sequence[float] = (11.25, 22.5, 30.0)) -> None:
        super().__init__()
        if num_bins < 1:
            raise ValueError("num_bins must be >= 1")
        self.ignore_value = ignore_value
        self.num_bins = int(num_bins)
        self.bin_width = 180.0 / self.num_bins
        self.within = tuple(float(t) for t in within)
        self._add_state("count", torch.zeros((), dtype=torch.int64))
        self._add_state("sum_angle", torch.zeros((), dtype=torch.float64))
        self._add_state("sum_sq_angle", torch.zeros((), dtype=torch.float64))
        self._add_state("within_count", torch.zeros(len(self.within), dtype=torch.int64))
        self._add_state("hist", torch.zeros(self.num_bins, dtype=torch.int64))

    @staticmethod
    def angles(pred: Tensor, target: Tensor) -> Tensor:
        """Per-pixel angle in degrees between ``pred`` and ``target`` (vector on dim 1)."""
        dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
        p, g = pred.to(dtype), target.to(dtype)
        cross = torch.linalg.cross(p, g, dim=1).norm(dim=1)
        dot = (p * g).sum(1)
        ang = torch.rad2deg(torch.atan2(cross, dot))
        return torch.where(p.norm(dim=1) > 0, ang, torch.full_like(ang, 90.0))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        if pred.shape != target.shape or pred.dim() < 2 or pred.shape[1] != 3:
            raise ValueError(f"pred and target must both be (B, 3, ...), got {tuple(pred.shape)}, "
                             f"{tuple(target.shape)}")
        self._ensure_device(target.device)
        valid = target.norm(dim=1) > 0
        if self.ignore_value is not None:
            valid &= ~(target == self.ignore_value).any(1)
        if mask is not None:
            if mask.dim() == target.dim():
                mask = mask.squeeze(1)
            valid &= mask.bool()
        ang = self.angles(pred, target)[valid].double()
        bins = (ang / self.bin_width).floor().long().clamp_(0, self.num_bins - 1)
        within = (torch.stack([(ang < t).sum() for t in self.within]) if self.within
                  else torch.zeros(0, dtype=torch.int64))
        self._accumulate(
            count=torch.tensor(ang.numel()),
            sum_angle=ang.sum(),
            sum_sq_angle=(ang * ang).sum(),
            within_count=within,
            hist=torch.bincount(bins, minlength=self.num_bins),
        )

    def _median(self, hist: Tensor, n: int) -> float:
        cum = hist.cumsum(0)
        # 1-based ranks of the two middle order statistics (equal when n is odd).
        ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=cum.dtype)
        b = torch.searchsorted(cum, ranks).double()
        return float(((b + 0.5) * self.bin_width).mean())

    def compute(self) -> dict:
        """Returns ``{"mean", "median", "rmse_angle", "mtl_rmse", "within_<t>"..., "count"}``."""
        s = {k: v.cpu() for k, v in self._current().items()}
        n = int(s["count"])
        if n == 0:
            nan = float("nan")
            out = {"mean": nan, "median": nan, "rmse_angle": nan, "mtl_rmse": nan, "count": 0}
            out.update({f"within_{t:g}": nan for t in self.within})
            return out
        mean = float(s["sum_angle"]) / n
        out = {
            "mean": mean,
            "median": self._median(s["hist"], n),
            "rmse_angle": math.sqrt(float(s["sum_sq_angle"]) / n),
            "mtl_rmse": mean,
            "count": n,
        }
        for t, c in zip(self.within, s["within_count"].tolist()):
            out[f"within_{t:g}"] = c / n
        return out

    def __repr__(self) -> str:
        return f"NormalsError(ignore_value={self.ignore_value}, num_bins={self.num_bins}, within={self.within})"
