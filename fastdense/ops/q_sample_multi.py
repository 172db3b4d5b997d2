"""Multi-timestep noising in one kernel: ``torch.ops.fastdense.q_sample_multi``.

From one latent batch z0 the op writes the k noised copies DDPM's forward
process gives (Ho et al. 2020, Eq. 4; the timestep paper §3 noises one latent
at the k selected timesteps)::

    z_t = √ᾱ_t · z0 + √(1 − ᾱ_t) · ε,     t ∈ timesteps,

as one (k·B, C, h, w) batch that a U-Net runs in a single pass, with the
per-sample timestep tensor ``timesteps.repeat_interleave(B)`` ("timestep"
layout, row i·B + b) or ``timesteps.repeat(B)`` ("sample" layout, row b·k + i).

Tensor contract of the internal op and of every backend (N = C·h·w):

    z0             (B, N)       contiguous, float16/bfloat16/float32/float64
    noise          (S, B, N)    S = 1 (one ε shared by the timesteps) or k
    timesteps      (k,)         int64, on z0's device
    alphas_cumprod (T,)         float32/float64, on z0's device
    sample_major   bool         the "sample" layout
    -> out (k·B, N), dtype of z0

Every backend reads z0 and a shared ε once for all k outputs (k + 1 + S
element streams, the minimum), gathers ᾱ_t by index inside the kernel and
computes the coefficients and the sum in float32 (float64 for float64
inputs), casting on store. Backward::

    ∂L/∂z0[b] = Σ_i √ᾱ_{t_i} · g_i[b]
    ∂L/∂ε[i, b] = √(1 − ᾱ_{t_i}) · g_i[b]      (summed over i when ε is shared)

``timesteps`` and ``alphas_cumprod`` get no gradient (a schedule is not
trained; ``alphas_cumprod.requires_grad`` is ignored).

Out-of-range timesteps. Checking ``0 <= t < T`` needs the values on the host.
When they are there already -- CPU tensors, or ``timesteps`` passed on the
CPU (or as a list) together with CUDA latents, which is how timesteps chosen in
Python arrive -- the op raises ValueError before any work. Timesteps that live
on the GPU are *not* copied back to check them (that would synchronise the
device on every call, and break CUDA-graph capture); there every backend
stays in bounds and writes NaN rows for an out-of-range timestep, so the
mistake is visible in the output rather than a silent read of other memory.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from fastdense.ops import _q_sample_multi_torch
from fastdense.ops._define import Backend, Derived, cpp_backend, cuda_backend, define_op, torch_backend, triton_backend
from fastdense.ops._validate import int_list, shape_str

LAYOUTS = ("timestep", "sample")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SCHEDULE_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def check_args(z0, noise, timesteps, alphas_cumprod, layout) -> bool:
    """Raise TypeError/ValueError naming the bad argument; returns True if noise is shared."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'timestep' (row i·B + b) or 'sample' (row b·k + i), got {layout!r}")
    for name, t in (("z0", z0), ("noise", noise), ("timesteps", timesteps), ("alphas_cumprod", alphas_cumprod)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if z0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z0 must be a floating tensor (float32/float16/bfloat16/float64), got {z0.dtype}")
    if noise.dtype != z0.dtype:
        raise TypeError(f"noise has dtype {noise.dtype} but z0 has {z0.dtype}; they must share one dtype")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor (indices into alphas_cumprod), got {timesteps.dtype}")
    if alphas_cumprod.dtype not in _SCHEDULE_DTYPES:
        raise TypeError(f"alphas_cumprod must be float32 or float64, got {alphas_cumprod.dtype}")
    if z0.dim() < 1:
        raise ValueError("z0 must have shape (B, C, h, w), got a 0-d tensor")
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must have shape (k,), got {shape_str(timesteps)}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.shape[0] < 1:
        raise ValueError(f"alphas_cumprod must have shape (T_train,) with T_train >= 1, "
                         f"got {shape_str(alphas_cumprod)}")
    k = timesteps.shape[0]
    per_step = (k, *z0.shape)
    if tuple(noise.shape) == tuple(z0.shape):
        shared = True
    elif tuple(noise.shape) == per_step:
        shared = False
    else:
        raise ValueError(f"noise must have the shape of z0 {shape_str(z0)} (shared by the timesteps) or "
                         f"(k={k}, *z0.shape) = {per_step} (one draw per timestep), got {shape_str(noise)}")
    if noise.device != z0.device:
        raise ValueError(f"noise is on {noise.device} but z0 is on {z0.device}; they must be on one device")
    if alphas_cumprod.device != z0.device:
        raise ValueError(f"alphas_cumprod is on {alphas_cumprod.device} but z0 is on {z0.device}; "
                         f"move the schedule to the latents' device once (alphas_cumprod.to(z0.device))")
    if timesteps.device != z0.device and timesteps.device.type != "cpu":
        raise ValueError(f"timesteps is on {timesteps.device} but z0 is on {z0.device}; "
                         f"pass them on z0's device or on the CPU")
    return shared


def _check_range_on_host(timesteps: torch.Tensor, num_train: int) -> None:
    """ValueError for indices outside [0, T); only called on CPU tensors (no sync)."""
    values = timesteps.tolist()  # k is small: cheaper than min() and max() as tensor ops
    bad = [t for t in values if t < 0 or t >= num_train]
    if bad:
        raise ValueError(f"timesteps must lie in [0, len(alphas_cumprod)) = [0, {num_train}), got {bad}")


# ----------------------------------------------------------------------------- backends and operator
def _to_device(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Validate host timesteps (free) and move them to the latents' device."""
    if timesteps.device.type == "cpu":
        _check_range_on_host(timesteps, alphas_cumprod.shape[0])
        if device.type != "cpu":
            # Pageable host -> device copies are staged, never a device sync.
            timesteps = timesteps.to(device, non_blocking=True)
    return timesteps


def _timesteps_on_device(impl: Backend) -> Backend:
    """``impl`` with host timesteps checked and moved to the data's device before its kernels run.

    Done inside the operator, not in the public function: the range check reads
    the values, which a traced graph could not do.
    """
    forward, backward = impl.forward, impl.backward

    def fwd(z0, noise, timesteps, alphas_cumprod, sample_major):
        return forward(z0, noise, _to_device(timesteps, alphas_cumprod, z0.device), alphas_cumprod, sample_major)

    def bwd(grad, timesteps, alphas_cumprod, batch, sample_major, shared_noise, needs):
        return backward(grad, _to_device(timesteps, alphas_cumprod, grad.device), alphas_cumprod, batch,
                        sample_major, shared_noise, needs)

    return dataclasses.replace(impl, forward=fwd, backward=bwd)


def _ext_forward(z0, noise, timesteps, alphas_cumprod, sample_major):
    return torch.ops.fastdense._q_sample_multi_fwd(z0, noise, timesteps, alphas_cumprod, sample_major)


def _ext_backward(grad, timesteps, alphas_cumprod, batch, sample_major, shared_noise, needs):
    return tuple(torch.ops.fastdense._q_sample_multi_bwd(grad, timesteps, alphas_cumprod, batch, sample_major,
                                                         shared_noise, list(needs)))


_EXT_KERNELS = ("_q_sample_multi_fwd", "_q_sample_multi_bwd")


def _grad_shapes(grads, saved):
    n = grads[0].shape[1]
    steps = 1 if saved["shared_noise"] else saved["timesteps"].shape[0]
    return [(saved["batch"], n), (steps, saved["batch"], n)]


# Backward reads only the coefficients: z0 and noise are not saved.
OP = define_op(
    "q_sample_multi",
    schema="Tensor z0, Tensor noise, Tensor timesteps, Tensor alphas_cumprod, bool sample_major",
    outputs="Tensor out",
    lead="z0",
    differentiable=("z0", "noise"),
    grad_outputs=("out",),
    saved=("timesteps", "alphas_cumprod", Derived("batch", "SymInt", lambda a: a["z0"].shape[0]), "sample_major",
           Derived("shared_noise", "bool", lambda a: a["noise"].shape[0] == 1)),
    fake=lambda z0, noise, timesteps, alphas_cumprod, sample_major: z0.new_empty(
        (timesteps.shape[0] * z0.shape[0], z0.shape[1])),
    backward_fake=_grad_shapes,
    backends=tuple(map(_timesteps_on_device, (
        torch_backend(_q_sample_multi_torch.forward, _q_sample_multi_torch.backward),
        cpp_backend(_ext_forward, _ext_backward, kernels=_EXT_KERNELS, dtypes=None),
        cuda_backend(_ext_forward, _ext_backward, kernels=_EXT_KERNELS),
        triton_backend("q_sample_multi"),
    ))),
)


# ----------------------------------------------------------------------------- public API
def _plain_eager(z0: torch.Tensor, noise: torch.Tensor) -> bool:
    """True for a plain eager call that no tracer or mode sees.

    The torch.library wrapper costs ~45 µs of Python per call (measured on
    this CPU), more than the kernel itself at Stable Diffusion latent sizes.
    Such calls run the backend the operator would pick, directly (under
    :class:`_EagerAutograd` when they need gradients); anything that needs the
    operator -- torch.compile, fake tensors, dispatch or torch-function modes,
    functorch transforms -- goes through it.
    """
    if torch.compiler.is_compiling() or type(z0) is not torch.Tensor or type(noise) is not torch.Tensor:
        return False
    if z0.device.type == "meta":  # shape propagation: the operator's fake kernel
        return False
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.maybe_current_level() is None)


def _needs_grad(z0: torch.Tensor, noise: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (z0.requires_grad or noise.requires_grad)


def _eager_fast_path(z0: torch.Tensor, noise: torch.Tensor) -> bool:
    """A plain eager call that needs no gradient: the backend runs without the operator."""
    return _plain_eager(z0, noise) and not _needs_grad(z0, noise)


def _eager_autograd_path(z0: torch.Tensor, noise: torch.Tensor) -> bool:
    """A plain eager call that needs gradients: the backend runs under :class:`_EagerAutograd`."""
    return _plain_eager(z0, noise) and _needs_grad(z0, noise)


class _EagerAutograd(torch.autograd.Function):
    """The operator's forward and backward for plain eager calls that need gradients.

    Through the custom op, forward and backward cost ~0.25 ms of Python and
    autograd bookkeeping per call on the 2-core CPU machine, which made the op
    0.58-0.97x of the plain-PyTorch reference at B = 1 and 2 (4×64×64 latents,
    k = 4) although its kernels move the least data; with this autograd.Function
    it is 1.16-1.49x there (CPU time, 1 thread, interleaved runs;
    bench/test_bench_q_sample_multi.py shapes). Same backend choice and
    gradients as the operator; no double backward (neither has one).
    """

    @staticmethod
    def forward(ctx, z0, noise, timesteps, alphas_cumprod, sample_major):
        impl = OP.select(z0, noise, timesteps, alphas_cumprod, sample_major)
        ctx.save_for_backward(timesteps, alphas_cumprod)
        ctx.impl, ctx.batch, ctx.sample_major, ctx.shared = impl, z0.shape[0], sample_major, noise.shape[0] == 1
        return impl.forward(z0, noise, timesteps, alphas_cumprod, sample_major)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        timesteps, alphas_cumprod = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:2])
        d_z0, d_noise = ctx.impl.backward(grad.contiguous(), timesteps, alphas_cumprod, ctx.batch, ctx.sample_major,
                                          ctx.shared, needs)
        return d_z0 if needs[0] else None, d_noise if needs[1] else None, None, None, None


