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

Backends: ``cpp`` (csrc/cpu/skill_gated_transform.cpp: row tiles, per-thread
parameter-gradient partials, deterministic for a thread count; up to T·N = 4096
rows in fp32/fp64 the W_d and W_u GEMMs run over all rows instead, which took
Swin-T stage 4 forward + backward from 0.93x to 1.15x of the per-task eager
loop, CPU time on 1 thread, measurements in the .cpp), ``triton``
(kernels/skill_gated_transform.py: one row-tile kernel each way, R and M padded to
powers of two >= 16, parameter gradients by fp32 atomics), ``torch``
(_skill_gated_transform_torch.py: batched over tasks). No CUDA kernel: Triton covers GPUs.
"""
from __future__ import annotations

import math

import torch

from fastdense.ops import _skill_gated_transform_torch
from fastdense.ops._define import Limit, autocast_inputs, cpp_backend, define_op, torch_backend, triton_backend
from fastdense.ops._validate import check_same_dtype_device, float_tensor, shape_str

_NAMES = ("x", "w_down", "w_up", "skills", "w_gamma", "w_beta")


# ----------------------------------------------------------------------------- validation
def check_args(x, w_down, w_up, skills, w_gamma, w_beta) -> None:
    """Raise TypeError/ValueError naming the bad argument and the expected shape."""
    tensors = dict(zip(_NAMES, (x, w_down, w_up, skills, w_gamma, w_beta)))
    for name, t in tensors.items():
        float_tensor(name, t)
    if x.dim() < 1:
        raise ValueError("x must have shape (..., C), got a 0-d tensor")
    c = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[0] != c or w_down.shape[1] < 1:
        raise ValueError(f"w_down must have shape (C={c}, R) to match x {shape_str(x)}, got {shape_str(w_down)}")
    r = w_down.shape[1]
    if tuple(w_up.shape) != (r, c):
        raise ValueError(f"w_up must have shape (R={r}, C={c}) to match w_down {shape_str(w_down)}, "
                         f"got {shape_str(w_up)}")
    if skills.dim() != 2 or skills.shape[1] != r or skills.shape[0] < 1:
        raise ValueError(f"skills must have shape (M, R={r}) to match w_down {shape_str(w_down)}, "
                         f"got {shape_str(skills)}")
    m = skills.shape[0]
    if w_gamma.dim() != 3 or w_gamma.shape[0] < 1 or tuple(w_gamma.shape[1:]) != (r, m):
        raise ValueError(f"w_gamma must have shape (T, R={r}, M={m}) with T >= 1 to match w_down "
                         f"{shape_str(w_down)} and skills {shape_str(skills)}, got {shape_str(w_gamma)}")
    if tuple(w_beta.shape) != tuple(w_gamma.shape):
        raise ValueError(f"w_beta must have the shape of w_gamma (T={w_gamma.shape[0]}, R={r}, M={m}), "
                         f"got {shape_str(w_beta)}")
    check_same_dtype_device(tensors, "x")


# ----------------------------------------------------------------------------- backends and operator
def _cpp_forward(*args):
    return tuple(torch.ops.fastdense._skill_adapter_fwd(*args))


def _cpp_backward(*args):
    return tuple(torch.ops.fastdense._skill_adapter_bwd(*args[:-1], list(args[-1])))


# Limits of the Triton kernels (kernels/skill_gated_transform.py): h, γ, β and
# GELU(h_s) of a row tile live in registers as (rows, R padded to a power of two)
# blocks. At R padded to 256 (Swin-T stage 4, R = 192) the backward spills
# registers on sm_90 at every config tried (56 B/thread in bf16, compiled by
# tests/kernels/test_sm90_compile.py), so such ranks run the torch backend on
# GPUs until the backward splits the rank.
TRITON_MAX_RANK = 128
TRITON_MAX_SKILLS = 64

OP = define_op(
    "skill_gated_transform",
    schema="Tensor x, Tensor w_down, Tensor w_up, Tensor skills, Tensor w_gamma, Tensor w_beta",
    outputs="Tensor out, Tensor h",
    lead="x",
    differentiable=_NAMES,
    grad_outputs=("out",),
    saved=(*_NAMES, "h"),
    fake=lambda x, w_down, w_up, skills, w_gamma, w_beta: (
        x.new_empty((w_gamma.shape[0], x.shape[0], x.shape[1])), x.new_empty((x.shape[0], w_down.shape[1]))),
    backends=(
        torch_backend(_skill_gated_transform_torch.forward, _skill_gated_transform_torch.backward),
        cpp_backend(_cpp_forward, _cpp_backward, kernels=("_skill_adapter_fwd", "_skill_adapter_bwd"),
                    dtypes=(torch.float32, torch.float64, torch.bfloat16)),
        triton_backend("skill_gated_transform", limits=(
            Limit("R", lambda x, w_down, *rest: w_down.shape[1], maximum=TRITON_MAX_RANK),
            Limit("M skills", lambda x, w_down, w_up, skills, *rest: skills.shape[0], maximum=TRITON_MAX_SKILLS),
        )),
    ),
)


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
    out, _ = OP(
        x.reshape(n, c), w_down, w_up, skills, w_gamma, w_beta)
    return out.reshape(w_gamma.shape[0], *lead, c)

