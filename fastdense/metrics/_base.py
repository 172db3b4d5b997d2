"""Base class of the streaming metrics and the threshold-counting helper.

Every metric in :mod:`fastdense.metrics` keeps its whole state as tensors that
are *additive* over pixels or images: sums, counts and histograms. The state of
a dataset split into shards is therefore the element-wise sum of the shards'
states, which is what makes :meth:`Metric.sync` (one ``all_reduce(SUM)`` per
state) and :meth:`Metric.merge` exact. Ratios, means and maxima are formed only
in ``compute()``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class Metric:
    """Streaming metric with additive tensor states.

    Subclasses register their states with :meth:`_add_state` in ``__init__``,
    compute per-batch increments in ``update`` and hand them to
    :meth:`_accumulate`, and read the states in ``compute`` through
    :meth:`_current`.

    ``sync`` keeps the local states untouched and stores the all-reduced copy
    next to them, so calling it twice does not count the other ranks twice;
    the next ``update`` or ``reset`` drops the copy.
    """

    def __init__(self) -> None:
        self._defaults: Dict[str, Tensor] = {}
        self._synced: Optional[Dict[str, Tensor]] = None

    # ------------------------------------------------------------------ states
    def _add_state(self, name: str, default: Tensor) -> None:
        self._defaults[name] = default.clone()
        setattr(self, name, default.clone())

    def _state_names(self):
        return list(self._defaults)

    def _ensure_device(self, device: torch.device) -> None:
        # States follow the data: the first CUDA batch moves them, so users do
        # not have to call .to() before evaluating a model that lives on a GPU.
        if self.device != device:
            self.to(device)

    def _accumulate(self, **increments: Tensor) -> None:
        for name, inc in increments.items():
            state = getattr(self, name)
            state += inc.to(device=state.device, dtype=state.dtype)
        self._synced = None

    def _current(self) -> Dict[str, Tensor]:
        if self._synced is not None:
            return self._synced
        return {name: getattr(self, name) for name in self._defaults}

    @property
    def device(self) -> torch.device:
        return getattr(self, next(iter(self._defaults))).device

    def to(self, device) -> "Metric":
        """Move every state (and its reset value) to ``device``; returns self."""
        device = torch.device(device)
        for name in self._defaults:
            self._defaults[name] = self._defaults[name].to(device)
            setattr(self, name, getattr(self, name).to(device))
        if self._synced is not None:
            self._synced = {k: v.to(device) for k, v in self._synced.items()}
        return self

    def reset(self) -> None:
        """Forget everything seen so far (states back to zero)."""
        for name, default in self._defaults.items():
            setattr(self, name, default.clone())
        self._synced = None

    def state_dict(self) -> Dict[str, Tensor]:
        """Copies of the *local* (this rank's, un-synced) state tensors."""
        return {name: getattr(self, name).clone() for name in self._defaults}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Replace the local states by ``state`` (same names and shapes)."""
        if set(state) != set(self._defaults):
            raise KeyError(f"expected states {sorted(self._defaults)}, got {sorted(state)}")
        for name, value in state.items():
            ref = getattr(self, name)
            if value.shape != ref.shape:
                raise ValueError(f"state {name!r}: shape {tuple(value.shape)} != {tuple(ref.shape)}")
            setattr(self, name, value.to(device=ref.device, dtype=ref.dtype).clone())
        self._synced = None

    def merge(self, other: "Metric") -> "Metric":
        """Add ``other``'s local states into this metric (same type and config)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self._accumulate(**other.state_dict())
        return self

    def sync(self, process_group=None) -> "Metric":
        """All-reduce (SUM) the states over the ranks of ``process_group``.

        A no-op when ``torch.distributed`` is unavailable or not initialised.
        The states must live on a device the group's backend supports (CPU for
        gloo, CUDA for NCCL). Returns self, so ``metric.sync().compute()`` works.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        synced = {}
        for name in self._defaults:
            t = getattr(self, name).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
            synced[name] = t
        self._synced = synced
        return self

    # -------------------------------------------------------------- interface
    def update(self, *args, **kwargs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_thresholds(thresholds, name: str) -> Tensor:
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if bool((t[1:] <= t[:-1]).any()):
        raise ValueError(f"{name} must be strictly increasing")
    return t


def count_above(values: Tensor, thresholds: Tensor, *, inclusive: bool,
                groups: Optional[Tensor] = None, num_groups: int = 1) -> Tensor:
    """c[g, k] = #{i in group g : values_i > t_k}  (``>=`` when ``inclusive``).

    One ``searchsorted`` and one ``bincount`` instead of one comparison per
    threshold: the bucket index ``#{k : t_k < v}`` (or ``<=``) of a value says
    how many thresholds it passes, and the suffix sums of the bucket histogram
    are the counts per threshold. ``thresholds`` must be increasing.
    Returns int64 ``(num_groups, K)``.
    """
    values = values.reshape(-1)
    # Compare in the values' precision, as `pred > 0.2` would: the threshold is
    # rounded to the values' dtype, so ties behave like a plain comparison.
    dtype = values.dtype if values.dtype == torch.float64 else torch.float32
    values = values.to(dtype)
    t = thresholds.to(device=values.device, dtype=dtype)
    k = t.numel()
    idx = torch.searchsorted(t, values.contiguous(), right=inclusive)
    if groups is not None:
        idx = groups.reshape(-1).to(idx.device) * (k + 1) + idx
    hist = torch.bincount(idx, minlength=num_groups * (k + 1)).view(num_groups, k + 1)
    suffix = hist.flip(1).cumsum(1).flip(1)
    return suffix[:, 1:]
