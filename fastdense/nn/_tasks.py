"""The task arguments every multi-task module shares.

Every multi-task module of fastdense takes ``tasks`` -- the task names, or a
task count T (then the names are 0 .. T-1) -- and returns its task outputs as a
``{task: tensor}`` dict, or as one stacked (T, ...) tensor with
``stacked=True`` (the layout the fused ops produce, free to return).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch


def task_names(tasks) -> tuple:
    """``tasks`` (a positive int, or a non-empty sequence of unique names) as a tuple of names."""
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise ValueError(f"tasks must be a positive int or a non-empty sequence of task names, got {tasks!r}")
        return tuple(range(tasks))
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"tasks must be a positive int or a non-empty sequence of task names, got {tasks!r}")
    names = tuple(tasks)
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names!r}")
    return names


def task_outputs(names: Sequence, stacked_out: torch.Tensor, stacked: bool):
    """The (T, ...) tensor itself with ``stacked``, else ``{name: out[t]}``."""
    if stacked:
        return stacked_out
    return dict(zip(names, stacked_out.unbind(0)))


def stack_task_inputs(names: Sequence, x_tasks, shape: tuple, what: str = "x_tasks") -> torch.Tensor:
    """Per-task inputs as one (T, *shape) tensor: a dict keyed by every task, a list of T tensors, or the tensor."""
    t = len(names)
    if isinstance(x_tasks, Mapping):
        missing = [n for n in names if n not in x_tasks]
        if missing or len(x_tasks) != t:
            raise ValueError(f"{what} must have one entry per task {list(names)}, got keys {list(x_tasks)}")
        x_tasks = [x_tasks[n] for n in names]
    if isinstance(x_tasks, (list, tuple)):
        if len(x_tasks) != t:
            raise ValueError(f"{what} must hold T={t} tensors, got {len(x_tasks)}")
        x_tasks = torch.stack(list(x_tasks))
    if not isinstance(x_tasks, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (T, ...), a list of T tensors, a dict of them or None, "
                        f"got {type(x_tasks).__name__}")
    if tuple(x_tasks.shape) != (t, *shape):
        raise ValueError(f"{what} must have shape (T={t}, *x.shape) = {(t, *shape)}, got {tuple(x_tasks.shape)}")
    return x_tasks
