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
from typing import Optional, Sequence

import torch

from fastdense import _ext, _triton
from fastdense.ops import _dispatch, _lora_torch, reference
from fastdense.ops._custom_op import autocast_inputs, fresh_outputs
from fastdense.ops._validate import check_same_dtype_device, shape_str

OP = "mt_lora_linear"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- validation
def check_args(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora=None, x_tasks=None) -> None:
    """Raise TypeError/ValueError naming the bad argument and the expected shape."""
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b,
               "x_lora": x_lora, "x_tasks": x_tasks}
    for name, t in tensors.items():
        if t is None and name in ("bias", "x_lora", "x_tasks"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., K), got a 0-d tensor")
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
        raise ValueError(f"bias must have shape (N={n},), got {shape_str(bias)}")
    if tuple(lora_a.shape) != (r_total, k):
        raise ValueError(f"lora_a must have shape (sum(ranks)={r_total}, K={k}), got {shape_str(lora_a)}")
    if tuple(lora_b.shape) != (n, r_total):
        raise ValueError(f"lora_b must have shape (N={n}, sum(ranks)={r_total}), got {shape_str(lora_b)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {shape_str(x)}, got {shape_str(x_lora)}")
    n_tasks = len(ranks) - 1
    if x_tasks is not None:
        expected = (n_tasks, *x.shape)
        if tuple(x_tasks.shape) != expected:
            raise ValueError(f"x_tasks must have shape (T={n_tasks}, *x.shape) = {expected}, got {shape_str(x_tasks)}")
    check_same_dtype_device(tensors, "x")


# ----------------------------------------------------------------------------- backends
_dispatch.register(OP, "torch", forward=_lora_torch.forward, backward=_lora_torch.backward)


def _cpp_input_reasons(x, *rest) -> list[str]:
    return _dispatch.device_dtype_reasons("cpp", x, "cpu", (torch.float32, torch.float64, torch.bfloat16))


# Limits of the CUDA kernels (csrc/cuda/mt_lora.cu): adapters and the total
# rank, each rank rounded up to a multiple of 4, bound the shared-memory tiles.
CUDA_MAX_ADAPTERS = 64
CUDA_MAX_PADDED_RANK = 512


def _cuda_input_reasons(x, weight, bias, lora_a, lora_b, ranks, *rest) -> list[str]:
    if x.device.type != "cuda":
        return [f"cuda runs CUDA tensors, got {x.device.type}"]
    reasons = []
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"cuda supports float32/float16/bfloat16, got {x.dtype}")
    if len(ranks) > CUDA_MAX_ADAPTERS:
        reasons.append(f"cuda supports at most {CUDA_MAX_ADAPTERS} adapters, got {len(ranks)}")
    padded = sum((r + 3) // 4 * 4 for r in ranks)
    if padded > CUDA_MAX_PADDED_RANK:
        reasons.append(f"cuda supports a total rank (each rounded up to 4) of at most {CUDA_MAX_PADDED_RANK}, got {padded}")
    return reasons


_EXT_OPS = ("_mt_lora_fwd", "_mt_lora_bwd")


def _ext_forward(*args):
    return tuple(torch.ops.fastdense._mt_lora_fwd(*args))


def _ext_backward(*args):
    return tuple(torch.ops.fastdense._mt_lora_bwd(*args[:-1], list(args[-1])))


_dispatch.register(OP, "cpp", forward=_ext_forward, backward=_ext_backward,
                   machine_reasons=_ext.machine_reasons(_ext.cpu_reasons, "CPU", *_EXT_OPS),
                   input_reasons=_cpp_input_reasons)
_dispatch.register(OP, "cuda", forward=_ext_forward, backward=_ext_backward,
                   machine_reasons=_ext.machine_reasons(_ext.cuda_reasons, "CUDA", *_EXT_OPS),
                   input_reasons=_cuda_input_reasons)


def _triton_input_reasons(x, weight, bias, lora_a, lora_b, ranks, scales, sit, x_lora, x_tasks) -> list[str]:
    return _triton.input_reasons(x)


_triton_forward, _triton_backward = _triton.lazy_kernels("lora")


_dispatch.register(OP, "triton", forward=_triton_forward, backward=_triton_backward,
                   machine_reasons=_triton.machine_reasons, input_reasons=_triton_input_reasons)


# ----------------------------------------------------------------------------- the operator
@torch.library.custom_op("fastdense::mt_lora_linear", mutates_args=())
def _mt_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    shared_in_tasks: bool,
    x_lora: Optional[torch.Tensor],
    x_tasks: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks)
    impl = _dispatch.select(OP, x.device.type, *args)
    out, h = impl.forward(*args)
    return out, h


