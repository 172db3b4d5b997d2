"""Saliency metrics: max F-measure and the community's threshold-swept IoU."""
from __future__ import annotations

import torch

from fastdense.metrics._base import Metric, Tensor, _check_thresholds, count_above


def _per_image(x: Tensor) -> Tensor:
    # (B, 1, H, W) or (B, H, W) -> (B, H*W): each row is one image.
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    return x.reshape(x.shape[0], -1)


class SaliencyMetrics(Metric):
    """maxF (beta^2 = 0.3) and the threshold-swept IoU of saliency maps.

    ``update(pred, target)``: ``pred`` is the saliency probability in [0, 1],
    ``(B, 1, H, W)`` or ``(B, H, W)``; ``target`` has the same shape, 1 for
    salient (values > 0.5), 0 for background, ``ignore_index`` for pixels that
    count nowhere. Each leading entry is one image.

    **maxF** -- dataset-pooled counts, one set per threshold t in
    ``f_thresholds`` (default 0.05, 0.10, ..., 0.95, the grid of the MTL
    code's beta-F meter), a pixel is predicted salient when ``p >= t``::

        P_t = TP_t / (TP_t + FP_t),   R_t = TP_t / (TP_t + FN_t)
        F_t = (1 + b2) P_t R_t / (b2 P_t + R_t),   b2 = 0.3   (0 when undefined)
        maxF = max_t F_t

    (The MTLoRA code applies a sigmoid to predictions that are already
    probabilities before this sweep, which squeezes them into [0.5, 0.73];
    here the probabilities are thresholded as given.)

    **mIoU** -- the number the MTI-Net/ATRC/MTLoRA/TADFormer tables print as
    "Saliency mIoU". For each threshold t in ``iou_thresholds`` (default
    ``linspace(0.2, 0.9, 15)``, step 0.05) a pixel is salient when ``p > t``;
    each image n gets the foreground IoU::

        J_{n,t} = |S_n ∩ G_n| / |S_n ∪ G_n|    (1 when both sets are empty)

    the "m" is the mean over *images*, and the reported value is the *maximum*
    over thresholds (not a mean over thresholds, not a fg/bg mean)::

        mIoU = max_t (1/N_img) sum_n J_{n,t}

    Its state, the per-threshold sum of J over images plus the image count,
    is additive, so this stays exact under ``sync``. ``miou_pooled`` is the
    dataset-pooled variant, ``max_t TP_t / (TP_t + FP_t + FN_t)``, reported
    alongside for completeness. ``>`` for IoU and ``>=`` for F follow the
    respective community meters; they differ only for predictions exactly on a
    threshold.
    """

    def __init__(self, iou_thresholds=None, f_thresholds=None, beta_sq: float = 0.3,
                 ignore_index: int | None = 255) -> None:
        super().__init__()
        if iou_thresholds is None:
            iou_thresholds = torch.linspace(0.2, 0.9, 15, dtype=torch.float64)
        if f_thresholds is None:
            f_thresholds = torch.arange(1, 20, dtype=torch.float64) * 0.05
        self.iou_thresholds = _check_thresholds(iou_thresholds, "iou_thresholds")
        self.f_thresholds = _check_thresholds(f_thresholds, "f_thresholds")
        self.beta_sq = float(beta_sq)
        self.ignore_index = ignore_index
        ki, kf = self.iou_thresholds.numel(), self.f_thresholds.numel()
        self._add_state("num_images", torch.zeros((), dtype=torch.int64))
        self._add_state("iou_sum", torch.zeros(ki, dtype=torch.float64))
        for name, k in (("iou", ki), ("f", kf)):
            for kind in ("tp", "fp", "fn"):
                self._add_state(f"{name}_{kind}", torch.zeros(k, dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self._ensure_device(target.device)
        p, t = _per_image(pred), _per_image(target)
        b = p.shape[0]
        valid = torch.ones_like(t, dtype=torch.bool) if self.ignore_index is None else t != self.ignore_index
        fg = (t > 0.5) & valid
        img = torch.arange(b, device=p.device).unsqueeze(1).expand_as(p)
        pv, fgv, imgv = p[valid], fg[valid].long(), img[valid]

        # Per image and class (bg/fg): how many pixels pass each IoU threshold.
        above = count_above(pv, self.iou_thresholds, inclusive=False,
                            groups=imgv * 2 + fgv, num_groups=2 * b).view(b, 2, -1)
        n_fg = fg.sum(1, keepdim=True)
        tp, fp = above[:, 1], above[:, 0]
        fn = n_fg - tp
        union = tp + fp + fn
        jac = torch.where(union > 0, tp.double() / union.clamp(min=1).double(),
                          torch.ones_like(tp, dtype=torch.float64))

        above_f = count_above(pv, self.f_thresholds, inclusive=True, groups=fgv, num_groups=2)
        n_fg_all = n_fg.sum()
        self._accumulate(
            num_images=torch.tensor(b),
            iou_sum=jac.sum(0),
            iou_tp=tp.sum(0), iou_fp=fp.sum(0), iou_fn=fn.sum(0),
            f_tp=above_f[1], f_fp=above_f[0], f_fn=n_fg_all - above_f[1],
        )

    def compute(self) -> dict:
        """Returns ``maxf``, ``maxf_threshold``, ``f_per_threshold``, ``precision``,
        ``recall``, ``miou``, ``miou_threshold``, ``miou_per_threshold``,
        ``miou_pooled`` and ``miou_pooled_per_threshold`` (fractions in [0, 1])."""
        s = {k: v.cpu() for k, v in self._current().items()}
        tp, fp, fn = (s[f"f_{k}"].double() for k in ("tp", "fp", "fn"))
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
        den = self.beta_sq * prec + rec
        f = torch.where(den > 0, (1 + self.beta_sq) * prec * rec / den.clamp(min=1e-300), torch.zeros_like(den))
        fi = int(f.argmax())

        n = int(s["num_images"])
        miou_t = s["iou_sum"] / n if n else torch.full_like(s["iou_sum"], float("nan"))
        mi = int(miou_t.argmax()) if n else 0
        itp, ifp, ifn = (s[f"iou_{k}"].double() for k in ("tp", "fp", "fn"))
        iu = itp + ifp + ifn
        pooled = torch.where(iu > 0, itp / iu.clamp(min=1), torch.ones_like(iu))
        return {
            "maxf": float(f[fi]),
            "maxf_threshold": float(self.f_thresholds[fi]),
            "f_per_threshold": f,
            "precision": prec,
            "recall": rec,
            "miou": float(miou_t[mi]),
            "miou_threshold": float(self.iou_thresholds[mi]),
            "miou_per_threshold": miou_t,
            "miou_pooled": float(pooled.max()),
            "miou_pooled_per_threshold": pooled,
        }

    def __repr__(self) -> str:
        return (f"SaliencyMetrics(iou_thresholds={self.iou_thresholds.numel()}, "
                f"f_thresholds={self.f_thresholds.numel()}, beta_sq={self.beta_sq}, ignore_index={self.ignore_index})")
