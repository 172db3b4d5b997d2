"""Fused TDSS skill-gated transform against what a TDSS user would otherwise run.

Implementations, on each case:

* ``fused``            ``fastdense.ops.skill_gated_transform`` with automatic dispatch
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``tdss-loop``        TDSS-style eager code: h = x W_d once, then a Python loop
                       over tasks of softmax gates, γ/β, GELU and W_u
                       (``reference.skill_gated_transform``)
* ``tdss-loop-compiled``  that function under ``torch.compile`` (marked
                       ``compile``; on CPU only stage 3)

Shapes are Swin-T's at 448² input (tokens 112², 56², 28², 14² at C = 96, 192,
384, 768), batch 8, with TDSS's defaults: T = 4 tasks, R = C/4, M = 10 skills.
Dtype bf16 on CUDA. On CPU the batch is 1 and the dtype fp32, so that each case
takes a few seconds on a 2-core machine.

Modes: ``fwd`` is the forward pass as in training (autograd records the graph);
``fwdbwd`` adds the backward pass for given output gradients into the adapter's
parameters. x is the frozen backbone's layer input (TDSS reads it without
back-propagating into the backbone, see reference.md), so it gets no gradient.

Bytes and FLOPs in ``extra_info`` are the minimum the computation needs, the
same for every implementation: forward reads x and the parameters and writes
the T outputs; backward reads the T output gradients, x and the parameters and
writes the parameter gradients.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from fastdense.ops import _dispatch, reference

OP = "skill_gated_transform"
TASKS, SKILLS = 4, 10
ON_GPU = torch.cuda.is_available()
PARAMS = ("w_down", "w_up", "skills", "w_gamma", "w_beta")


@dataclasses.dataclass(frozen=True)
class Shape:
    stage: int
    side: int  # tokens per image side
    channels: int
    batch: int

    @property
    def rows(self) -> int:
        return self.batch * self.side * self.side

    @property
    def rank(self) -> int:
        return self.channels // 4

    @property
    def id(self) -> str:
        return f"s{self.stage}-{self.side}x{self.side}-C{self.channels}"


SWIN_T_448 = [(1, 112, 96), (2, 56, 192), (3, 28, 384), (4, 14, 768)]
BATCH = 8 if ON_GPU else 1
SHAPES = [Shape(stage, side, c, BATCH) for stage, side, c in SWIN_T_448]


def _compiled_case(shape: Shape) -> bool:
    # torch.compile warms up for tens of seconds per shape and mode on 2 cores.
    return ON_GPU or shape.stage == 3


def _cases():
    for shape in SHAPES:
        for impl in ("fused", *(f"fused-{b}" for b in _dispatch.BACKENDS), "tdss-loop"):
            yield pytest.param(shape, impl, id=f"{shape.id}-{impl}")
        if _compiled_case(shape):
            yield pytest.param(shape, "tdss-loop-compiled", id=f"{shape.id}-tdss-loop-compiled",
                               marks=[pytest.mark.compile, pytest.mark.slow])


def make_inputs(shape: Shape, device, dtype) -> dict:
    c, r = shape.channels, shape.rank

    def randn(*size, std=1.0):
        return (torch.randn(*size, device=device, dtype=torch.float32) * std).to(dtype)

    # W_u random, not its zero init, so no implementation can gain from zeros.
    return {
        "x": randn(shape.batch, shape.side * shape.side, c),
        "w_down": randn(c, r, std=c ** -0.5),
        "w_up": randn(r, c, std=r ** -0.5),
        "skills": randn(SKILLS, r),
        "w_gamma": randn(TASKS, r, SKILLS, std=r ** -0.5),
        "w_beta": randn(TASKS, r, SKILLS, std=r ** -0.5),
        "grad": randn(TASKS, shape.batch, shape.side * shape.side, c),
    }


def cost(shape: Shape, itemsize: int, mode: str) -> tuple[int, int]:
    """(minimal bytes moved, FLOPs) of one call; see the module docstring."""
    n, c, r, m, t = shape.rows, shape.channels, shape.rank, SKILLS, TASKS
    params = 2 * c * r + m * r + 2 * t * r * m
    fwd_elems = n * c + t * n * c + params
    # h; per task the two gate GEMMs, the two skill GEMMs, W_u.
    fwd_flops = 2 * n * c * r + t * (2 * 2 * n * r * m + 2 * 2 * n * m * r + 2 * n * r * c)
    if mode == "fwd":
        return fwd_elems * itemsize, fwd_flops
    bwd_elems = t * n * c + n * c + 2 * params
    # dG and dW_u per task, the gate backward (twice the forward's), dW_d.
    bwd_flops = t * (4 * n * r * c + 2 * (4 * n * r * m + 4 * n * m * r)) + 2 * n * c * r
    return (fwd_elems + bwd_elems) * itemsize, fwd_flops + bwd_flops


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_skill_gated_transform(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    t = make_inputs(shape, device, dtype)
    x = t["x"]
    leaves = [t[k].requires_grad_(True) for k in PARAMS]
    op_args = (x.reshape(shape.rows, -1), *leaves)
    info = {"impl": impl, "mode": mode, "stage": shape.stage, "batch": shape.batch, "tokens": shape.side ** 2,
            "channels": shape.channels, "rank": shape.rank, "skills": SKILLS, "tasks": TASKS}
    if impl.startswith("fused-"):
        info["backend"] = use_backend(OP, impl.split("-", 1)[1], op_args)
    elif impl == "fused":
        info["backend"] = use_backend(OP, None, op_args)

    if impl.startswith("fused"):
        fn_impl = fastdense.ops.skill_gated_transform
    else:
        fn_impl = reference.skill_gated_transform
        if impl.endswith("compiled"):
            torch._dynamo.reset()  # each shape compiles afresh instead of hitting the recompile limit
            fn_impl = torch.compile(fn_impl)

    def forward():
        return fn_impl(x, *leaves)

    def reset():
        for leaf in leaves:
            leaf.grad = None

    def fwd_bwd():
        forward().backward(t["grad"])

    fn = forward if mode == "fwd" else fwd_bwd

    # Guard: an implementation measured on these inputs computes the right thing.
    with torch.no_grad():
        expected = reference.skill_gated_transform(x, *leaves)
    got = forward().detach()
    tol = (3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4) * max(1.0, expected.abs().max().item())
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{impl} differs from the reference by {err:.3e} (tolerance {tol:.1e})"

    bytes_moved, flops = cost(shape, x.element_size(), mode)
    benchmark.group = f"{mode} {shape.id}"
    measure(benchmark, fn, device=device, dtype=dtype, reset=reset if mode == "fwdbwd" else None,
            bytes_moved=bytes_moved, flops=flops, info=info, first_call=True)