@_mt_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty((len(ranks), m, n)), x.new_empty((m, lora_a.shape[0]))


@torch.library.custom_op("fastdense::mt_lora_linear_backward", mutates_args=())
def _mt_lora_linear_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    scales: list[float],
    shared_in_tasks: bool,
    x_lora: Optional[torch.Tensor],
    x_tasks: Optional[torch.Tensor],
    h: torch.Tensor,
    needs: list[bool],
    forced: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd_args = (x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks)
    # `forced` is the backend forced when the forward ran: autograd may run this
    # on another thread (CUDA), which does not see the forward's context.
    with _dispatch.backend(forced or None):
        impl = _dispatch.select(OP, x.device.type, *fwd_args)
    grads = impl.backward(grad.contiguous(), *fwd_args, h, list(needs))
    return fresh_outputs(grads, needs, x, (grad, h, *fwd_args))


@_mt_lora_linear_backward_op.register_fake
def _(grad, x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks, h, needs, forced):
    def like(t, need):
        return t.new_empty(t.shape) if (need and t is not None) else x.new_empty(0)

    return (like(x, needs[0]), like(weight, needs[1]), like(bias, needs[2]), like(lora_a, needs[3]),
            like(lora_b, needs[4]), like(x_lora, needs[5]), like(x_tasks, needs[6]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, ranks, scales, shared_in_tasks, x_lora, x_tasks = inputs
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, x_lora, x_tasks, output[1])
    ctx.ranks, ctx.scales, ctx.shared_in_tasks = list(ranks), list(scales), shared_in_tasks
    ctx.mark_non_differentiable(output[1])
    ctx.forced = _dispatch.forced_backend() or ""


def _backward(ctx, grad_out, grad_h):
    x, weight, bias, lora_a, lora_b, x_lora, x_tasks, h = ctx.saved_tensors
    nig = ctx.needs_input_grad
    needs = [nig[0], nig[1], bias is not None and nig[2], nig[3], nig[4],
             x_lora is not None and nig[8], x_tasks is not None and nig[9]]
    grads = torch.ops.fastdense.mt_lora_linear_backward(
        grad_out, x, weight, bias, lora_a, lora_b, ctx.ranks, ctx.scales, ctx.shared_in_tasks,
        x_lora, x_tasks, h, needs, ctx.forced)
    gx, gw, gb, ga, gbb, gxl, gxt = (g if need else None for g, need in zip(grads, needs))
    return gx, gw, gb, ga, gbb, None, None, None, gxl, gxt


_mt_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


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
    ranks = [int(r) for r in ranks]
    scales = [float(s) for s in scales]
    x, weight, bias, lora_a, lora_b, x_lora, x_tasks = autocast_inputs(
        x, weight, bias, lora_a, lora_b, x_lora, x_tasks)
    check_args(x, weight, bias, lora_a, lora_b, ranks, scales, x_lora, x_tasks)
    lead = x.shape[:-1]
    k = x.shape[-1]
    m = math.prod(lead)  # explicit, as reshape cannot infer -1 for empty tensors

    def flat(t):
        return None if t is None else t.reshape(m, k).contiguous()

    x_tasks_2d = None if x_tasks is None else x_tasks.reshape(x_tasks.shape[0], m, k).contiguous()
    out, _ = torch.ops.fastdense.mt_lora_linear(
        flat(x), weight.contiguous(), bias, lora_a.contiguous(), lora_b.contiguous(), ranks, scales,
        bool(shared_in_tasks), flat(x_lora), x_tasks_2d)
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
    if lora_a.dim() != 2:
        raise ValueError(f"lora_a must have shape (r, K), got {tuple(lora_a.shape)}")
    return mt_lora_linear(x, weight, bias, lora_a, lora_b, [lora_a.shape[0]], [scale], x_lora=x_lora)[0]


reference_mt_lora_linear = reference.mt_lora_linear
