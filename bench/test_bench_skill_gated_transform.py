"""Fused TDSS skill-gated transform against what a TDSS user would otherwise run.

Implementations, on each case:

* ``fused``            ``fastdense.ops.skill_gated_transform`` with automatic dispatch
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``tdss-loop``        TDSS-style eager code: h = x W_d once, then a Python loop
                       over tasks of softmax gates, γ/β, GELU and W_u, one
                       output per task (``fastdense.testing.baselines.tdss_loop``)
* ``tdss-loop-compiled``  that function under ``torch.compile`` (marked
                       ``compile``; on CPU only stage 3)

Shapes are Swin-T's at 448² input (tokens 112², 56², 28², 14² at C = 96, 192,
384, 768), batch 8, with TDSS's defaults: T = 4 tasks, R = C/4, M = 10 skills.
Dtype bf16 on CUDA. On CPU the batch is 1 and the dtype fp32, so that each case
takes a few seconds on a 2-core machine.

Modes: ``fwd`` is the forward pass as in training (autograd records the graph);
``fwdbwd`` adds the backward pass for given output gradients into the adapter's
parameters. x is the frozen backbone's layer input (TDSS reads it without
back-propagating into the backbone, see docs/paper-decisions.md, 'TDSS lateral stream'), so it gets no gradient.

Bytes and FLOPs in ``extra_info`` are the minimum the computation needs, the
same for every implementation: forward reads x and the parameters and writes
the T outputs; backward reads the T output gradients, x and the parameters and
writes the parameter gradients.
"""
from __future__ import annotations

import pytest
import torch

import fastdense
from _cases import (ON_GPU, SWIN_T_448, SwinLayer, assert_computes, impl_params, maybe_compiled, measure_modes, random,
                    stacked)
from fastdense.ops import reference
from fastdense.testing.baselines import tdss_loop

SUITE = "skill_gated_transform"
OP = "skill_gated_transform"
TASKS, SKILLS = 4, 10
PARAMS = ("w_down", "w_up", "skills", "w_gamma", "w_beta")

BATCH = 8 if ON_GPU else 1
SHAPES = [SwinLayer(stage, side, c, BATCH) for stage, side, c in SWIN_T_448]


def _rank(shape: SwinLayer) -> int:
    return shape.channels // 4  # TDSS's R = C/4


def _compiled_case(shape: SwinLayer) -> bool:
    # torch.compile warms up for tens of seconds per shape and mode on 2 cores.
    return ON_GPU or shape.stage == 3


def _cases():
    for shape in SHAPES:
        yield from impl_params(shape, ["tdss-loop"], "tdss-loop-compiled" if _compiled_case(shape) else None,
                               slow=True)


def make_inputs(shape: SwinLayer, device, dtype) -> dict:
    c, r = shape.channels, _rank(shape)
    randn = random(device, dtype)
    # W_u random, not its zero init, so no implementation can gain from zeros.
    return {
        "x": randn(shape.batch, shape.tokens, c),
        "w_down": randn(c, r, std=c ** -0.5),
        "w_up": randn(r, c, std=r ** -0.5),
        "skills": randn(SKILLS, r),
        "w_gamma": randn(TASKS, r, SKILLS, std=r ** -0.5),
        "w_beta": randn(TASKS, r, SKILLS, std=r ** -0.5),
        "grad": randn(TASKS, shape.batch, shape.tokens, c),
    }


def cost(shape: SwinLayer, itemsize: int, mode: str) -> tuple[int, int]:
    """(minimal bytes moved, FLOPs) of one call; see the module docstring."""
    n, c, r, m, t = shape.rows, shape.channels, _rank(shape), SKILLS, TASKS
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
    info = {"impl": impl, "mode": mode, "stage": shape.stage, "batch": shape.batch, "tokens": shape.tokens,
            "channels": shape.channels, "rank": _rank(shape), "skills": SKILLS, "tasks": TASKS}
    use_backend(OP, impl, op_args, info)

    fn_impl = fastdense.ops.skill_gated_transform if impl.startswith("fused") else maybe_compiled(impl, tdss_loop)

    def forward():
        return fn_impl(x, *leaves)

    # Guard: an implementation measured on these inputs computes the right thing.
    with torch.no_grad():
        expected = reference.skill_gated_transform(x, *leaves)
    assert_computes(impl, stacked(forward()).detach(), expected, dtype)

    bytes_moved, flops = cost(shape, x.element_size(), mode)
    measure_modes(benchmark, measure, suite=SUITE, case_id=shape.id, mode=mode, forward=forward, leaves=leaves,
                  grad=t["grad"], device=device, dtype=dtype, info=info, bytes_moved=bytes_moved, flops=flops,
                  first_call=True)
