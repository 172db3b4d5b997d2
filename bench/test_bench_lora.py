"""Fused multi-task LoRA linear against what an MTLoRA user would otherwise run.

Implementations, on each case:

* ``fused``            ``fastdense.ops.mt_lora_linear`` with automatic dispatch
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``mtlora-loop``      written like MTLoRA's ``MTLoRALinear``: the frozen linear
                       once, then a Python loop of per-task ``x Aᵀ Bᵀ s`` GEMMs,
                       returning ``(shared, {task: out})``
                       (``fastdense.testing.baselines.mtlora_loop``)
* ``mtlora-loop-compiled``  that function under ``torch.compile`` (few cases:
                       marked ``compile``)
* ``peft``             one peft LoRA-wrapped ``nn.Linear`` per adapter (shared
                       and each task), i.e. the frozen GEMM runs 1 + T times

Shapes are Swin-T's at 448² input (tokens 112², 56², 28², 14² at C = 96, 192,
384, 768), batch 8, on the attention projection (C→C) and the first MLP
layer (C→4C); T = 4 tasks, shared rank 64, task rank 4, scale 4 (MTLoRA's
tiny_448 configuration). Dtype bf16 on CUDA.

On CPU the suite is scaled down so that ``make bench`` on a 2-core machine
takes a few minutes: batch 1, stages 3 and 4 only (28² and 14² tokens), fp32,
and the compiled baseline only on stage 4's fc1.

Modes: ``fwd`` is the forward pass as in training (autograd records the graph,
nothing is run under no_grad); ``fwdbwd`` adds the backward pass for given
output gradients, into the input and the adapters (W0 and its bias are frozen).

Bytes and FLOPs in ``extra_info`` are the minimum the computation needs, the
same for every implementation of a case, so GB/s is an effective rate:
forward reads x, W0, b, all A's and B's and writes the 1 + T outputs;
backward reads the 1 + T output gradients, x, W0, the A's and B's and writes
dx, dA, dB.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import fastdense
from _cases import (ON_GPU, SWIN_T_448, SwinLayer, assert_computes, impl_params, maybe_compiled, measure_modes, random,
                    stacked)
from fastdense.testing.baselines import mtlora_inputs, mtlora_loop

SUITE = "lora"
OP = "mt_lora_linear"
TASKS = 4
SHARED_RANK, TASK_RANK, SCALE = 64, 4, 4.0
RANKS = [SHARED_RANK] + [TASK_RANK] * TASKS
SCALES = [SCALE] * (1 + TASKS)

STAGES = SWIN_T_448 if ON_GPU else SWIN_T_448[2:]
BATCH = 8 if ON_GPU else 1
SHAPES = [SwinLayer(stage, side, c, BATCH, layer) for stage, side, c in STAGES for layer in ("proj", "fc1")]


def _compiled_case(shape: SwinLayer) -> bool:
    # torch.compile warms up for tens of seconds per shape and mode; the
    # largest layer of each stage is enough to see what compilation buys.
    return shape.layer == "fc1" and (ON_GPU or shape.stage == 4)


def _cases():
    peft_missing = importlib.util.find_spec("peft") is None
    for shape in SHAPES:
        yield from impl_params(shape, ["mtlora-loop"], "mtlora-loop-compiled" if _compiled_case(shape) else None,
                               slow=True)
        yield pytest.param(shape, "peft", id=f"{shape.id}-peft",
                           marks=[pytest.mark.skipif(peft_missing, reason="peft is not installed (pip install peft)")])


# ----------------------------------------------------------------------------- inputs and cost model
def make_inputs(shape: SwinLayer, device, dtype) -> dict:
    return mtlora_inputs(random(device, dtype), batch=shape.batch, tokens=shape.tokens, in_features=shape.channels,
                         out_features=shape.out_features, ranks=RANKS, bias_std=0.02)


def cost(shape: SwinLayer, itemsize: int, mode: str) -> tuple[int, int]:
    """(minimal bytes moved, FLOPs) of one call; see the module docstring."""
    m, k, n, r, g = shape.rows, shape.channels, shape.out_features, sum(RANKS), 1 + TASKS
    fwd_elems = m * k + n * k + n + r * k + n * r + g * m * n
    fwd_flops = 2 * m * (k * n + k * r + r * n)
    if mode == "fwd":
        return fwd_elems * itemsize, fwd_flops
    bwd_elems = g * m * n + m * k + n * k + 2 * (r * k + n * r) + m * k
    bwd_flops = 2 * m * (n * k + 2 * n * r + 2 * r * k)
    return (fwd_elems + bwd_elems) * itemsize, fwd_flops + bwd_flops


# ----------------------------------------------------------------------------- implementations
# Each returns (forward() -> outputs as one (1 + T, ...) tensor or a list of
# them, leaves whose .grad backward fills).
def fused_impl(t):
    x = t["x"].requires_grad_(True)
    a, b = t["lora_a"].requires_grad_(True), t["lora_b"].requires_grad_(True)

    def forward():
        return fastdense.ops.mt_lora_linear(x, t["weight"], t["bias"], a, b, RANKS, SCALES)

    return forward, [x, a, b]


def loop_impl(t, impl: str):
    x = t["x"].requires_grad_(True)
    # One leaf pair per adapter, as MTLoRA holds one nn.Linear pair per task.
    a_list = [a.clone().requires_grad_(True) for a in t["lora_a"].split(RANKS, 0)]
    b_list = [b.clone().requires_grad_(True) for b in t["lora_b"].split(RANKS, 1)]
    fn = maybe_compiled(impl, mtlora_loop)

    def forward():
        shared, tasks = fn(x, t["weight"], t["bias"], a_list, b_list, SCALES)
        return [shared, *tasks.values()]

    return forward, [x, *a_list, *b_list]


class _Holder(nn.Module):
    """The smallest model peft can inject into: one target module named ``linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def peft_impl(t):
    from peft import LoraConfig, get_peft_model

    x = t["x"].requires_grad_(True)
    weight = nn.Parameter(t["weight"], requires_grad=False)
    bias = nn.Parameter(t["bias"], requires_grad=False)
    layers, leaves = [], [x]
    for a, b, s in zip(t["lora_a"].split(RANKS, 0), t["lora_b"].split(RANKS, 1), SCALES):
        base = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        base.weight, base.bias = weight, bias  # every adapter wraps the same frozen W0
        rank = a.shape[0]
        config = LoraConfig(r=rank, lora_alpha=int(s * rank), lora_dropout=0.0, target_modules=["linear"])
        layer = get_peft_model(_Holder(base), config).base_model.model.linear
        layer.to(device=weight.device, dtype=weight.dtype)
        assert layer.scaling["default"] == s
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        layers.append(layer)
        leaves += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def forward():
        return [layer(x) for layer in layers]

    return forward, leaves


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_mt_lora_linear(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    t = make_inputs(shape, device, dtype)
    op_args = (t["x"].reshape(shape.rows, -1), t["weight"], t["bias"], t["lora_a"], t["lora_b"],
               RANKS, SCALES, False, None, None)
    info = {"impl": impl, "mode": mode, "stage": shape.stage, "layer": shape.layer, "batch": shape.batch,
            "tokens": shape.tokens, "in_features": shape.channels, "out_features": shape.out_features,
            "tasks": TASKS, "ranks": RANKS}
    use_backend(OP, impl, op_args, info)

    if impl.startswith("fused"):
        forward, leaves = fused_impl(t)
    elif impl.startswith("mtlora-loop"):
        forward, leaves = loop_impl(t, impl)
    else:
        forward, leaves = peft_impl(t)

    # Guard: an implementation measured on these inputs computes the right thing.
    # Its forward runs with autograd on, as timed, so torch.compile builds one graph, not two.
    with torch.no_grad():
        expected = fastdense.ops.reference.mt_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"],
                                                         t["lora_b"], RANKS, SCALES)
    assert_computes(impl, stacked(forward()).detach(), expected, dtype)

    bytes_moved, flops = cost(shape, t["x"].element_size(), mode)
    measure_modes(benchmark, measure, suite=SUITE, case_id=shape.id, mode=mode, forward=forward, leaves=leaves,
                  grad=t["grad"], device=device, dtype=dtype, info=info, bytes_moved=bytes_moved, flops=flops,
                  first_call=True)
