"""Multi-task relative improvement Δm and the PASCAL-Context Swin-T baselines."""
from __future__ import annotations

from typing import Collection, Mapping, Union

#: Single-task full fine-tuning of Swin-T (ImageNet-1k) on PASCAL-Context,
#: the reference of the Δm columns of MTLoRA, TADFormer and TDSS. semseg,
#: parts and sal are mIoU in percent; normals is the mean angular error in
#: degrees (printed as "rmse" in those papers, see NormalsError.mtl_rmse).
PASCAL_SWIN_T_SINGLE_TASK = {"semseg": 67.21, "parts": 61.93, "sal": 62.35, "normals": 17.97}

#: Tasks of PASCAL_SWIN_T_SINGLE_TASK whose metric is better when lower.
PASCAL_LOWER_IS_BETTER = frozenset({"normals"})


def delta_m(multi: Mapping[str, float], single: Mapping[str, float],
            lower_is_better: Union[Mapping[str, bool], Collection[str]]) -> float:
    """Average relative improvement over the single-task baselines, in percent.

    Over the T tasks of ``multi``::

        Δm = (100 / T) * sum_i (-1)^{l_i} (M_m,i - M_s,i) / M_s,i

    with l_i = 1 when lower is better for task i. ``lower_is_better`` is a
    collection of task names or a ``{task: bool}`` mapping. Every task of
    ``multi`` needs a baseline in ``single`` (extra baselines are ignored). The
    metrics may be in any unit (fractions or percentages) as long as ``multi``
    and ``single`` use the same one per task.

    >>> round(delta_m({"a": 11.0, "b": 9.0}, {"a": 10.0, "b": 10.0}, {"b"}), 6)
    10.0
    """
    if not multi:
        raise ValueError("multi must hold at least one task")
    missing = [t for t in multi if t not in single]
    if missing:
        raise KeyError(f"no single-task baseline for {missing}")
    if isinstance(lower_is_better, Mapping):
        lower = {t for t, v in lower_is_better.items() if v}
    else:
        lower = set(lower_is_better)
    known = set(multi) | set(single)
    unknown = sorted(t for t in (lower_is_better if isinstance(lower_is_better, Mapping) else lower) if t not in known)
    if unknown:
        # A misspelt task name would otherwise silently flip a sign.
        raise KeyError(f"lower_is_better names unknown tasks: {unknown}")
    total = 0.0
    for task, m in multi.items():
        s = float(single[task])
        if s == 0:
            raise ValueError(f"single-task baseline of {task!r} is 0: relative change undefined")
        rel = (float(m) - s) / s
        total += -rel if task in lower else rel
    return 100.0 * total / len(multi)
