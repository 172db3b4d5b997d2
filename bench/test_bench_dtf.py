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

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastdense
from fastdense.ops import _dispatch

OP = "ta_lora_dtf"
TASKS = 4
K = 3
SCALE = 1.0
ON_GPU = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Shape:
    stage: int
    side: int
    channels: int
    layer: str  # "proj" (C -> C, 7x7 windows) or "fc1" (C -> 4C, whole map)
    rank: int
    batch: int

    @property
    def tokens(self) -> int:
        return self.side * self.side

    @property
    def out_features(self) -> int:
        return self.channels * (4 if self.layer == "fc1" else 1)

    @property
    def window(self) -> int:
        return 7 if self.layer == "proj" else 0

    @property
    def id(self) -> str:
        return f"s{self.stage}-{self.side}x{self.side}-C{self.channels}-{self.layer}-r{self.rank}"


SWIN_T_448 = [(1, 112, 96), (2, 56, 192), (3, 28, 384), (4, 14, 768)]
if ON_GPU:
    SHAPES = [Shape(st, side, c, layer, r, 8) for st, side, c in SWIN_T_448 for layer in ("proj", "fc1")
              for r in (16, 32, 64)]
else:
    SHAPES = [Shape(st, side, c, layer, 32, 1) for st, side, c in SWIN_T_448[2:] for layer in ("proj", "fc1")]
    SHAPES += [Shape(4, 14, 768, "fc1", r, 1) for r in (16, 64)]


def _compiled_case(shape: Shape) -> bool:
    return shape.layer == "fc1" and shape.rank == 32 and (ON_GPU or shape.stage == 4)


def _cases():
    for shape in SHAPES:
        for impl in ("fused", *(f"fused-{b}" for b in _dispatch.BACKENDS), "tadformer-loop"):
            yield pytest.param(shape, impl, id=f"{shape.id}-{impl}")
        if _compiled_case(shape):
            yield pytest.param(shape, "tadformer-loop-compiled", id=f"{shape.id}-tadformer-loop-compiled",
                               marks=[pytest.mark.compile])


# ----------------------------------------------------------------------------- inputs and cost model
def make_inputs(shape: Shape, device, dtype) -> dict:
    c, co, r, kk = shape.channels, shape.out_features, shape.rank, K * K

    def randn(*size, std=1.0):
        return (torch.randn(*size, device=device, dtype=torch.float32) * std).to(dtype)

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


def cost(shape: Shape, itemsize: int, mode: str) -> tuple[int, int]:
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


def fused_impl(t, shape: Shape):
    leaves = {k: t[k].requires_grad_(True) for k in LEAF_NAMES}

    def forward():
        return fastdense.ops.ta_lora_dtf(leaves["f"], t["base_out"], leaves["lora_a"], leaves["lora_b"], SCALE,
                                         (shape.side, shape.side), leaves["phi_weight"], leaves["phi_bias"],
                                         leaves["fn_std"], leaves["fn_mean"], shape.window)

    return forward, list(leaves.values())


def _filter_norm(weight, std, mean, r):
    """TADFormer's FilterNorm('channel', running_std=True, running_mean=True)."""
    b = weight.shape[0]
    x = weight.reshape(b, r, -1)
    x = x - x.mean(dim=2).reshape(b, r, 1)
    x = x / (x.std(dim=2).reshape(b, r, 1) + 1e-10)
    return x.reshape(b, -1) * std[None, :] + mean[None, :]


