"""The metrics table that ``train``, ``eval`` and the demo print."""
from __future__ import annotations

_LOWER_IS_BETTER = {"mean", "median", "rmse", "abs_rel"}


def format_metrics_table(result: dict, baseline: dict | None = None) -> str:
    """One row per task and metric; with a baseline, its value and whether the model beats it
    (judged on each task's primary metric)."""
    from fastdense.engine import losses as L

    header = f"  {'task':<16} {'metric':<13} {'model':>10}"
    if baseline is not None:
        header += f" {'baseline':>10}  better"
    lines = [header]
    for task, values in result.items():
        primary = L.PRIMARY[task][0]
        for key, value in values.items():
            row = f"  {task:<16} {key + (' *' if key == primary else ''):<13} {value:>10.4f}"
            if baseline is not None:
                b = baseline[task][key]
                better = value < b if key in _LOWER_IS_BETTER else value > b
                row += f" {b:>10.4f}  {'yes' if better else 'no'}"
            lines.append(row)
    lines.append("  (* primary metric; lower is better for normal mean/median and depth rmse/abs_rel)")
    return "\n".join(lines)
