"""Whether Triton kernels can run here, and why not."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def machine_reasons() -> list[str]:
    import torch

    err = import_error()
    if err is not None:
        return [f"triton is not importable ({err})"]
    if not torch.cuda.is_available() and not interpreting():
        return ["no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors, slowly)"]
    return []


def machine_reasons_for(module: str):
    """:func:`machine_reasons`, plus whether ``fastdense.kernels.<module>`` is installed."""
    def reasons() -> list[str]:
        out = machine_reasons()
        if not out and _kernels_missing(module):
            out.append(f"fastdense.kernels.{module} is not installed")
        return out

    return reasons


@functools.lru_cache(maxsize=None)
def _kernels_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"fastdense.kernels.{module}") is None


def device_reasons(*tensors) -> list[str]:
    """Triton runs CUDA tensors, or CPU tensors in the interpreter (no bf16 there)."""
    import torch

    reasons = []
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            if t.dtype == torch.bfloat16:
                reasons.append("the Triton interpreter has no bf16")
                break
            continue
        reasons.append(f"tensor on {t.device.type} (Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU)")
        break
    return reasons


def lazy_kernels(module: str):
    """``(forward, backward)`` calling ``fastdense.kernels.<module>``'s host launchers.

    The module is imported on the first call, not at registration: importing
    it imports triton, which a machine that never runs a Triton backend need
    not pay for (or have).
    """
    import importlib

    def forward(*args):
        return importlib.import_module(f"fastdense.kernels.{module}").forward(*args)

    def backward(*args):
        return importlib.import_module(f"fastdense.kernels.{module}").backward(*args)

    forward.__qualname__ = f"kernels.{module}.forward"
    backward.__qualname__ = f"kernels.{module}.backward"
    return forward, backward
