"""Validation of a model's task list, shared by the model families."""
from __future__ import annotations

from typing import Iterable, Sequence


def validate_tasks(tasks: Sequence[str] | str, supported: Iterable[str], kind: str = "task") -> list[str]:
    """``tasks`` as a list (a comma-separated string is accepted, as on the CLI).

    Raises ValueError for an empty list, unknown names (listing the supported
    ones) or repeated names.
    """
    supported = tuple(supported)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"at least one task is needed; supported tasks: {', '.join(supported)}")
    unknown = [t for t in tasks if t not in supported]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; supported tasks: {', '.join(supported)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be unique, got {tasks}")
    return tasks
