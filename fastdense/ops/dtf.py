"""TADFormer's Dynamic Task Filter: ``torch.ops.fastdense.ta_lora_dtf`` and ``dynamic_task_filter``.

``ta_lora_dtf`` is the whole TA-module (TADFormer §3.4, Eq. 3–4) for all T
tasks in one call,

    θ_t = FilterNorm(φ(GAP(f_t Aᵀ))),     F̃_t = Φ(f_t) + s · (θ_t ⊛ (f_t Aᵀ)) Bᵀ,

with the frozen layer's output Φ(f_t) passed in (``base_out``), the Dynamic
Task Filter (φ, FilterNorm) shared by the tasks (fastdense's reading, see
docs/paper-decisions.md), or the per-task static depthwise filter of the
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

Backends: cuda (raw CUDA depthwise-conv and reduction kernels, csrc/cuda/dtf.cu),
triton (kernels/dtf.py: conv + up-projection + add fused), cpp (csrc/cpu/dtf.cpp),
torch (fastdense/ops/_dtf_phases.py, the grouped-conv formulation). They share the
orchestration of ``_dtf_phases`` and differ in the phase kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastdense import _triton
from fastdense.ops import _dtf_phases
from fastdense.ops._define import (
    GPU_FLOATING,
    Backend,
    Limit,
    autocast_inputs,
    cpp_backend,
    cuda_backend,
    define_op,
    ext_limit,
    torch_backend,
)
from fastdense.ops._validate import check_hw, check_same_dtype_device, check_window, float_tensor, shape_str

FILTERS = ("dynamic", "static")


# ----------------------------------------------------------------------------- validation
def _check_dynamic_params(r, r_from: str, phi_weight, phi_bias, fn_std, fn_mean, kernel_size) -> int:
    """k of the dynamic filter's parameters; ``r_from`` names the argument r comes from."""
    for name, t in (("phi_weight", phi_weight), ("phi_bias", phi_bias), ("fn_std", fn_std), ("fn_mean", fn_mean)):
        float_tensor(name, t, optional=name in ("phi_bias", "fn_mean"))
    if phi_weight.dim() != 2 or phi_weight.shape[1] != r:
        raise ValueError(f"phi_weight must have shape (r·k², r={r}) to match {r_from}, got {shape_str(phi_weight)}")
    k = _dtf_phases.isqrt_kernel(phi_weight.shape[0], r)
    if k == 0:
        raise ValueError(f"phi_weight must have r·k² = {r}·k² rows for a square kernel, got {shape_str(phi_weight)}")
    if kernel_size is not None and kernel_size != k:
        raise ValueError(f"kernel_size={kernel_size} but phi_weight {shape_str(phi_weight)} gives k = {k}")
    if k % 2 == 0 or k < 3:
        raise ValueError(f"the dynamic filter needs an odd kernel size >= 3 (FilterNorm's std over k² taps), "
                         f"got k = {k}")
    rows = r * k * k
    for name, t in (("phi_bias", phi_bias), ("fn_std", fn_std), ("fn_mean", fn_mean)):
        if t is not None and tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must have shape (r·k² = {rows},) to match phi_weight "
                             f"{shape_str(phi_weight)}, got {shape_str(t)}")
    return k


def _check_static_params(tasks, r, r_from: str, static_weight, static_bias, kernel_size) -> int:
    float_tensor("static_weight", static_weight)
    float_tensor("static_bias", static_bias, optional=True)
    shape = tuple(static_weight.shape)
    if len(shape) != 4 or shape[:2] != (tasks, r) or shape[2] != shape[3]:
        raise ValueError(f"static_weight must have shape (T={tasks}, r={r}, k, k) to match {r_from} and T = {tasks} "
                         f"tasks, got {shape_str(static_weight)}")
    k = static_weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"static_weight needs an odd kernel size (same padding), got k = {k}")
    if kernel_size is not None and kernel_size != k:
        raise ValueError(f"kernel_size={kernel_size} but static_weight {shape_str(static_weight)} gives k = {k}")
    if static_bias is not None and tuple(static_bias.shape) != (tasks, r):
        raise ValueError(f"static_bias must have shape (T={tasks}, r={r}) to match static_weight "
                         f"{shape_str(static_weight)}, got {shape_str(static_bias)}")
    return k


