"""What every dense task is, per data set: output channels, loss, prediction, metric.

One table, :data:`TASKS`, read by the models (output channels), the trainer
(loss, prediction, metric, primary metric) and the CLI. A data set's tasks
keep the names its loader uses: ``SyntheticScenes`` ("synthetic"),
``PascalContextMT`` ("pascal") and ``NYUDMT`` ("nyud").

The losses of PASCAL-Context and NYUD are MTLoRA's (its released
``get_loss``; docs/papers.md, section 'Swin-T multi-task PEFT'): per-pixel
cross-entropy over the non-ignored pixels (semseg, human parts), L1 on the
unit-normalised normals, HED-style balanced binary cross-entropy for saliency
(positive weight = the batch's fraction of negatives) and edges (fixed
positive weight 0.95), L1 on depth. The synthetic scenes keep the losses the
tiny models were trained with (normalised by all pixels of the batch, see
:mod:`fastdense.engine.losses`).

``loss`` names an entry of :data:`fastdense.engine.losses.LOSS_FUNCTIONS`
(called with ``loss_kwargs``), which keeps this table free of an import
cycle with the loss module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from fastdense import metrics as M

IGNORE_INDEX = 255
# SyntheticScenes.CLASSES (sky, floor, wall, sphere, box, cylinder) and PARTS (none + 6).
SYNTHETIC_SEMSEG_CLASSES = 6
SYNTHETIC_PARTS = 7


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of one data set.

    channels: model output channels. loss / loss_kwargs: the entry of
    ``losses.LOSS_FUNCTIONS`` and its keyword arguments. prediction: how a raw
    output becomes what the metric scores ("argmax" class ids, "unit" normals,
    "sigmoid" probabilities, "clamp0" depth, "identity"). metric: builds the
    streaming metric. primary / higher_is_better: the number that ranks models
    (and its direction). summary: the scalar metric entries reported.
    map_label: the label is (B, H, W) while the output is (B, 1, H, W), so the
    prediction drops the channel axis.
    """

    name: str
    channels: int
    loss: str
    prediction: str
    metric: Callable[[], M.Metric]
    primary: str
    higher_is_better: bool
    summary: tuple
    loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    map_label: bool = False


def _semseg(name: str, classes: int, loss: str, absent: str = "exclude") -> TaskSpec:
    return TaskSpec(name, classes, loss, "argmax", lambda: M.MeanIoU(classes, ignore_index=IGNORE_INDEX, absent=absent),
                    "miou", True, ("miou", "pixel_acc"))


def _edge(name: str, map_label: bool) -> TaskSpec:
    return TaskSpec(name, 1, "balanced_bce", "sigmoid", M.EdgeODSF, "ods_f", True, ("ods_f",),
                    loss_kwargs={"pos_weight": 0.95}, map_label=map_label)


def _normals_mtl(name: str) -> TaskSpec:
    # "mean" is the number the MTL tables print as normals "rmse" (docs/paper-decisions.md).
    return TaskSpec(name, 3, "normals_l1", "unit", M.NormalsError, "mean", False,
                    ("mean", "median", "rmse_angle", "within_11.25", "within_22.5", "within_30"))


def _depth(name: str, loss: str, prediction: str) -> TaskSpec:
    return TaskSpec(name, 1, loss, prediction, M.DepthError, "rmse", False, ("rmse", "abs_rel", "delta1"))


_SYNTHETIC = [
    _semseg("semseg", SYNTHETIC_SEMSEG_CLASSES, "synthetic_semseg"),
    TaskSpec("normal", 3, "synthetic_normal", "unit", lambda: M.NormalsError(num_bins=1800), "mean", False,
             ("mean", "median", "within_11.25")),
    _depth("depth_euclidean", "synthetic_depth", "clamp0"),
    _depth("depth_zbuffer", "synthetic_depth", "clamp0"),
    TaskSpec("saliency", 1, "synthetic_saliency", "sigmoid", M.SaliencyMetrics, "maxf", True, ("maxf", "miou")),
    _edge("edge_texture", map_label=False),
    _edge("edge_occlusion", map_label=False),
    _semseg("parts", SYNTHETIC_PARTS, "synthetic_semseg"),
]
_PASCAL = [
    _semseg("semseg", 21, "cross_entropy", absent="zero"),
    _semseg("human_parts", 7, "cross_entropy", absent="zero"),
    # Saliency is ranked by the threshold-swept mIoU of the MTL tables, maxF reported too.
    TaskSpec("sal", 1, "balanced_bce", "sigmoid", M.SaliencyMetrics, "miou", True, ("miou", "maxf"),
             map_label=True),
    _normals_mtl("normals"),
    _edge("edge", map_label=True),
]
_NYUD = [
    _semseg("semseg", 40, "cross_entropy", absent="zero"),
    _depth("depth", "depth_l1", "identity"),
    _normals_mtl("normals"),
    _edge("edge", map_label=True),
]

