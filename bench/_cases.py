"""What the op suites share: their cases, the Swin-T layer shapes, the guard, the timed call.

Every op suite (``test_bench_<family>.py``) measures, on each case, the op
with automatic dispatch (``fused``), the op forced onto each backend
(``fused-<backend>``), the baselines a user would otherwise run, and a
baseline under ``torch.compile`` on some cases; in ``fwd`` (the forward as in
training, autograd recording) and ``fwdbwd`` (plus the backward for a given
output gradient) modes.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Iterator, Sequence

import pytest
import torch

from fastdense.ops import BACKENDS

ON_GPU = torch.cuda.is_available()
# Swin-T at 448² input: (stage, tokens per image side, channels C).
SWIN_T_448 = [(1, 112, 96), (2, 56, 192), (3, 28, 384), (4, 14, 768)]


@dataclasses.dataclass(frozen=True)
class SwinLayer:
    """A Swin-T layer an adapter sits on: ``layer`` "proj" (C -> C) or "fc1" (C -> 4C),
    or "" for an adapter of the whole block; ``rank`` is part of the id where a suite varies it."""

    stage: int
    side: int
    channels: int
    batch: int
    layer: str = ""
    rank: int = 0

    @property
    def tokens(self) -> int:
        return self.side * self.side

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def out_features(self) -> int:
        return self.channels * (4 if self.layer == "fc1" else 1)

    @property
    def id(self) -> str:
        layer = f"-{self.layer}" if self.layer else ""
        rank = f"-r{self.rank}" if self.rank else ""
        return f"s{self.stage}-{self.side}x{self.side}-C{self.channels}{layer}{rank}"


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in ms, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - t0)


def impl_params(shape, baselines: Sequence[str], compiled: str | None = None, slow: bool = False) -> Iterator:
    """pytest params ``(shape, impl)``: ``fused``, ``fused-<backend>`` for every
    backend, the ``baselines``, then ``compiled`` (marked ``compile``, and ``slow``)."""
    for impl in ("fused", *(f"fused-{b}" for b in BACKENDS), *baselines):
        yield pytest.param(shape, impl, id=f"{shape.id}-{impl}")
    if compiled is not None:
        marks = [pytest.mark.compile] + ([pytest.mark.slow] if slow else [])
        yield pytest.param(shape, compiled, id=f"{shape.id}-{compiled}", marks=marks)


def backend_request(impl: str) -> tuple[bool, str | None]:
    """(whether ``impl`` runs the fastdense op, the backend it forces or None for automatic dispatch)."""
    if impl.startswith("fused-"):
        return True, impl[len("fused-"):]
    return impl == "fused" or impl.endswith("+fused"), None


def maybe_compiled(impl: str, fn: Callable) -> Callable:
    """``fn``, or ``torch.compile(fn)`` for a ``*-compiled`` implementation; Dynamo is
    reset first, so each case compiles afresh instead of hitting the recompile limit."""
    if not impl.endswith("-compiled"):
        return fn
    torch._dynamo.reset()
    return torch.compile(fn)


def stacked(out) -> torch.Tensor:
    """An implementation's outputs as one (T, ...) tensor (the fused ops already return one)."""
    return out if isinstance(out, torch.Tensor) else torch.stack(list(out))


def random(device, dtype) -> Callable[..., torch.Tensor]:
    """``randn(*size, std=1.0)``: drawn in float32 (the same values for every dtype), then cast."""
    def randn(*size, std=1.0):
        return (torch.randn(*size, device=device, dtype=torch.float32) * std).to(dtype)
    return randn


def assert_computes(impl: str, got: torch.Tensor, expected: torch.Tensor, dtype, low: float = 3e-2,
                    high: float = 1e-4) -> None:
    """The guard of every case: what is measured computes the op. The tolerance is
    ``low`` (bf16/fp16) or ``high`` times the largest expected value (at least 1)."""
    tol = (low if dtype in (torch.bfloat16, torch.float16) else high) * max(1.0, expected.abs().max().item())
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{impl} differs from the reference by {err:.3e} (tolerance {tol:.1e})"


def forward_backward(forward: Callable[[], object], grad: torch.Tensor) -> Callable[[], None]:
    """Run ``forward`` and back-propagate ``grad`` (a stacked tensor, or its slices into a list of outputs)."""
    grads = list(grad.unbind(0))

    def run():
        out = forward()
        if isinstance(out, torch.Tensor):
            out.backward(grad)  # unbinding would make autograd re-stack the gradient: a copy
        else:
            torch.autograd.backward(list(out), grads)

    return run


def measure_modes(benchmark, measure, *, suite: str, case_id: str, mode: str, forward: Callable[[], object],
                  leaves: Iterable[torch.Tensor], grad: torch.Tensor | None, device, dtype, info: dict,
                  fwd_bwd: Callable[[], None] | None = None, **kwargs):
    """Time ``forward`` (mode ``fwd``) or forward and backward (``fwdbwd``; ``.grad`` of
    ``leaves`` cleared untimed before each call) under the group ``"<suite> <mode> <case>"``."""
    leaves = list(leaves)

    def reset():
        for leaf in leaves:
            leaf.grad = None

    benchmark.group = f"{suite} {mode} {case_id}"
    if mode == "fwd":
        fn, reset_fn = forward, None
    else:
        fn, reset_fn = fwd_bwd or forward_backward(forward, grad), reset
    return measure(benchmark, fn, device=device, dtype=dtype, reset=reset_fn, info={**info, "suite": suite},
                   **kwargs)
