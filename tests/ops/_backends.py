"""Which backends the op tests run here, and on which device.

The tolerance rule and the backend helpers live in :mod:`fastdense.testing`,
shared with the demo and the benchmarks; what is here needs pytest.
"""
from __future__ import annotations

import pytest
import torch

from fastdense.testing.backends import registered
from fastdense.testing.checks import assert_within_twice_the_reference_error  # noqa: F401  (used by the op tests)


def device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"  # interpreter on CPU
    return "cpu"


def backend_params(op: str) -> list:
    """One pytest param per registered backend, skipped with its reasons when unavailable."""
    params = []
    for name, impl in registered(op):
        reasons = impl.machine_reasons()
        marks = [pytest.mark.skip(reason=f"{name} unavailable here: {'; '.join(reasons)}")] if reasons else []
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_compiled_matches_eager(loss_fn, leaves) -> None:
    """``torch.compile(loss_fn, fullgraph=True)`` gives eager's loss and gradients.

    ``loss_fn`` maps tensors to a scalar loss; eager and compiled each
    differentiate their own copies of ``leaves``. The ``aot_eager`` backend
    traces the op's fake kernel and autograd formula without Inductor's
    codegen, which is what fullgraph tracing of a custom op has to get right.
    """
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_args = [t.clone().requires_grad_(True) for t in leaves]
    comp_args = [t.clone().requires_grad_(True) for t in leaves]
    loss_e = loss_fn(*eager_args)
    loss_c = compiled(*comp_args)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(comp_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)