def q_sample_multi(
    z0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
    alphas_cumprod: torch.Tensor,
    layout: str = "timestep",
) -> torch.Tensor:
    """k noised copies z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε of z0 (B, C, h, w) as one (k·B, C, h, w) batch.

    ``noise`` is (B, C, h, w), one ε shared by the timesteps, or (k, B, C, h, w),
    one draw per timestep. ``timesteps`` (k,) are integer indices into
    ``alphas_cumprod`` (T_train,) (a scheduler's ``alphas_cumprod``, moved to
    z0's device), given on z0's device, on the CPU, or as a list of ints.
    ``layout="timestep"``: row i·B + b is timestep i of sample b (matches the
    U-Net timestep tensor ``timesteps.repeat_interleave(B)``); ``"sample"``:
    row b·k + i (matches ``timesteps.repeat(B)``). Gradients flow to z0 and
    noise. See the module docstring for out-of-range timesteps and
    ``reference.q_sample_multi`` for the plain definition.
    """
    if isinstance(timesteps, (list, tuple)):
        timesteps = torch.tensor(int_list("timesteps", timesteps), dtype=torch.int64)
    shared = check_args(z0, noise, timesteps, alphas_cumprod, layout)
    batch = z0.shape[0]
    rest = z0.shape[1:]
    n = 1
    for s in rest:
        n *= s
    z0_2d = z0.reshape(batch, n)
    noise_3d = noise.reshape(1 if shared else timesteps.shape[0], batch, n)
    args = (z0_2d, noise_3d, timesteps.to(torch.int64), alphas_cumprod.detach(), layout == "sample")
    if _eager_fast_path(z0, noise):
        out = OP.run_backend(*args)
    elif _eager_autograd_path(z0, noise):
        out = _EagerAutograd.apply(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    else:
        out = OP(*args)
    return out.view(timesteps.shape[0] * batch, *rest)

