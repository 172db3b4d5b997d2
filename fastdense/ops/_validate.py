"""Argument checks shared by the ops' ``check_args``: messages name the argument."""
from __future__ import annotations

from typing import Mapping, Optional

import torch


def shape_str(t: torch.Tensor) -> str:
    """``(2, 3)`` rather than ``torch.Size([2, 3])`` in error messages."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_same_dtype_device(tensors: Mapping[str, Optional[torch.Tensor]], ref_name: str) -> None:
    """Raise unless every tensor (None skipped) has the dtype and device of ``tensors[ref_name]``."""
    ref = tensors[ref_name]
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all tensors must share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")
