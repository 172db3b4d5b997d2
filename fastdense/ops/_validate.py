"""Argument checks shared by the ops' ``check_args``: messages name the argument."""
from __future__ import annotations

import numbers
import operator
from typing import Mapping, Optional, Sequence

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
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            "all tensors must share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all tensors must be on one device")


def int_list(name: str, value, minimum: int | None = None) -> list[int]:
    """``value`` as a list of ints, or TypeError/ValueError naming ``name``.

    Floats are refused rather than truncated (ranks=[3.7] is a mistake, not 3);
    numpy and torch integer scalars are accepted.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a list of ints, got a {value.dtype} tensor of shape {shape_str(value)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of ints, got {type(value).__name__} {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool):
            raise TypeError(f"{name}[{i}] must be an int, got bool {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int, got {type(v).__name__} {v!r}") from None
        if minimum is not None and out[-1] < minimum:
            raise ValueError(f"{name}[{i}] must be >= {minimum}, got {out[-1]}")
    return out


def float_list(name: str, value) -> list[float]:
    """``value`` as a list of finite-or-not floats, or TypeError naming ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of numbers, got {type(value).__name__} {value!r}")
    return [number(f"{name}[{i}]", v) for i, v in enumerate(value)]


def number(name: str, value) -> float:
    """``value`` as a float, or TypeError naming ``name`` (bools and strings are refused)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def float_tensor(name: str, t, optional: bool = False) -> None:
    """TypeError naming ``name`` unless ``t`` is a floating tensor (or None when ``optional``)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def check_window(value) -> int:
    """A window size: 0 (the whole map) or a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"window must be 0 (whole map) or a positive window size, got {value!r}")
    return value


def check_hw(value, n: int, what: str) -> tuple[int, int]:
    """(H, W) of a token map, checked against its N tokens."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"hw must be a pair of positive ints (H, W), got {value!r}")
    if value[0] * value[1] != n:
        raise ValueError(f"hw = {tuple(value)} gives H·W = {value[0] * value[1]} tokens but {what} has N = {n}")
    return int(value[0]), int(value[1])