def _dtf(x, phi_weight, phi_bias, std, mean):
    """TADFormer's ``DTF.forward`` on (b, r, h, w) maps."""
    b, c, h, w = x.shape
    weight = F.conv2d(F.adaptive_avg_pool2d(x, 1), phi_weight[:, :, None, None], phi_bias)
    weight = _filter_norm(weight, std, mean, c).reshape(b * c, 1, K, K)
    return F.conv2d(x.reshape(1, -1, h, w), weight, padding=K // 2, groups=b * c).reshape(b, c, h, w)


def tadformer_loop(f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, hw, window):
    """The TA-module as TADFormer's released code runs it (per-task loop, grouped-conv trick)."""
    tasks, b, n, c = f.shape
    h_, w_ = hw
    concat = torch.cat(list(f.unbind(0)), dim=1) @ lora_a.t()  # (B, T·N, r)
    parts = concat.split(n, dim=1)
    filtered = []
    for t in range(tasks):
        x = parts[t].reshape(b, h_, w_, -1).permute(0, 3, 1, 2)
        r = x.shape[1]
        if window:  # Swin's window_partition: every window is a sample
            x = x.reshape(b, r, h_ // window, window, w_ // window, window).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(-1, r, window, window)
        x = _dtf(x, phi_weight, phi_bias, fn_std, fn_mean)
        if window:
            x = x.reshape(b, h_ // window, w_ // window, r, window, window).permute(0, 3, 1, 4, 2, 5)
            x = x.reshape(b, r, h_, w_)
        filtered.append(x.permute(0, 2, 3, 1).reshape(b, n, r))
    up = torch.cat(filtered, dim=1) @ lora_b.t() * SCALE
    return [base_out[t] + up[:, t * n:(t + 1) * n] for t in range(tasks)]


def loop_impl(t, shape: Shape, compiled: bool = False):
    leaves = {k: t[k].requires_grad_(True) for k in LEAF_NAMES}
    fn = torch.compile(tadformer_loop) if compiled else tadformer_loop

    def forward():
        return fn(leaves["f"], t["base_out"], leaves["lora_a"], leaves["lora_b"], leaves["phi_weight"],
                  leaves["phi_bias"], leaves["fn_std"], leaves["fn_mean"], (shape.side, shape.side), shape.window)

    return forward, list(leaves.values())


def _stacked(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.stack(out)


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_ta_lora_dtf(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    t = make_inputs(shape, device, dtype)
    hw = [shape.side, shape.side]
    op_args = (t["f"], t["base_out"], t["lora_a"], t["lora_b"], SCALE, hw, shape.window, TASKS, K,
               t["phi_weight"], t["phi_bias"], t["fn_std"], t["fn_mean"], None, None)
    info = {"impl": impl, "mode": mode, "stage": shape.stage, "layer": shape.layer, "batch": shape.batch,
            "tokens": shape.tokens, "in_features": shape.channels, "out_features": shape.out_features,
            "tasks": TASKS, "rank": shape.rank, "window": shape.window}
    if impl.startswith("fused-"):
        info["backend"] = use_backend(OP, impl.split("-", 1)[1], op_args)
    elif impl == "fused":
        info["backend"] = use_backend(OP, None, op_args)

    if impl.startswith("fused"):
        forward, leaves = fused_impl(t, shape)
    else:
        compiled = impl.endswith("compiled")
        if compiled:
            torch._dynamo.reset()
        forward, leaves = loop_impl(t, shape, compiled=compiled)

    grad_stacked, grads = t["grad"], list(t["grad"].unbind(0))

    def reset():
        for leaf in leaves:
            leaf.grad = None

    def fwd_bwd():
        out = forward()
        if isinstance(out, torch.Tensor):
            out.backward(grad_stacked)
        else:
            torch.autograd.backward(out, grads)

    fn = forward if mode == "fwd" else fwd_bwd

    # Guard: what is measured computes the TA-module (against the float reference).
    with torch.no_grad():
        f32 = {k: v.float() for k, v in t.items()}
        expected = fastdense.ops.reference.ta_lora_dtf(
            f32["f"], f32["base_out"], f32["lora_a"], f32["lora_b"], SCALE, tuple(hw), f32["phi_weight"],
            f32["phi_bias"], f32["fn_std"], f32["fn_mean"], shape.window)
    got = _stacked(forward()).detach()
    tol = (5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3) * max(1.0, expected.abs().max().item())
    err = (got.float() - expected).abs().max().item()
    assert err <= tol, f"{impl} differs from the reference by {err:.3e} (tolerance {tol:.1e})"

    bytes_moved, flops = cost(shape, t["f"].element_size(), mode)
    benchmark.group = f"{mode} {shape.id}"
    measure(benchmark, fn, device=device, dtype=dtype, reset=reset if mode == "fwdbwd" else None,
            bytes_moved=bytes_moved, flops=flops, info=info, first_call=True)
