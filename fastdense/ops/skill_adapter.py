"""TDSS's skill-gated feature transform for all tasks: ``torch.ops.fastdense.skill_gated_transform``.

TDSA (TDSS §4.2, Eq. 3–7), for every task t at once:

    h   = x W_d                                          (3)  C -> R, shared
    γ̂_t = softmax(h W_γ^t),  β̂_t = softmax(h W_β^t)      (4)  over the M skills
    γ_t = γ̂_t S,  β_t = β̂_t S                           (5)  S: (M, R), shared
    h_s = γ_t ⊙ h + β_t                                  (6)
    x^t = GELU(h_s) W_u                                  (7)  R -> C, shared

One call reads x once, computes the shared h once, and writes the T outputs.

Tensor contract shared by all backends (2-D input, N rows):

    x        (N, C)       layer input
    w_down   (C, R)       W_d          w_up   (R, C)   W_u
    skills   (M, R)       S
    w_gamma  (T, R, M)    W_γ^t        w_beta (T, R, M) W_β^t
    -> out (T, N, C), h (N, R)

Saved for backward: x, the parameters and h = x W_d (N × R, a quarter of x at
TDSS's R = C/4). The gates, γ/β, h_s and GELU(h_s) of all tasks (4·T·N·R +
2·T·N·M numbers) are recomputed from h in the backward pass instead of being
stored. No biases: the paper's equations have none.

Backends: ``cpp`` (csrc/cpu/skill_adapter.cpp: row tiles, per-thread
parameter-gradient partials, deterministic for a thread count), ``triton``
(kernels/skill_adapter.py: one row-tile kernel each way, R and M padded to
powers of two >= 16, parameter gradients by fp32 atomics), ``torch``
(_skill_adapter_torch.py: batched over tasks). No CUDA kernel: Triton covers GPUs.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from fastdense import _ext, _triton
from fastdense.ops import _dispatch, _skill_adapter_torch, reference
from fastdense.ops._custom_op import autocast_inputs, fresh_outputs
from fastdense.ops._validate import check_same_dtype_device, shape_str

OP = "skill_gated_transform"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NAMES = ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta")


# ----------------------------------------------------------------------------- validation
def check_args(x, w_down, w_up, skills, w_gamma, w_beta) -> None:
    """Raise TypeError/ValueError naming the bad argument and the expected shape."""
    tensors = dict(zip(_NAMES, (x, w_down, w_up, skills, w_gamma, w_beta)))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., C), got a 0-d tensor")
    c = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[0] != c or w_down.shape[1] < 1:
        raise ValueError(f"w_down must have shape (C={c}, R) to match x {shape_str(x)}, got {shape_str(w_down)}")
    r = w_down.shape[1]
    if tuple(w_up.shape) != (r, c):
        raise ValueError(f"w_up must have shape (R={r}, C={c}), got {shape_str(w_up)}")
    if skills.dim() != 2 or skills.shape[1] != r or skills.shape[0] < 1:
        raise ValueError(f"skills must have shape (M, R={r}), got {shape_str(skills)}")
    m = skills.shape[0]
    if w_gamma.dim() != 3 or w_gamma.shape[0] < 1 or tuple(w_gamma.shape[1:]) != (r, m):
        raise ValueError(f"w_gamma must have shape (T, R={r}, M={m}) with T >= 1, got {shape_str(w_gamma)}")
    if tuple(w_beta.shape) != tuple(w_gamma.shape):
        raise ValueError(f"w_beta must have the shape of w_gamma (T={w_gamma.shape[0]}, R={r}, M={m}), "
                         f"got {shape_str(w_beta)}")
    check_same_dtype_device(tensors, "x")


# ----------------------------------------------------------------------------- backends
_dispatch.register(OP, "torch", forward=_skill_adapter_torch.forward, backward=_skill_adapter_torch.backward)


def _cpp_input_reasons(x, *rest) -> list[str]:
    return _dispatch.device_dtype_reasons("cpp", x, "cpu", (torch.float32, torch.float64, torch.bfloat16))


def _cpp_forward(*args):
    return tuple(torch.ops.fastdense._skill_adapter_fwd(*args))


def _cpp_backward(*args):
    return tuple(torch.ops.fastdense._skill_adapter_bwd(*args[:-1], list(args[-1])))


_dispatch.register(OP, "cpp", forward=_cpp_forward, backward=_cpp_backward,
                   machine_reasons=_ext.machine_reasons(_ext.cpu_reasons, "CPU", "_skill_adapter_fwd", "_skill_adapter_bwd"),
                   input_reasons=_cpp_input_reasons)

# Limits of the Triton kernels (kernels/skill_adapter.py): h, γ, β and GELU(h_s)
# of a row tile live in registers as (rows, R padded to a power of two) blocks.
TRITON_MAX_RANK = 256
TRITON_MAX_SKILLS = 64


def _triton_input_reasons(x, w_down, w_up, skills, w_gamma, w_beta) -> list[str]:
    reasons = _triton.input_reasons(x)
    if w_down.shape[1] > TRITON_MAX_RANK:
        reasons.append(f"triton supports R <= {TRITON_MAX_RANK}, got {w_down.shape[1]}")
    if skills.shape[0] > TRITON_MAX_SKILLS:
        reasons.append(f"triton supports M <= {TRITON_MAX_SKILLS} skills, got {skills.shape[0]}")
    return reasons


_triton_forward, _triton_backward = _triton.lazy_kernels("skill_adapter")


def _triton_machine_reasons() -> list[str]:
    reasons = _triton.machine_reasons()
    if not reasons and importlib.util.find_spec("fastdense.kernels.skill_adapter") is None:
        reasons.append("fastdense.kernels.skill_adapter is not installed")
    return reasons


_dispatch.register(OP, "triton", forward=_triton_forward, backward=_triton_backward,
                   machine_reasons=_triton_machine_reasons, input_reasons=_triton_input_reasons)


# ----------------------------------------------------------------------------- the operator
@torch.library.custom_op("fastdense::skill_gated_transform", mutates_args=())
def _skill_gated_transform_op(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    skills: torch.Tensor,
    w_gamma: torch.Tensor,
    w_beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, w_down, w_up, skills, w_gamma, w_beta)
    impl = _dispatch.select(OP, x.device.type, *args)
    out, h = impl.forward(*args)
    return out, h


@_skill_gated_transform_op.register_fake
def _(x, w_down, w_up, skills, w_gamma, w_beta):
    n, c = x.shape
    return x.new_empty((w_gamma.shape[0], n, c)), x.new_empty((n, w_down.shape[1]))


@torch.library.custom_op("fastdense::skill_gated_transform_backward", mutates_args=())
def _skill_gated_transform_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    skills: torch.Tensor,
    w_gamma: torch.Tensor,
    w_beta: torch.Tensor,
    h: torch.Tensor,
    needs: list[bool],
    forced: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd_args = (x, w_down, w_up, skills, w_gamma, w_beta)
    # `forced` is the backend forced when the forward ran: autograd may run this
    # on another thread (CUDA), which does not see the forward's context.
    with _dispatch.backend(forced or None):
        impl = _dispatch.select(OP, x.device.type, *fwd_args)
    grads = impl.backward(grad.contiguous(), *fwd_args, h, list(needs))
    return fresh_outputs(grads, needs, x, (grad, h, *fwd_args))


@_skill_gated_transform_backward_op.register_fake
def _(grad, x, w_down, w_up, skills, w_gamma, w_beta, h, needs, forced):
    return tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                 for t, need in zip((x, w_down, w_up, skills, w_gamma, w_beta), needs))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.forced = _dispatch.forced_backend() or ""


def _backward(ctx, grad_out, grad_h):
    *inputs, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.fastdense.skill_gated_transform_backward(grad_out, *inputs, h, needs, ctx.forced)
    return tuple(g if need else None for g, need in zip(grads, needs))


_skill_gated_transform_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def skill_gated_transform(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    skills: torch.Tensor,
    w_gamma: torch.Tensor,
    w_beta: torch.Tensor,
) -> torch.Tensor:
    """All T task outputs x^t of TDSS's TDSA (Eq. 3–7) in one fused call.

    ``x`` (..., C), ``w_down`` (C, R), ``w_up`` (R, C), ``skills`` (M, R),
    ``w_gamma`` and ``w_beta`` (T, R, M). Returns (T, ..., C); index t is
    task t's lateral feature x^t. GELU is the exact (erf) one. See the module
    docstring for what is saved for backward.
    """
    x, w_down, w_up, skills, w_gamma, w_beta = autocast_inputs(x, w_down, w_up, skills, w_gamma, w_beta)
    check_args(x, w_down, w_up, skills, w_gamma, w_beta)
    lead = x.shape[:-1]
    c = x.shape[-1]
    n = math.prod(lead)  # explicit, as reshape cannot infer -1 for empty tensors
    out, _ = torch.ops.fastdense.skill_gated_transform(
        x.reshape(n, c).contiguous(), w_down.contiguous(), w_up.contiguous(), skills.contiguous(),
        w_gamma.contiguous(), w_beta.contiguous())
    return out.reshape(w_gamma.shape[0], *lead, c)


reference_skill_gated_transform = reference.skill_gated_transform