# ----------------------------------------------------------------------------- backends and operators
def _backends(forward, backward, kernel_size, rank):
    """The four backends of one operator: the shared orchestration over each backend's phase kernels.

    ``kernel_size``/``rank`` read k and r off the operator's arguments, for the
    CUDA kernels' limits (k is a template parameter; the GAP and dθ kernels give each of
    r <= 256 channels a thread of a 256-thread block).
    """
    def pair(name):
        return _dtf_phases.bind(forward, name), _dtf_phases.bind(backward, name)

    return (
        torch_backend(*pair("torch")),
        cpp_backend(*pair("cpp"), kernels=_EXT_KERNELS, dtypes=(torch.float32, torch.float64)),
        cuda_backend(*pair("cuda"), kernels=_EXT_KERNELS, limits=(
            Limit("kernel sizes k", kernel_size, allowed=ext_limit("dtf_cuda_kernel_sizes")),
            Limit("rank r", rank, maximum=ext_limit("dtf_cuda_max_rank")),
        )),
        Backend("triton", *pair("triton"), device="triton", dtypes=GPU_FLOATING,
                machine=_triton.machine_reasons_for("dtf")),
    )


_EXT_KERNELS = ("_dtf_gap", "_dtf_dwconv_fwd", "_dtf_dwconv_dh", "_dtf_dwconv_dtheta")
_FILTER_OUTPUTS = "Tensor theta, Tensor pooled, Tensor normed, Tensor denom"


def _filter_shapes(samples, hw, window, r, k, dynamic):
    """Shapes of (theta, pooled, normed, denom); empty for the static filter."""
    nwin = _dtf_phases.num_windows(hw, window)
    if not dynamic:
        return (0,), (0,), (0,), (0,)
    return (samples, nwin, r, k * k), (samples, nwin, r), (samples, nwin, r, k * k), (samples, nwin, r, 1)


def _ta_lora_dtf_fake(f, base_out, lora_a, lora_b, scale, hw, window, num_tasks, kernel_size,
                      phi_weight, phi_bias, fn_std, fn_mean, static_weight, static_bias):
    tf, b, n, _ = f.shape
    r = lora_a.shape[0]
    shapes = _filter_shapes(tf * b, hw, window, r, kernel_size, static_weight is None)
    return (f.new_empty((num_tasks, b, n, lora_b.shape[0])), f.new_empty((tf, b, n, r)),
            *(f.new_empty(s) for s in shapes))


_TA_INPUTS = ("f", "base_out", "lora_a", "lora_b", "scale", "hw", "window", "num_tasks", "kernel_size",
              "phi_weight", "phi_bias", "fn_std", "fn_mean", "static_weight", "static_bias")
OP = define_op(
    "ta_lora_dtf",
    schema="Tensor f, Tensor base_out, Tensor lora_a, Tensor lora_b, float scale, int[] hw, int window, "
           "int num_tasks, int kernel_size, Tensor? phi_weight, Tensor? phi_bias, Tensor? fn_std, Tensor? fn_mean, "
           "Tensor? static_weight, Tensor? static_bias",
    outputs="Tensor out, Tensor h, " + _FILTER_OUTPUTS,
    lead="f",
    differentiable=_dtf_phases.GRAD_NAMES,
    grad_outputs=("out",),
    saved=(*_TA_INPUTS, "h", "theta", "pooled", "normed", "denom"),
    fake=_ta_lora_dtf_fake,
    backends=_backends(_dtf_phases.forward, _dtf_phases.backward,
                       kernel_size=lambda *a: a[8], rank=lambda f, base_out, lora_a, *rest: lora_a.shape[0]),
)

