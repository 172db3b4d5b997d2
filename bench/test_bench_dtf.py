"""TADFormer's TA-module (Dynamic Task Filter between shared LoRA down/up) for all tasks,
against what a TADFormer user would otherwise run. (The TDSS skill-gated
transform is benchmarked in its own file.)

Implementations, on each case:

* ``fused``            ``fastdense.ops.ta_lora_dtf`` with automatic dispatch
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``tadformer-loop``   written like TADFormer's released ``TAModuleLinear`` with
                       its ``DTF`` class: the task inputs concatenated and
                       down-projected in one GEMM, then a Python loop over the
                       tasks: NCHW permute, GAP, 1×1 conv φ, FilterNorm, the
                       grouped-conv trick ``F.conv2d(x.reshape(1, B·r, H, W), θ,
                       groups=B·r)``, permute back; concatenated, up-projected in
                       one GEMM, added to the base output. For the windowed
                       layer the windows become samples (Swin's window_partition).
                       (``fastdense.testing.baselines.tadformer_loop``)
* ``tadformer-loop-compiled``  that function under ``torch.compile`` (marked ``compile``)

Shapes: Swin-T at 448² (tokens 112², 56², 28², 14² at C = 96, 192, 384, 768),
batch 8, T = 4 tasks, rank r ∈ {16, 32, 64}; the attention projection (C → C,
7×7 windows) and fc1 (C → 4C, whole map); bf16 on CUDA. The op starts from the
task inputs f_t and the frozen layer's outputs Φ(f_t) (the frozen GEMM itself is
not part of the TA-module's cost and is the same for every implementation).

On CPU the suite is scaled down so that it takes minutes on a 2-core machine:
batch 1, stages 3 and 4 (28², 14²), r = 32 (r = 16 and 64 on stage 4's fc1),
fp32, the compiled baseline on stage 4's fc1 only.

Modes: ``fwd`` (autograd recording, as in training) and ``fwdbwd`` (plus the
backward pass into f, A, B, φ and the FilterNorm parameters).

Bytes and FLOPs in ``extra_info`` are the minimum the computation needs, the
same for every implementation: forward reads f, the base output and the
parameters and writes the T outputs; backward reads the output gradient and f
and writes df.
"""
from __future__ import annotations

import pytest
import torch

import fastdense
from _cases import (ON_GPU, SWIN_T_448, SwinLayer, assert_computes, impl_params, maybe_compiled, measure_modes, random,
                    stacked)
from fastdense.testing.baselines import tadformer_loop

SUITE = "dtf"
OP = "ta_lora_dtf"
TASKS = 4
K = 3
SCALE = 1.0

if ON_GPU:
    SHAPES = [SwinLayer(st, side, c, 8, layer, r) for st, side, c in SWIN_T_448 for layer in ("proj", "fc1")
              for r in (16, 32, 64)]
else:
    SHAPES = [SwinLayer(st, side, c, 1, layer, 32) for st, side, c in SWIN_T_448[2:] for layer in ("proj", "fc1")]
    SHAPES += [SwinLayer(4, 14, 768, 1, "fc1", r) for r in (16, 64)]


def _window(shape: SwinLayer) -> int:
    """7×7 windows in the attention projection, the whole map in fc1."""
    return 7 if shape.layer == "proj" else 0


def _compiled_case(shape: SwinLayer) -> bool:
    return shape.layer == "fc1" and shape.rank == 32 and (ON_GPU or shape.stage == 4)


def _cases():
    for shape in SHAPES:
        yield from impl_params(shape, ["tadformer-loop"], "tadformer-loop-compiled" if _compiled_case(shape) else None)


# ----------------------------------------------------------------------------- inputs and cost model
def make_inputs(shape: SwinLayer, device, dtype) -> dict:
    c, co, r, kk = shape.channels, shape.out_features, shape.rank, K * K
    randn = random(device, dtype)
    return {
        "f": randn(TASKS, shape.batch, shape.tokens, c),
        "base_out": randn(TASKS, shape.batch, shape.tokens, co),
        "lora_a": randn(r, c, std=c ** -0.5),
        "lora_b": randn(co, r, std=r ** -0.5),  # random, not LoRA's zero init
        "phi_weight": randn(r * kk, r, std=r ** -0.5),
        "phi_bias": randn(r * kk, std=0.1),
        "fn_std": randn(r * kk, std=2 ** 0.5 / K),
        "fn_mean": randn(r * kk),
        "grad": randn(TASKS, shape.batch, shape.tokens, co),
    }


