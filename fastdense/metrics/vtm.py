"""The Taskonomy error of Visual Token Matching (VTM), under its own name.

Few-shot dense-prediction papers built on VTM (e.g. the timestep-selection
paper's Table 1) report, on Taskonomy-tiny, "mIoU" for semantic segmentation,
"mErr" for surface normals and "RMSE" for the other eight tasks. The numbers
come from VTM's evaluation, whose definitions differ from the usual ones in
ways that change the values, so they are reproduced here separately from
:class:`~fastdense.metrics.DepthError` and friends rather than approximated by
them.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdense.metrics._base import Metric, Tensor

#: VTM's Taskonomy task names, grouped by the error VTM computes for them.
VTM_SEMSEG_TASKS = frozenset({"segment_semantic", "semseg"})
VTM_NORMAL_TASKS = frozenset({"normal", "normals"})
VTM_CONTINUOUS_TASKS = frozenset({
    "depth_euclidean", "depth_zbuffer", "edge_texture", "edge_occlusion", "keypoints2d",
    "keypoints3d", "reshading", "principal_curvature",
})


def _kind(task: str) -> str:
    if task in VTM_SEMSEG_TASKS or task.startswith("segment_semantic"):
        return "semseg"
    if task in VTM_NORMAL_TASKS:
        return "normal"
    if task in VTM_CONTINUOUS_TASKS:
        return "continuous"
    raise ValueError(f"unknown Taskonomy task {task!r}; expected one of "
                     f"{sorted(VTM_SEMSEG_TASKS | VTM_NORMAL_TASKS | VTM_CONTINUOUS_TASKS)}")


def _unit_or_zero(v: Tensor) -> Tensor:
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n > 0, v / n.clamp(min=torch.finfo(v.dtype).tiny), torch.zeros_like(v))


class VTMTaskonomyError(Metric):
    """Streaming version of :func:`vtm_taskonomy_error` (same definitions).

    State: the sum of per-image errors and the image count (continuous tasks
    and normals), or per-class intersection and union pixel counts (semseg).
    """

    def __init__(self, task: str, num_classes: int = 1, semseg_threshold: float = 0.2) -> None:
        super().__init__()
        self.task = task
        self.kind = _kind(task)
        self.semseg_threshold = float(semseg_threshold)
        self.num_classes = int(num_classes)
        if self.kind == "semseg":
            self._add_state("inter", torch.zeros(self.num_classes, dtype=torch.int64))
            self._add_state("union", torch.zeros(self.num_classes, dtype=torch.int64))
        else:
            self._add_state("err_sum", torch.zeros((), dtype=torch.float64))
            self._add_state("num_images", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self._ensure_device(target.device)
        b = pred.shape[0]
        if self.kind == "semseg":
            # VTM binarises the sigmoid output at semseg_threshold and does not
            # use the mask for segmentation.
            x = pred if pred.dim() == 4 else pred.reshape(b, 1, -1)
            y = target.reshape(x.shape)
            if x.shape[1] != self.num_classes:
                raise ValueError(f"semseg pred has {x.shape[1]} class channels, metric built for {self.num_classes}")
            s = x > self.semseg_threshold
            g = y >= 0.5
            inter = (s & g).flatten(2).sum((0, 2))
            union = (s | g).flatten(2).sum((0, 2))
            self._accumulate(inter=inter, union=union)
            return

        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        p, y = pred.to(dtype), target.to(dtype)
        if self.kind == "normal":
            if p.dim() != 4 or p.shape[1] != 3:
                raise ValueError("normals must be (B, 3, H, W)")
            pu, gu = _unit_or_zero(p), _unit_or_zero(y)
            # 2 atan2(|a - b|, |a + b|) is the angle between unit vectors a, b
            # (accurate at every angle); it is also what gives a zero vector's
            # pixel 90 degrees against a unit one and 0 against another zero.
            err = torch.rad2deg(2 * torch.atan2((pu - gu).norm(dim=1), (pu + gu).norm(dim=1)))
            m = torch.ones_like(err) if mask is None else (mask[:, 0] if mask.dim() == 4 else mask).to(dtype)
            per_image = (m * err).reshape(b, -1).mean(1)
        else:
            err = (p - y).pow(2).sqrt()
            m = torch.ones_like(err) if mask is None else mask.to(dtype).expand_as(err)
            per_image = (m * err).reshape(b, -1).mean(1)
        self._accumulate(err_sum=per_image.double().sum(), num_images=torch.tensor(b))

    def compute(self) -> float:
        s = {k: v.cpu() for k, v in self._current().items()}
        if self.kind == "semseg":
            iou = s["inter"].double() / s["union"].clamp(min=1).double()
            return float(iou.mean())
        n = int(s["num_images"])
        return float(s["err_sum"]) / n if n else float("nan")

    def __repr__(self) -> str:
        return f"VTMTaskonomyError(task={self.task!r}, num_classes={self.num_classes})"


def vtm_taskonomy_error(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None, *,
                        task: str, semseg_threshold: float = 0.2) -> float:
    """VTM's Taskonomy-tiny error for one task, over a set of images.

    Each leading entry of ``pred``/``target`` is one image; ``mask`` (1 =
    labelled) follows VTM's label masks, e.g. depth masked where
    ``depth_euclidean >= 64500``.

    * **Continuous tasks** (depth_euclidean, depth_zbuffer, edge_texture,
      edge_occlusion, keypoints2d, keypoints3d, reshading,
      principal_curvature; reported as "RMSE"): for image n with E elements
      (channels x pixels)::

          e_n = (1/E) sum_j m_j * sqrt((y_j - yhat_j)^2) = (1/E) sum_j m_j |y_j - yhat_j|
          error = (1/N) sum_n e_n

      i.e. the square root is taken per pixel, before averaging: despite the
      name this is a masked mean *absolute* error, not a root-mean-square. And
      masked-out elements stay in the denominator E (they add 0, they are not
      dropped), so an image with many unlabelled pixels scores lower than its
      error on the labelled ones.
    * **normal** (reported as "mErr"): ``pred`` and ``target`` ``(B, 3, H, W)``
      are each normalised (zero vectors stay zero), the per-pixel angle in
      degrees is ``2 atan2(|p̂ - ĝ|, |p̂ + ĝ|)``, and ``e_n`` is the mean over all
      H x W pixels of ``m * angle`` with ``m = mask[:, 0]`` (again, masked pixels
      stay in the denominator); error = mean of e_n over images. VTM feeds the
      [0, 1]-encoded vectors (labels clipped to [0, 1], sigmoid predictions)
      straight into this without mapping them to [-1, 1]; pass the same
      encoding to reproduce its numbers.
    * **segment_semantic** (reported as "mIoU", higher is better): ``pred`` is
      the sigmoid probability, ``(B, K, H, W)`` with one channel per class
      (VTM fine-tunes and tests each class as its own binary task), ``target``
      the binary masks (>= 0.5 is foreground). With S = ``pred >
      semseg_threshold`` (0.2 in VTM's test config) and G the target, pooled
      over images::

          IoU_k = sum_n |S_nk ∩ G_nk| / max(sum_n |S_nk ∪ G_nk|, 1)
          mIoU  = (1/K) sum_k IoU_k

      A class that is neither predicted nor present scores 0, and the mask is
      not used.

    Returns a float; use :class:`VTMTaskonomyError` to accumulate over batches.
    """
    m = VTMTaskonomyError(task, num_classes=pred.shape[1] if _kind(task) == "semseg" and pred.dim() == 4 else 1,
                          semseg_threshold=semseg_threshold)
    m.update(pred, target, mask)
    return m.compute()