# θ is an output a caller may differentiate (``return_theta``): its gradient joins the backward.
OP_DTF = define_op(
    "dynamic_task_filter",
    schema="Tensor h, int[] hw, int window, int kernel_size, Tensor phi_weight, Tensor? phi_bias, Tensor fn_std, "
           "Tensor? fn_mean",
    outputs="Tensor out, " + _FILTER_OUTPUTS,
    lead="h",
    differentiable=_dtf_phases.DTF_GRAD_NAMES,
    grad_outputs=("out", "theta?"),
    saved=("h", "hw", "window", "kernel_size", "phi_weight", "phi_bias", "fn_std", "fn_mean",
           "theta", "pooled", "normed", "denom"),
    fake=lambda h, hw, window, kernel_size, *rest: (
        h.new_empty(h.shape),
        *(h.new_empty(s) for s in _filter_shapes(h.shape[0], hw, window, h.shape[2], kernel_size, True))),
    backends=_backends(_dtf_phases.dtf_forward, _dtf_phases.dtf_backward,
                       kernel_size=lambda *a: a[3], rank=lambda h, *rest: h.shape[2]),
)


# ----------------------------------------------------------------------------- public API
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
        float_tensor(name, t)
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
        source = "f" if f.dim() == 4 else "base_out"
        raise ValueError(f"num_tasks={num_tasks} but {source} has T = {tasks} tasks (dim 0 of {source}, "
                         f"shape {shape_str(f if source == 'f' else base_out)})")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {tasks!r}")
    f4 = f if f.dim() == 4 else f.unsqueeze(0)
    b4 = base_out if base_out.dim() == 4 else base_out.unsqueeze(0)
    _, batch, n, c = f4.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != c:
        raise ValueError(f"lora_a must have shape (r, C={c}) to match f {shape_str(f)}, got {shape_str(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape[1] != r:
        raise ValueError(f"lora_b must have shape (C_out, r={r}) to match lora_a {shape_str(lora_a)}, "
                         f"got {shape_str(lora_b)}")
    cout = lora_b.shape[0]
    if b4.shape[0] not in (1, tasks) or b4.shape[1:] != (batch, n, cout):
        raise ValueError(f"base_out must have shape (T={tasks}, B={batch}, N={n}, C_out={cout}) or (B, N, C_out) "
                         f"to match f {shape_str(f)} and lora_b {shape_str(lora_b)}; got {shape_str(base_out)}")
    hw = check_hw(hw, n, "f")
    window = check_window(window)
    if filter == "dynamic":
        if static_weight is not None or static_bias is not None:
            raise ValueError("static_weight/static_bias are for filter='static'")
        k = _check_dynamic_params(r, f"lora_a {shape_str(lora_a)}", phi_weight, phi_bias, fn_std, fn_mean,
                                  kernel_size)
    else:
        if any(t is not None for t in (phi_weight, phi_bias, fn_std, fn_mean)):
            raise ValueError("phi_weight/phi_bias/fn_std/fn_mean are for filter='dynamic'")
        k = _check_static_params(tasks, r, f"lora_a {shape_str(lora_a)}", static_weight, static_bias, kernel_size)
    check_same_dtype_device({"f": f, "base_out": base_out, "lora_a": lora_a, "lora_b": lora_b, "phi_weight": phi_weight,
                 "phi_bias": phi_bias, "fn_std": fn_std, "fn_mean": fn_mean, "static_weight": static_weight,
                 "static_bias": static_bias}, "f")
    out, *_ = OP(
        f4, b4, lora_a, lora_b, float(scale), list(hw), window, tasks, k, phi_weight, phi_bias, fn_std, fn_mean,
        static_weight, static_bias)
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
    float_tensor("h", h)
    if h.dim() != 3:
        raise ValueError(f"h must have shape (S, N, r), got {shape_str(h)}")
    s, n, r = h.shape
    hw = check_hw(hw, n, "h")
    window = check_window(window)
    k = _check_dynamic_params(r, f"h {shape_str(h)}", phi_weight, phi_bias, fn_std, fn_mean, None)
    check_same_dtype_device({"h": h, "phi_weight": phi_weight, "phi_bias": phi_bias, "fn_std": fn_std,
                             "fn_mean": fn_mean}, "h")
    out, theta, *_ = OP_DTF(
        h, list(hw), window, k, phi_weight, phi_bias, fn_std, fn_mean)
    if return_theta:
        return out, theta.reshape(s, theta.shape[1], r, k, k)
    return out

