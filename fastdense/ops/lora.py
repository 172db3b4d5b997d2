"""Fused (multi-task) LoRA linear: ``torch.ops.fastdense.mt_lora_linear``.

One call computes the frozen base GEMM once, the shrink of every adapter as
one GEMM over the concatenated A's, and a grouped expand that writes the
shared output and all T task outputs (MTLoRA semantics, see
``reference.mt_lora_linear``).

Tensor contract shared by all backends (2-D inputs, G = 1 + T adapters):

    x        (M, K)       base input (and LoRA input when x_lora is None)
    weight   (N, K)       frozen W0;  bias (N,) or None
    lora_a   (R, K)       A_0; A_1; ...; A_T stacked, R = sum(ranks)
    lora_b   (N, R)       [B_0 | B_1 | ... | B_T]
    ranks    [r_0..r_T]   scales [s_0..s_T]
    x_lora   (M, K)|None  dropped-out LoRA input
    x_tasks  (T, M, K)|None  per-task LoRA inputs (MTLoRA's ``x_tasks``)
    -> out (G, M, N), h (M, R) = the shrink output, saved for backward
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from fastdense.ops import _lora_torch
from fastdense.ops._define import (
    Limit,
    autocast_inputs,
    cpp_backend,
    cuda_backend,
    define_op,
    ext_limit,
    torch_backend,
    triton_backend,
)
from fastdense.ops._validate import check_same_dtype_device, float_list, float_tensor, int_list, number, shape_str


# ----------------------------------------------------------------------------- validation
def check_args(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora=None, x_tasks=None) -> None:
    """Raise TypeError/ValueError naming the bad argument and the expected shape."""
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b,
               "x_lora": x_lora, "x_tasks": x_tasks}
    for name, t in tensors.items():
        float_tensor(name, t, optional=name in ("bias", "x_lora", "x_tasks"))
    if x.dim() < 1:
        raise ValueError("x must have shape (..., K), got a 0-d tensor")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape (N, K={k}) to match x {shape_str(x)}, got {shape_str(weight)}")
    n = weight.shape[0]
    ranks = list(ranks)
    if len(ranks) == 0 or any((not isinstance(r, int)) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive ints (shared first, then tasks), got {ranks}")
    if len(scales) != len(ranks):
        raise ValueError(f"scales must have one entry per adapter ({len(ranks)}), got {len(scales)}")
    r_total = sum(ranks)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (N={n},) to match weight {shape_str(weight)}, got {shape_str(bias)}")
    if tuple(lora_a.shape) != (r_total, k):
        raise ValueError(f"lora_a must have shape (sum(ranks)={r_total}, K={k}) to match ranks {ranks} and "
                         f"x {shape_str(x)}, got {shape_str(lora_a)}")
    if tuple(lora_b.shape) != (n, r_total):
        raise ValueError(f"lora_b must have shape (N={n}, sum(ranks)={r_total}) to match weight "
                         f"{shape_str(weight)} and ranks {ranks}, got {shape_str(lora_b)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {shape_str(x)}, got {shape_str(x_lora)}")
    n_tasks = len(ranks) - 1
    if x_tasks is not None:
        expected = (n_tasks, *x.shape)
        if tuple(x_tasks.shape) != expected:
            raise ValueError(f"x_tasks must have shape (T={n_tasks}, *x.shape) = {expected}, got {shape_str(x_tasks)}")
    check_same_dtype_device(tensors, "x")


# ----------------------------------------------------------------------------- backends and operator
def _ext_forward(*args):
    return tuple(torch.ops.fastdense._mt_lora_fwd(*args))


def _ext_backward(*args):
    return tuple(torch.ops.fastdense._mt_lora_bwd(*args[:-1], list(args[-1])))


_EXT_KERNELS = ("_mt_lora_fwd", "_mt_lora_bwd")


def _padded_rank(x, weight, bias, lora_a, lora_b, ranks, *rest) -> int:
    # The CUDA backward holds a row tile of dh in registers, each adapter's rank rounded up to 4.
    return sum((r + 3) // 4 * 4 for r in ranks)


OP = define_op(
    "mt_lora_linear",
    schema="Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, int[] ranks, float[] scales, "
           "bool shared_in_tasks, Tensor? x_lora, Tensor? x_tasks",
    outputs="Tensor out, Tensor h",
    lead="x",
    differentiable=_lora_torch.GRAD_NAMES,
    grad_outputs=("out",),
    saved=("x", "weight", "bias", "lora_a", "lora_b", "ranks", "scales", "shared_in_tasks", "x_lora", "x_tasks",
           "h"),
    fake=lambda x, weight, bias, lora_a, *rest: (x.new_empty((len(rest[1]), x.shape[0], weight.shape[0])),
                                                 x.new_empty((x.shape[0], lora_a.shape[0]))),
    backends=(
        torch_backend(_lora_torch.forward, _lora_torch.backward),
        cpp_backend(_ext_forward, _ext_backward, kernels=_EXT_KERNELS,
                    dtypes=(torch.float32, torch.float64, torch.bfloat16)),
        cuda_backend(_ext_forward, _ext_backward, kernels=_EXT_KERNELS, limits=(
            Limit("adapters", lambda x, w, b, a, bb, ranks, *r: len(ranks),
                  maximum=ext_limit("lora_cuda_max_adapters")),
            Limit("a total rank (each rounded up to 4)", _padded_rank,
                  maximum=ext_limit("lora_cuda_max_padded_rank")),
        )),
        triton_backend("lora"),
    ),
)


# ----------------------------------------------------------------------------- public API
def mt_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
    *,
    shared_in_tasks: bool = False,
    x_lora: torch.Tensor | None = None,
    x_tasks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared output and all T task outputs of a multi-task LoRA linear in one call.

    ``x`` has shape (..., K); returns (1 + T, ..., N): index 0 is the shared
    output, index t the output of task t. See the module docstring for the
    layout of ``lora_a``/``lora_b`` and ``reference.mt_lora_linear`` for the
    equations. ``shared_in_tasks=True`` is MTLoRA's 'matrixv2'.
    """
    ranks = int_list("ranks", ranks, minimum=1)
    scales = float_list("scales", scales)
    x, weight, bias, lora_a, lora_b, x_lora, x_tasks = autocast_inputs(
        x, weight, bias, lora_a, lora_b, x_lora, x_tasks)
    check_args(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora, x_tasks)
    lead = x.shape[:-1]
    k = x.shape[-1]
    m = math.prod(lead)  # explicit, as reshape cannot infer -1 for empty tensors

    def flat(t):
        return None if t is None else t.reshape(m, k)

    x_tasks_2d = None if x_tasks is None else x_tasks.reshape(x_tasks.shape[0], m, k)
    out, _ = OP(flat(x), weight, bias, lora_a, lora_b, ranks, scales, bool(shared_in_tasks), flat(x_lora), x_tasks_2d)
    return out.reshape(len(ranks), *lead, weight.shape[0])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single LoRA: y = x W0ᵀ + b + s · x_lora Aᵀ Bᵀ, x_lora = dropout(x) or x."""
    if not isinstance(lora_a, torch.Tensor):
        raise TypeError(f"lora_a must be a torch.Tensor, got {type(lora_a).__name__}")
    if lora_a.dim() != 2:
        raise ValueError(f"lora_a must have shape (r, K), got {shape_str(lora_a)}")
    return mt_lora_linear(x, weight, bias, lora_a, lora_b, [lora_a.shape[0]], [number("scale", scale)],
                          x_lora=x_lora)[0]