def cost(shape: SwinLayer, itemsize: int, mode: str) -> tuple[int, int]:
    m = TASKS * shape.batch * shape.tokens
    c, co, r = shape.channels, shape.out_features, shape.rank
    params = r * c + co * r + r * r * K * K + 3 * r * K * K
    fwd_elems = m * c + 2 * m * co + params
    fwd_flops = 2 * m * (c * r + r * co + K * K * r)
    if mode == "fwd":
        return fwd_elems * itemsize, fwd_flops
    bwd_elems = m * co + 2 * m * c + 2 * params
    bwd_flops = 2 * m * (2 * c * r + 2 * r * co + 2 * K * K * r)
    return (fwd_elems + bwd_elems) * itemsize, fwd_flops + bwd_flops


# ----------------------------------------------------------------------------- implementations
LEAF_NAMES = ("f", "lora_a", "lora_b", "phi_weight", "phi_bias", "fn_std", "fn_mean")


def fused_impl(t, shape: SwinLayer):
    leaves = {k: t[k].requires_grad_(True) for k in LEAF_NAMES}

    def forward():
        return fastdense.ops.ta_lora_dtf(leaves["f"], t["base_out"], leaves["lora_a"], leaves["lora_b"], SCALE,
                                         (shape.side, shape.side), leaves["phi_weight"], leaves["phi_bias"],
                                         leaves["fn_std"], leaves["fn_mean"], _window(shape))

    return forward, list(leaves.values())


def loop_impl(t, shape: SwinLayer, impl: str):
    leaves = {k: t[k].requires_grad_(True) for k in LEAF_NAMES}
    fn = maybe_compiled(impl, tadformer_loop)

    def forward():
        return fn(leaves["f"], t["base_out"], leaves["lora_a"], leaves["lora_b"], leaves["phi_weight"],
                  leaves["phi_bias"], leaves["fn_std"], leaves["fn_mean"], (shape.side, shape.side), _window(shape),
                  kernel_size=K, scale=SCALE)

    return forward, list(leaves.values())


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_ta_lora_dtf(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    t = make_inputs(shape, device, dtype)
    hw = [shape.side, shape.side]
    op_args = (t["f"], t["base_out"], t["lora_a"], t["lora_b"], SCALE, hw, _window(shape), TASKS, K,
               t["phi_weight"], t["phi_bias"], t["fn_std"], t["fn_mean"], None, None)
    info = {"impl": impl, "mode": mode, "stage": shape.stage, "layer": shape.layer, "batch": shape.batch,
            "tokens": shape.tokens, "in_features": shape.channels, "out_features": shape.out_features,
            "tasks": TASKS, "rank": shape.rank, "window": _window(shape)}
    use_backend(OP, impl, op_args, info)

    if impl.startswith("fused"):
        forward, leaves = fused_impl(t, shape)
    else:
        forward, leaves = loop_impl(t, shape, impl)

    # Guard: what is measured computes the TA-module (against the float reference).
    with torch.no_grad():
        f32 = {k: v.float() for k, v in t.items()}
        expected = fastdense.ops.reference.ta_lora_dtf(
            f32["f"], f32["base_out"], f32["lora_a"], f32["lora_b"], SCALE, tuple(hw), f32["phi_weight"],
            f32["phi_bias"], f32["fn_std"], f32["fn_mean"], _window(shape))
    assert_computes(impl, stacked(forward()).detach(), expected, dtype, low=5e-2, high=1e-3)

    bytes_moved, flops = cost(shape, t["f"].element_size(), mode)
    measure_modes(benchmark, measure, suite=SUITE, case_id=shape.id, mode=mode, forward=forward, leaves=leaves,
                  grad=t["grad"], device=device, dtype=dtype, info=info, bytes_moved=bytes_moved, flops=flops,
                  first_call=True)
