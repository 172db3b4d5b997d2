"""Loads the compiled extension ``fastdense._C`` if it was built.

A missing or broken extension is never an ImportError: it is one logged
warning, and every op falls back to the backends that do not need it.
"""
from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("fastdense")

_C = None
load_error: str | None = None

if os.environ.get("FASTDENSE_NO_EXT", "") == "1":
    load_error = "FASTDENSE_NO_EXT=1 is set"
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from fastdense import _C  # type: ignore[attr-defined,no-redef]
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        _C = None
        load_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "fastdense: compiled extension fastdense._C is unavailable (%s); "
            "the cpp/cuda backends are disabled and the torch/triton backends are used instead.",
            load_error,
        )


def available() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def cpu_reasons() -> list[str]:
    """Why the cpp backend cannot run on this machine ([] if it can)."""
    if _C is None:
        return [f"extension fastdense._C not loaded ({load_error})"]
    return []


def cuda_reasons() -> list[str]:
    """Why the cuda backend cannot run on this machine ([] if it can)."""
    import torch

    reasons = []
    if _C is None:
        reasons.append(f"extension fastdense._C not loaded ({load_error})")
    elif not _C.built_with_cuda():
        reasons.append("fastdense._C was built without CUDA kernels (CPU-only torch or no CUDA_HOME at build time)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return reasons


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, dispatch_key: str) -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdense::{op}", dispatch_key)
    except RuntimeError:  # the schema itself is not registered
        return False


def kernel_reasons(op: str, dispatch_key: str) -> list[str]:
    """Why ``fastdense::<op>`` has no ``dispatch_key`` (CPU/CUDA) kernel in the loaded extension."""
    if _C is None or not _has_kernel(op, dispatch_key):
        return [f"fastdense._C has no {dispatch_key} kernel for fastdense::{op} (rebuild the extension)"]
    return []


def machine_reasons(device_reasons, dispatch_key: str, *ops: str):
    """The ``machine_reasons`` of an op's cpp or cuda backend.

    ``device_reasons`` is :func:`cpu_reasons` or :func:`cuda_reasons`; when it has
    none, the reasons are the internal kernels among ``ops`` (``"_mt_lora_fwd"``,
    ...) that the loaded extension has no ``dispatch_key`` kernel for, so an
    extension built before an op was added disables just that op's backend.
    """
    def reasons() -> list[str]:
        return device_reasons() or [r for op in ops for r in kernel_reasons(op, dispatch_key)]

    return reasons


@functools.lru_cache(maxsize=None)
def limits() -> dict:
    """The kernel limits the compiled extension exports ({} when it is not loaded or predates them)."""
    fn = getattr(_C, "limits", None)
    return dict(fn()) if fn is not None else {}


def limit(key: str):
    """One exported kernel limit, or None when the extension does not report it."""
    return limits().get(key)
