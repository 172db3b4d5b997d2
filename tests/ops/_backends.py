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


def _max_error(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_within_twice_the_reference_error(result, ref32, ref_low, floor: float) -> None:
    """flash-attn's low-precision rule, for the output and every gradient.

    ``result``, ``ref32`` and ``ref_low`` are ``(out, {name: grad})`` pairs: the
    backend in the low dtype, the reference in fp32, the reference in the low
    dtype. Each error vs fp32 must be at most twice the low-dtype reference's
    own error, plus ``floor``.
    """
    (out, grads), (out32, grads32), (out_low, grads_low) = result, ref32, ref_low
    assert _max_error(out, out32) <= 2 * _max_error(out_low, out32) + floor
    for name in grads32:
        assert _max_error(grads[name], grads32[name]) <= 2 * _max_error(grads_low[name], grads32[name]) + floor, name
