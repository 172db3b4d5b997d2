"""Streaming, distributed-safe evaluation metrics for dense prediction.

Every metric object follows one protocol: ``update(pred, target, ...)`` per
batch, ``compute()`` at the end, ``reset()``, ``state_dict()`` /
``load_state_dict()`` and ``sync(process_group=None)``. States are sums,
counts and histograms only, so ``sync`` (an all-reduce SUM) and ``merge`` give
exactly the single-process result. Inputs are torch tensors on any device; the
states follow the first batch's device.

* :class:`MeanIoU` -- semantic segmentation / human parts.
* :class:`NormalsError` -- surface normals (mean, median, true RMSE, and the
  community's mislabelled "rmse" as ``mtl_rmse``).
* :class:`DepthError` -- depth RMSE, log-RMSE, abs-rel, delta accuracies.
* :class:`SaliencyMetrics` -- saliency maxF (beta^2 = 0.3) and the
  community's threshold-swept mIoU.
* :class:`EdgeODSF` -- odsF with a pixel tolerance (an approximation of seism).
* :func:`vtm_taskonomy_error` / :class:`VTMTaskonomyError` -- VTM's
  Taskonomy-tiny error definitions.
* :func:`delta_m` with :data:`PASCAL_SWIN_T_SINGLE_TASK` and
  :data:`PASCAL_LOWER_IS_BETTER`.
"""
from fastdense.metrics._base import Metric, count_above
from fastdense.metrics.depth import DepthError
from fastdense.metrics.edges import EdgeODSF, disk_max_filter
from fastdense.metrics.multitask import PASCAL_LOWER_IS_BETTER, PASCAL_SWIN_T_SINGLE_TASK, delta_m
from fastdense.metrics.normals import NormalsError
from fastdense.metrics.saliency import SaliencyMetrics
from fastdense.metrics.segmentation import MeanIoU
from fastdense.metrics.vtm import VTMTaskonomyError, vtm_taskonomy_error

__all__ = [
    "DepthError",
    "EdgeODSF",
    "MeanIoU",
    "Metric",
    "NormalsError",
    "PASCAL_LOWER_IS_BETTER",
    "PASCAL_SWIN_T_SINGLE_TASK",
    "SaliencyMetrics",
    "VTMTaskonomyError",
    "count_above",
    "delta_m",
    "disk_max_filter",
    "vtm_taskonomy_error",
]
