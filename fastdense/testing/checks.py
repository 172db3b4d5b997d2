"""How a fused result is judged against the reference.

The rule (flash-attn's): run the reference twice, in a high precision (the
"truth") and in the dtype under test. The fused result's error against the
truth may be at most twice the low-precision reference's own error, plus a
floor, so that a reference that happens to round exactly does not demand
bit-identical results. The op tests, the demo and the benchmarks' guards all
judge with it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def twice_the_reference_error(reference_error: float, floor: float) -> float:
    return 2.0 * reference_error + floor


# The demo's floor, relative to the magnitude of the result: what a correct
# kernel may differ by where the same-dtype reference is exact.
_RELATIVE_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-10}


def tolerance(reference_error: float, magnitude: float, dtype: torch.dtype) -> float:
    """:func:`twice_the_reference_error` with a floor scaled to the result's largest value."""
    return twice_the_reference_error(reference_error, _RELATIVE_FLOOR.get(dtype, 1e-2) * max(1.0, magnitude))


def assert_within_twice_the_reference_error(result, ref32, ref_low, floor: float) -> None:
    """The rule for the output and every gradient.

    ``result``, ``ref32`` and ``ref_low`` are ``(out, {name: grad})`` pairs: the
    backend in the low dtype, the reference in fp32, the reference in the low
    dtype. Each error vs fp32 must be at most twice the low-dtype reference's
    own error, plus ``floor``.
    """
    (out, grads), (out32, grads32), (out_low, grads_low) = result, ref32, ref_low
    assert max_error(out, out32) <= twice_the_reference_error(max_error(out_low, out32), floor)
    for name in grads32:
        allowed = twice_the_reference_error(max_error(grads_low[name], grads32[name]), floor)
        assert max_error(grads[name], grads32[name]) <= allowed, name


# ----------------------------------------------------------------------------- forward and backward of one call
def run_with_grads(fn: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor], grads: Sequence[str],
                   dtype: torch.dtype, device, upstream: torch.Tensor | None = None):
    """``fn(**inputs)`` on fresh ``dtype`` copies of ``inputs``, then its backward.

    Returns ``(output, {name: gradient} for the names in grads, upstream)``;
    without ``upstream`` a fixed random output gradient is drawn (float64, seed 1).
    """
    leaves = {k: v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(k in grads)
              for k, v in inputs.items()}
    out = fn(**leaves)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(upstream.to(device=device, dtype=dtype))
    return out.detach(), {k: leaves[k].grad for k in grads}, upstream


@dataclasses.dataclass
class Expected:
    """The float64 truth of one computation ("out" and each gradient) and the tolerance of each."""

    truth: dict[str, torch.Tensor]
    tolerance: dict[str, float]
    upstream: torch.Tensor

    @classmethod
    def of(cls, reference: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor], grads: Sequence[str],
           dtype: torch.dtype, device, upstream: torch.Tensor | None = None) -> "Expected":
        """The reference in float64 (the truth) and in ``dtype`` (which sets the tolerances)."""
        out64, grads64, upstream = run_with_grads(reference, inputs, grads, torch.float64, device, upstream)
        out_low, grads_low, _ = run_with_grads(reference, inputs, grads, dtype, device, upstream)
        truth = {"out": out64, **grads64}
        low = {"out": out_low, **grads_low}
        tol = {k: tolerance(max_error(low[k], t), t.abs().max().item(), dtype) for k, t in truth.items()}
        return cls(truth, tol, upstream)

    def errors(self, fn: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor], dtype: torch.dtype,
               device) -> dict[str, float]:
        """Max error of ``fn``'s output and gradients (in ``dtype``) against the truth."""
        out, grads, _ = run_with_grads(fn, inputs, [k for k in self.truth if k != "out"], dtype, device,
                                       self.upstream)
        got = {"out": out, **grads}
        return {k: max_error(got[k], t) for k, t in self.truth.items()}

    def passes(self, errors: Mapping[str, float]) -> bool:
        return all(errors[k] <= self.tolerance[k] for k in errors)
