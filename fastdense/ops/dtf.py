"""TADFormer's Dynamic Task Filter: ``torch.ops.fastdense.ta_lora_dtf`` and ``dynamic_task_filter``.

``ta_lora_dtf`` is the whole TA-module (TADFormer §3.4, Eq. 3–4) for all T
tasks in one call,

    θ_t = FilterNorm(φ(GAP(f_t Aᵀ))),     F̃_t = Φ(f_t) + s · (θ_t ⊛ (f_t Aᵀ)) Bᵀ,

with the frozen layer's output Φ(f_t) passed in (``base_out``), the Dynamic
Task Filter (φ, FilterNorm) shared by the tasks (fastdense's reading, see
/work/shared/reference.md), or the per-task static depthwise filter of the
released code (``NaiveConvFilter``) with ``filter="static"``.
``dynamic_task_filter`` is the DTF alone, θ ⊛ h on tokens h.

Tensor contract of the operators (the public functions below normalise shapes):

    f           (T_f, B, N, C)   task inputs, T_f = T, or T_f = 1: one input shared by the tasks
    base_out    (T_b, B, N, C_o) Φ(f_t); T_b = 1 broadcasts one base output over the tasks
    lora_a      (r, C)  W_down;  lora_b (C_o, r)  W_up;  scale s
    hw          [H, W], N = H · W (raster order);  window 0 (whole map) or w (w × w windows)
    dynamic:    phi_weight (r·k², r), phi_bias (r·k²,)?, fn_std (r·k²,), fn_mean (r·k²,)?
    static:     static_weight (T, r, k, k), static_bias (T, r)?
    -> out (T, B, N, C_o), and for backward h = f Aᵀ (T_f, B, N, r), theta, pooled,
       normed (T_f·B, n_win, r, k²), denom (T_f·B, n_win, r, 1) (empty for the static filter)

Backends: cuda (raw CUDA depthwise-conv kernels, csrc/cuda/dtf_dwconv.cu),
triton (kernels/dtf.py: conv + up-projection + add fused), cpp (csrc/cpu/dtf.cpp),
torch (fastdense/ops/_dtf_torch.py, the grouped-conv formulation). They share the
orchestration of ``_dtf_torch`` and differ in the phase kernels.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from fastdense import _ext, _triton
from fastdense.ops import _dispatch, _dtf_torch, reference
from fastdense.ops._custom_op import autocast_inputs, fresh_outputs
from fastdense.ops._validate import check_same_dtype_device, shape_str
from fastdense.ops._dtf_torch import Geometry, Kernels

OP = "ta_lora_dtf"
OP_DTF = "dynamic_task_filter"
FILTERS = ("dynamic", "static")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_tensor(name, t, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def _check_hw(hw, n: int, what: str) -> tuple[int, int]:
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw)):
        raise ValueError(f"hw must be a pair of positive ints (H, W), got {hw!r}")
    if hw[0] * hw[1] != n:
        raise ValueError(f"hw = {tuple(hw)} gives H·W = {hw[0] * hw[1]} tokens but {what} has N = {n}")
    return int(hw[0]), int(hw[1])


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be 0 (whole map) or a positive window size, got {window!r}")
    return window


def _check_dynamic_params(r, phi_weight, phi_bias, fn_std, fn_mean, kernel_size) -> int:
    for name, t, opt in (("phi_weight", phi_weight, False), ("phi_bias", phi_bias, True),
                         ("fn_std", fn_std, False), ("fn_mean", fn_mean, True)):
        _check_tensor(name, t, optional=opt)
    if phi_weight.dim() != 2 or phi_weight.shape[1] != r:
        raise ValueError(f"phi_weight must have shape (r·k², r={r}), got {shape_str(phi_weight)}")
    k = _dtf_torch.isqrt_kernel(phi_weight.shape[0], r)
    if k == 0:
        raise ValueError(f"phi_weight must have r·k² = {r}·k² rows for a square kernel, got {shape_str(phi_weight)}")
    if kernel_size is not None and kernel_size != k:
        raise ValueError(f"kernel_size={kernel_size} but phi_weight {shape_str(phi_weight)} gives k = {k}")
    if k % 2 == 0 or k < 3:
        raise ValueError(f"the dynamic filter needs an odd kernel size >= 3 (FilterNorm's std over k² taps), got k = {k}")
    rows = r * k * k
    for name, t in (("phi_bias", phi_bias), ("fn_std", fn_std), ("fn_mean", fn_mean)):
        if t is not None and tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must have shape (r·k² = {rows},), got {shape_str(t)}")
    return k


def _check_static_params(tasks, r, static_weight, static_bias, kernel_size) -> int:
    _check_tensor("static_weight", static_weight)
    _check_tensor("static_bias", static_bias, optional=True)
    if static_weight.dim() != 4 or static_weight.shape[:2] != (tasks, r) or static_weight.shape[2] != static_weight.shape[3]:
        raise ValueError(f"static_weight must have shape (T={tasks}, r={r}, k, k), got {shape_str(static_weight)}")
    k = static_weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"static_weight needs an odd kernel size (same padding), got k = {k}")
    if kernel_size is not None and kernel_size != k:
        raise ValueError(f"kernel_size={kernel_size} but static_weight {shape_str(static_weight)} gives k = {k}")
    if static_bias is not None and tuple(static_bias.shape) != (tasks, r):
        raise ValueError(f"static_bias must have shape (T={tasks}, r={r}), got {shape_str(static_bias)}")
    return k


# ----------------------------------------------------------------------------- backends
def _torch_kernels() -> Kernels:
    return _dtf_torch.TORCH_KERNELS


def _ext_kernels() -> Kernels:
    """Phase kernels of fastdense._C (CPU: csrc/cpu/dtf.cpp; CUDA: csrc/cuda/dtf_dwconv_bind.cpp)."""
    ops = torch.ops.fastdense

    def fwd(h, theta, g: Geometry, k):
        return ops._dtf_dwconv_fwd(h, theta, g.height, g.width, _window_arg(g))

    def dh(grad, theta, g: Geometry, k, d_pooled=None):
        return ops._dtf_dwconv_dh(grad, theta, g.height, g.width, _window_arg(g), d_pooled)

    def dtheta(grad, h, g: Geometry, k):
        return ops._dtf_dwconv_dtheta(grad, h, g.height, g.width, _window_arg(g), k)

    def conv_up_add(h, theta, g, k, lora_b, scale, base, bias, tasks, out):
        _dtf_torch.up_add(fwd(h, theta, g, k), bias, lora_b, scale, base, tasks, out)

    def gap(h, g: Geometry):
        return ops._dtf_gap(h, g.height, g.width, _window_arg(g))

    return Kernels(gap=gap, dwconv_forward=fwd, dwconv_dh=dh, dwconv_dtheta=dtheta, conv_up_add=conv_up_add)


def _window_arg(g: Geometry) -> int:
    # Kernels take the window edge; a window covering the map is 0. Windows are square.
    return 0 if (g.nh == 1 and g.nw == 1) else max(g.wh, g.ww)


def _triton_kernels() -> Kernels:
    from fastdense.kernels import dtf as kernels

    return kernels.KERNELS


_KERNELS = {"torch": _torch_kernels, "cpp": _ext_kernels, "cuda": _ext_kernels, "triton": _triton_kernels}
_EXT_OPS = ("_dtf_gap", "_dtf_dwconv_fwd", "_dtf_dwconv_dh", "_dtf_dwconv_dtheta")


def _first_tensor(args):
    return args[0]


def _cpp_input_reasons(*args) -> list[str]:
    return _dispatch.device_dtype_reasons("cpp", _first_tensor(args), "cpu", (torch.float32, torch.float64))


# Limits of the CUDA kernels (csrc/cuda/dtf_dwconv.h): a (sample, window) tile
# with its halo is staged in shared memory, and k is a template parameter.
CUDA_KERNEL_SIZES = (3, 5, 7)


def _kernel_size_of(args, op) -> int:
    if op == OP:
        ks = args[8]
    else:
        ks = args[3]
    return ks


def _cuda_input_reasons_for(op):
    def reasons(*args) -> list[str]:
        x = _first_tensor(args)
        if x.device.type != "cuda":
            return [f"cuda runs CUDA tensors, got {x.device.type}"]
        out = []
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            out.append(f"cuda supports float32/float16/bfloat16, got {x.dtype}")
        k = _kernel_size_of(args, op)
        if k not in CUDA_KERNEL_SIZES:
            out.append(f"cuda supports kernel sizes {CUDA_KERNEL_SIZES}, got {k}")
        return out
    return reasons


def _triton_input_reasons(*args) -> list[str]:
    return _triton.input_reasons(_first_tensor(args))


def _register(op: str, forward, backward) -> None:
    def bind(fn, name):
        return lambda *args: fn(*args, kernels=_KERNELS[name]())

    _dispatch.register(op, "torch", forward=bind(forward, "torch"), backward=bind(backward, "torch"))
    _dispatch.register(op, "cpp", forward=bind(forward, "cpp"), backward=bind(backward, "cpp"),
                       machine_reasons=_ext.machine_reasons(_ext.cpu_reasons, "CPU", *_EXT_OPS),
                       input_reasons=_cpp_input_reasons)
    _dispatch.register(op, "cuda", forward=bind(forward, "cuda"), backward=bind(backward, "cuda"),
                       machine_reasons=_ext.machine_reasons(_ext.cuda_reasons, "CUDA", *_EXT_OPS),
                       input_reasons=_cuda_input_reasons_for(op))
    _dispatch.register(op, "triton", forward=bind(forward, "triton"), backward=bind(backward, "triton"),
                       machine_reasons=_triton.machine_reasons, input_reasons=_triton_input_reasons)


_register(OP, _dtf_torch.forward, _dtf_torch.backward)
_register(OP_DTF, _dtf_torch.dtf_forward, _dtf_torch.dtf_backward)


# ----------------------------------------------------------------------------- helpers for both operators
def _filter_shapes(samples, hw, window, r, k, dynamic):
    nwin = _dtf_torch.num_windows(hw, window)
    if not dynamic:
        return (0,), (0,), (0,), (0,)
    return (samples, nwin, r, k * k), (samples, nwin, r), (samples, nwin, r, k * k), (samples, nwin, r, 1)


# ----------------------------------------------------------------------------- the fused operator
@torch.library.custom_op("fastdense::ta_lora_dtf", mutates_args=())
def _ta_lora_dtf_op(
    f: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
    hw: list[int], window: int, num_tasks: int, kernel_size: int,
    phi_weight: Optional[torch.Tensor], phi_bias: Optional[torch.Tensor], fn_std: Optional[torch.Tensor],
    fn_mean: Optional[torch.Tensor], static_weight: Optional[torch.Tensor], static_bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (f, base_out, lora_a, lora_b, scale, list(hw), window, num_tasks, kernel_size,
            phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias)
    impl = _dispatch.select(OP, f.device.type, *args)
    outs = impl.forward(*args)
    return fresh_outputs(outs, [True] * 6, f, args)  # theta etc. may be empty; never aliases


@_ta_lora_dtf_op.register_fake
def _(f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
      phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias):
    tf, b, n, _ = f.shape
    r = lora_a.shape[0]
    shapes = _filter_shapes(tf * b, hw, window, r, kernel_size, static_weight is None)
    return (f.new_empty((num_tasks, b, n, lora_b.shape[0])), f.new_empty((tf, b, n, r)),
            *(f.new_empty(s) for s in shapes))


@torch.library.custom_op("fastdense::ta_lora_dtf_backward", mutates_args=())
def _ta_lora_dtf_backward_op(
    grad: torch.Tensor, f: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, hw: list[int], window: int, num_tasks: int, kernel_size: int,
    phi_weight: Optional[torch.Tensor], phi_bias: Optional[torch.Tensor], fn_std: Optional[torch.Tensor],
    fn_mean: Optional[torch.Tensor], static_weight: Optional[torch.Tensor], static_bias: Optional[torch.Tensor],
    h: torch.Tensor, theta: torch.Tensor, pooled: torch.Tensor, normed: torch.Tensor, denom: torch.Tensor,
    needs: list[bool], forced: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd_args = (f, base_out, lora_a, lora_b, scale, list(hw), window, num_tasks, kernel_size,
                phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias)
    # `forced` is the backend forced at forward time: autograd may run this on
    # another thread, which does not see the forward's context.
    with _dispatch.backend(forced or None):
        impl = _dispatch.select(OP, f.device.type, *fwd_args)
    grads = impl.backward(grad.contiguous(), *fwd_args, h, theta, pooled, normed, denom, list(needs))
    return fresh_outputs(grads, needs, f, (grad, h, theta, pooled, normed, denom, *fwd_args))


@_ta_lora_dtf_backward_op.register_fake
def _(grad, f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
      phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias, h, theta, pooled, normed, denom,
      needs, forced):
    inputs = (f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias)
    return tuple(t.new_empty(t.shape) if (need and t is not None) else f.new_empty(0)
                 for t, need in zip(inputs, needs))


def _setup_context(ctx, inputs, output):
    (f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
     phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias) = inputs
    _, h, theta, pooled, normed, denom = output
    ctx.save_for_backward(f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean,
                          static_weight, static_bias, h, theta, pooled, normed, denom)
    ctx.config = (float(scale), list(hw), int(window), int(num_tasks), int(kernel_size))
    ctx.mark_non_differentiable(*output[1:])
    ctx.forced = _dispatch.forced_backend() or ""


def _backward(ctx, grad_out, *unused):
    (f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias,
     h, theta, pooled, normed, denom) = ctx.saved_tensors
    scale, hw, window, num_tasks, kernel_size = ctx.config
    nig = ctx.needs_input_grad
    tensors = (f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias)
    index = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14)
    needs = [t is not None and bool(nig[i]) for t, i in zip(tensors, index)]
    grads = torch.ops.fastdense.ta_lora_dtf_backward(
        grad_out, f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
        phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias, h, theta, pooled, normed, denom,
        needs, ctx.forced)
    g = [gr if need else None for gr, need in zip(grads, needs)]
    return (g[0], g[1], g[2], g[3], None, None, None, None, None, g[4], g[5], g[6], g[7], g[8], g[9])


_ta_lora_dtf_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the DTF alone
@torch.library.custom_op("fastdense::dynamic_task_filter", mutates_args=())
def _dtf_op(
    h: torch.Tensor, hw: list[int], window: int, kernel_size: int, phi_weight: torch.Tensor,
    phi_bias: Optional[torch.Tensor], fn_std: torch.Tensor, fn_mean: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (h, list(hw), window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean)
    impl = _dispatch.select(OP_DTF, h.device.type, *args)
    outs = impl.forward(*args)
    return fresh_outputs(outs, [True] * 5, h, args)


@_dtf_op.register_fake
def _(h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean):
    s, _, r = h.shape
    shapes = _filter_shapes(s, hw, window, r, kernel_size, True)
    return (h.new_empty(h.shape), *(h.new_empty(sh) for sh in shapes))


@torch.library.custom_op("fastdense::dynamic_task_filter_backward", mutates_args=())
def _dtf_backward_op(
    grad: torch.Tensor, grad_theta: Optional[torch.Tensor], h: torch.Tensor, hw: list[int], window: int,
    kernel_size: int, phi_weight: torch.Tensor, phi_bias: Optional[torch.Tensor], fn_std: torch.Tensor,
    fn_mean: Optional[torch.Tensor], theta: torch.Tensor, pooled: torch.Tensor, normed: torch.Tensor,
    denom: torch.Tensor, needs: list[bool], forced: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd_args = (h, list(hw), window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean)
    with _dispatch.backend(forced or None):
        impl = _dispatch.select(OP_DTF, h.device.type, *fwd_args)
    grads = impl.backward(grad.contiguous(), None if grad_theta is None else grad_theta.contiguous(),
                          h, list(hw), window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean,
                          theta, pooled, normed, denom, list(needs))
    return fresh_outputs(grads, needs, h,
                         (grad, grad_theta, h, phi_weight, phi_bias, fn_std, fn_mean, theta, pooled, normed, denom))


@_dtf_backward_op.register_fake
def _(grad, grad_theta, h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean,
      theta, pooled, normed, denom, needs, forced):
    inputs = (h, phi_weight, phi_bias, fn_std, fn_mean)
    return tuple(t.new_empty(t.shape) if (need and t is not None) else h.new_empty(0)
                 for t, need in zip(inputs, needs))


def _dtf_setup_context(ctx, inputs, output):
    h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean = inputs
    _, theta, pooled, normed, denom = output
    ctx.save_for_backward(h, phi_weight, phi_bias, fn_std, fn_mean, theta, pooled, normed, denom)
    ctx.config = (list(hw), int(window), int(kernel_size))
    ctx.mark_non_differentiable(pooled, normed, denom)
    ctx.forced = _dispatch.forced_backend() or ""


def _dtf_backward(ctx, grad_out, grad_theta, *unused):
    h, phi_weight, phi_bias, fn_std, fn_mean, theta, pooled, normed, denom = ctx.saved_tensors
    hw, window, kernel_size = ctx.config
    nig = ctx.needs_input_grad
    tensors = (h, phi_weight, phi_bias, fn_std, fn_mean)
    needs = [t is not None and bool(nig[i]) for t, i in zip(tensors, (0, 4, 5, 6, 7))]
    if grad_out is None:
        grad_out = torch.zeros_like(h)
    grads = torch.ops.fastdense.dynamic_task_filter_backward(
        grad_out, grad_theta, h, hw, window, kernel_size, phi_weight, phi_bias, fn_std, fn_mean,
        theta, pooled, normed, denom, needs, ctx.forced)
    g = [gr if need else None for gr, need in zip(grads, needs)]
    return g[0], None, None, None, g[1], g[2], g[3], g[4]


_dtf_op.register_autograd(_dtf_backward, setup_context=_dtf_setup_context)


# ----------------------------------------------------------------------------- public API
def _contig(t):
    return None if t is None else t.contiguous()


def ta_lora_dtf(
    f: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    hw: Sequence[int],
    phi_weight: torch.Tensor | None = None,
    phi_bias: torch.Tensor | None = None,
    fn_std: torch.Tensor | None = None,
    fn_mean: torch.Tensor | None = None,
    window: int = 0,
    *,
    filter: str = "dynamic",
    static_weight: torch.Tensor | None = None,
    static_bias: torch.Tensor | None = None,
    num_tasks: int | None = None,
    kernel_size: int | None = None,
) -> torch.Tensor:
    """TADFormer's TA-module for all T tasks (Eq. 3–4); returns (T, B, N, C_out).

    ``f`` is (T, B, N, C), one input per task, or (B, N, C), one input read by
    every task (then ``num_tasks`` says T, unless ``base_out`` is 4-D).
    ``base_out`` is Φ(f_t): (T, B, N, C_out), or (B, N, C_out) broadcast over
    the tasks (the released code adds Φ of the shared input to every task).
    ``filter="dynamic"``: θ_t = FilterNorm(φ(GAP(f_t Aᵀ))) with φ/FilterNorm
    parameters shared by the tasks; ``filter="static"``: the per-task static
    depthwise filter ``static_weight`` (T, r, k, k) (+ ``static_bias`` (T, r)).
    ``window`` > 0 runs the conv on non-overlapping window × window windows.
    """
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias = autocast_inputs(
        f, base_out, lora_a, lora_b, phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias)
    for name, t in (("f", f), ("base_out", base_out), ("lora_a", lora_a), ("lora_b", lora_b)):
        _check_tensor(name, t)
    if f.dim() not in (3, 4):
        raise ValueError(f"f must have shape (T, B, N, C) or, shared by the tasks, (B, N, C); got {shape_str(f)}")
    if base_out.dim() not in (3, 4):
        raise ValueError(f"base_out must have shape (T, B, N, C_out) or (B, N, C_out); got {shape_str(base_out)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {scale!r}")
    tasks = f.shape[0] if f.dim() == 4 else (base_out.shape[0] if base_out.dim() == 4 else num_tasks)
    if tasks is None:
        raise ValueError("num_tasks is required when both f and base_out are shared by the tasks (3-D)")
    if num_tasks is not None and num_tasks != tasks:
        raise ValueError(f"num_tasks={num_tasks} but the inputs have T = {tasks} tasks")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {tasks!r}")
    f4 = f if f.dim() == 4 else f.unsqueeze(0)
    b4 = base_out if base_out.dim() == 4 else base_out.unsqueeze(0)
    _, batch, n, c = f4.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != c:
        raise ValueError(f"lora_a must have shape (r, C={c}), got {shape_str(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[1] != r:
        raise ValueError(f"lora_b must have shape (C_out, r={r}), got {shape_str(lora_b)}")
    cout = lora_b.shape[0]
    if b4.shape[0] not in (1, tasks) or b4.shape[1:] != (batch, n, cout):
        raise ValueError(f"base_out must have shape (T={tasks}, B={batch}, N={n}, C_out={cout}) "
                         f"or (B, N, C_out); got {shape_str(base_out)}")
    hw = _check_hw(hw, n, "f")
    window = _check_window(window)
    if filter == "dynamic":
        if static_weight is not None or static_bias is not None:
            raise ValueError("static_weight/static_bias are for filter='static'")
        k = _check_dynamic_params(r, phi_weight, phi_bias, fn_std, fn_mean, kernel_size)
    else:
        if any(t is not None for t in (phi_weight, phi_bias, fn_std, fn_mean)):
            raise ValueError("phi_weight/phi_bias/fn_std/fn_mean are for filter='dynamic'")
        k = _check_static_params(tasks, r, static_weight, static_bias, kernel_size)
    check_same_dtype_device({"f": f, "base_out": base_out, "lora_a": lora_a, "lora_b": lora_b, "phi_weight": phi_weight,
                 "phi_bias": phi_bias, "fn_std": fn_std, "fn_mean": fn_mean, "static_weight": static_weight,
                 "static_bias": static_bias}, "f")
    out, *_ = torch.ops.fastdense.ta_lora_dtf(
        f4.contiguous(), b4.contiguous(), lora_a.contiguous(), lora_b.contiguous(), float(scale), list(hw),
        window, tasks, k, _contig(phi_weight), _contig(phi_bias), _contig(fn_std), _contig(fn_mean),
        _contig(static_weight), _contig(static_bias))
    return out


def dynamic_task_filter(
    h: torch.Tensor,
    hw: Sequence[int],
    phi_weight: torch.Tensor,
    phi_bias: torch.Tensor | None,
    fn_std: torch.Tensor,
    fn_mean: torch.Tensor | None,
    window: int = 0,
    *,
    return_theta: bool = False,
):
    """The Dynamic Task Filter alone (TADFormer Eq. 3): θ = FilterNorm(φ(GAP(h))), out = θ ⊛ h.

    h: (S, N, r) tokens of an H × W map (N = H·W); returns out (S, N, r), and
    with ``return_theta`` also θ (S, n_windows, r, k, k) (differentiable).
    """
    h, phi_weight, phi_bias, fn_std, fn_mean = autocast_inputs(h, phi_weight, phi_bias, fn_std, fn_mean)
    _check_tensor("h", h)
    if h.dim() != 3:
        raise ValueError(f"h must have shape (S, N, r), got {shape_str(h)}")
    s, n, r = h.shape
    hw = _check_hw(hw, n, "h")
    window = _check_window(window)
    k = _check_dynamic_params(r, phi_weight, phi_bias, fn_std, fn_mean, None)
    check_same_dtype_device({"h": h, "phi_weight": phi_weight, "phi_bias": phi_bias, "fn_std": fn_std, "fn_mean": fn_mean}, "h")
    out, theta, *_ = torch.ops.fastdense.dynamic_task_filter(
        h.contiguous(), list(hw), window, k, phi_weight.contiguous(), _contig(phi_bias), fn_std.contiguous(),
        _contig(fn_mean))
    if return_theta:
        return out, theta.reshape(s, theta.shape[1], r, k, k)
    return out


reference_ta_lora_dtf = reference.ta_lora_dtf