#: data set -> task name -> spec.
TASKS: Dict[str, Dict[str, TaskSpec]] = {
    "synthetic": {s.name: s for s in _SYNTHETIC},
    "pascal": {s.name: s for s in _PASCAL},
    "nyud": {s.name: s for s in _NYUD},
}
DATASETS = tuple(TASKS)


def _primary_by_name() -> Dict[str, tuple]:
    # The trainer and the CLI rank by task name alone; that is only sound while a name
    # means the same primary metric in every data set, which this checks at import.
    out: Dict[str, tuple] = {}
    for specs in TASKS.values():
        for name, s in specs.items():
            key = (s.primary, s.higher_is_better)
            if out.setdefault(name, key) != key:
                raise AssertionError(f"task {name!r} has different primary metrics across data sets")
    return out


#: task name -> (primary metric key, higher is better), over all data sets.
PRIMARY: Dict[str, tuple] = _primary_by_name()


def task_spec(task: str, dataset: Optional[str] = None) -> TaskSpec:
    """The spec of ``task`` in ``dataset``; with ``dataset=None``, the first of synthetic,
    pascal, nyud that has the task (so "semseg" means the synthetic scenes' 6 classes:
    pass the data set for PASCAL-Context and NYUD)."""
    if dataset is not None:
        if dataset not in TASKS:
            raise ValueError(f"unknown data set {dataset!r}; data sets: {', '.join(DATASETS)}")
        specs = TASKS[dataset]
        if task not in specs:
            raise ValueError(f"task {task!r} is not a task of {dataset!r}; its tasks: {', '.join(specs)}")
        return specs[task]
    for specs in TASKS.values():
        if task in specs:
            return specs[task]
    known = sorted({t for specs in TASKS.values() for t in specs})
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known)}")


def dataset_of(tasks: Sequence[str]) -> str:
    """The first data set (pascal, nyud, synthetic: the papers' first) that has every task."""
    for name in ("pascal", "nyud", "synthetic"):
        if all(t in TASKS[name] for t in tasks):
            return name
    raise ValueError(f"no data set has all of the tasks {list(tasks)}; "
                     + "; ".join(f"{d}: {', '.join(TASKS[d])}" for d in DATASETS))


def task_channels(tasks: Sequence[str], dataset: Optional[str] = None) -> Dict[str, int]:
    """Output channels per task; ``dataset=None`` picks :func:`dataset_of` ``(tasks)``."""
    dataset = dataset if dataset is not None else dataset_of(tasks)
    return {t: task_spec(t, dataset).channels for t in tasks}


def make_metric(task: str, dataset: Optional[str] = None) -> M.Metric:
    return task_spec(task, dataset).metric()


@torch.no_grad()
def predict(task: str, out: torch.Tensor, dataset: Optional[str] = None) -> torch.Tensor:
    """Raw model output -> the prediction the metric scores: class ids (B,H,W), unit
    normals, depth (clamped at 0 where the spec says so), probabilities."""
    spec = task_spec(task, dataset)
    out = out.float()
    kind = spec.prediction
    if kind == "argmax":
        return out.argmax(1)
    if kind == "unit":
        return F.normalize(out, dim=1)
    if kind == "clamp0":
        return out.clamp(min=0)
    if kind == "sigmoid":
        p = out.sigmoid()
        return p[:, 0] if spec.map_label else p
    return out


def summarize(task: str, result: Mapping, dataset: Optional[str] = None) -> Dict[str, float]:
    """The scalar entries of a metric's compute() (drops per-class/per-threshold tensors)."""
    keep = task_spec(task, dataset).summary
    return {k: float(result[k]) for k in keep if k in result}


__all__ = ["DATASETS", "IGNORE_INDEX", "PRIMARY", "SYNTHETIC_PARTS", "SYNTHETIC_SEMSEG_CLASSES",
           "TASKS", "TaskSpec", "dataset_of", "make_metric", "predict", "summarize", "task_channels", "task_spec"]
