"""Which backends the op tests run here, and on which device."""
from __future__ import annotations

import pytest
import torch

from fastdense.ops import _dispatch


def device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"  # interpreter on CPU
    return "cpu"


def backend_params(op: str) -> list:
    """One pytest param per registered backend, skipped with its reasons when unavailable."""
    params = []
    for name, impl in _dispatch.implementations(op).items():
        reasons = impl.machine_reasons()
        marks = [pytest.mark.skip(reason=f"{name} unavailable here: {'; '.join(reasons)}")] if reasons else []
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params
