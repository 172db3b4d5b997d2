"""Triton kernels of ``q_sample_multi`` (contract: fastdense/ops/q_sample_multi.py).

One launch each way. A program owns BLOCK columns of one sample b:

* forward: loads z0[b] (and a shared ε[b]) once, then for each of the k
  timesteps gathers ᾱ_t from ``alphas_cumprod`` by index, forms
  √ᾱ_t, √(1 − ᾱ_t) in fp32 and writes its output row -- (k + 1 + S) element
  streams in total, the minimum;
* backward: reads the k gradient rows of its columns once, accumulating
  ∂z0 = Σ_i √ᾱ_i g_i (and Σ_i √(1 − ᾱ_i) g_i for a shared ε) in fp32 registers,
  writing √(1 − ᾱ_i) g_i straight out for per-timestep ε.

A timestep outside [0, T) is never used as an address: its coefficients are
NaN, so its rows come out NaN (the host does not look at device timesteps,
see the op's docstring).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _launch
from ._launch import interpreting as _interpreting
from ._launch import launch


@triton.jit
def _coefficients(ts_ptr, alphas_ptr, i, T):
    t = tl.load(ts_ptr + i)
    valid = (t >= 0) & (t < T)
    abar = tl.load(alphas_ptr + tl.where(valid, t, 0)).to(tl.float32)
    abar = tl.where(valid, abar, float("nan"))
    return tl.sqrt_rn(abar), tl.sqrt_rn(1.0 - abar)


@triton.jit
def _fwd_kernel(z0_ptr, noise_ptr, ts_ptr, alphas_ptr, out_ptr, B, N, K, T,
                SHARED: tl.constexpr, SAMPLE_MAJOR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK)
    b = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    z = tl.load(z0_ptr + b * N + cols, mask=mask).to(tl.float32)
    if SHARED:
        e_shared = tl.load(noise_ptr + b * N + cols, mask=mask).to(tl.float32)
    for i in range(K):
        c_signal, c_noise = _coefficients(ts_ptr, alphas_ptr, i, T)
        if SHARED:
            e = e_shared
        else:
            e = tl.load(noise_ptr + (i * B + b) * N + cols, mask=mask).to(tl.float32)
        if SAMPLE_MAJOR:
            row = b * K + i
        else:
            row = i * B + b
        z_t = c_signal * z + c_noise * e
        tl.store(out_ptr + row * N + cols, z_t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(grad_ptr, ts_ptr, alphas_ptr, dz0_ptr, dnoise_ptr, B, N, K, T,
                SHARED: tl.constexpr, SAMPLE_MAJOR: tl.constexpr, NEED_Z0: tl.constexpr,
                NEED_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK)
    b = (pid // blocks).to(tl.int64)
    cols = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc_z = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(K):
        c_signal, c_noise = _coefficients(ts_ptr, alphas_ptr, i, T)
        if SAMPLE_MAJOR:
            row = b * K + i
        else:
            row = i * B + b
        g = tl.load(grad_ptr + row * N + cols, mask=mask).to(tl.float32)
        if NEED_Z0:
            acc_z += c_signal * g
        if NEED_NOISE:
            if SHARED:
                acc_n += c_noise * g
            else:
                tl.store(dnoise_ptr + (i * B + b) * N + cols, (c_noise * g).to(dnoise_ptr.dtype.element_ty),
                         mask=mask)
    if NEED_Z0:
        tl.store(dz0_ptr + b * N + cols, acc_z.to(dz0_ptr.dtype.element_ty), mask=mask)
    if NEED_NOISE:
        if SHARED:
            tl.store(dnoise_ptr + b * N + cols, acc_n.to(dnoise_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 16 bytes per thread per access or more on the GPU;
    small blocks in the interpreter, where every lane costs numpy work."""
    if _interpreting():
        return min(128, triton.next_power_of_2(max(n, 1))), 1
    block = min(2048, max(128, triton.next_power_of_2(n)))
    return block, max(1, min(8, block // 256))


def forward(z0, noise, timesteps, alphas_cumprod, sample_major):
    batch, n = z0.shape
    k = timesteps.shape[0]
    out = z0.new_empty((k * batch, n))
    if out.numel() == 0:
        return out
    block, warps = _launch_config(n)
    grid = (batch * triton.cdiv(n, block),)
    launch(_fwd_kernel, grid, z0, noise, timesteps, alphas_cumprod, out, batch, n, k, alphas_cumprod.shape[0],
           SHARED=noise.shape[0] == 1, SAMPLE_MAJOR=bool(sample_major), BLOCK=block, num_warps=warps)
    return out


def backward(grad, timesteps, alphas_cumprod, batch, sample_major, shared_noise, needs):
    need_z0, need_noise = bool(needs[0]), bool(needs[1])
    k = timesteps.shape[0]
    n = grad.shape[1]
    steps = 1 if shared_noise else k
    empty = grad.new_empty(0)
    d_z0 = grad.new_empty((batch, n)) if need_z0 else empty
    d_noise = grad.new_empty((steps, batch, n)) if need_noise else empty
    if batch * n == 0 or not (need_z0 or need_noise):
        return d_z0, d_noise
    if k == 0:  # sums over no timestep
        return d_z0.zero_(), d_noise.zero_()
    block, warps = _launch_config(n)
    grid = (batch * triton.cdiv(n, block),)
    launch(_bwd_kernel, grid, grad, timesteps, alphas_cumprod, d_z0 if need_z0 else grad,
           d_noise if need_noise else grad, batch, n, k, alphas_cumprod.shape[0], SHARED=bool(shared_noise),
           SAMPLE_MAJOR=bool(sample_major), NEED_Z0=need_z0, NEED_NOISE=need_noise, BLOCK=block, num_warps=warps)
    return d_z0, d_noise



def compile_specs(batch: int, numel: int, steps: int, dtype, *, shared_noise: bool = False,
                  sample_major: bool = False, needs=(True, True), num_timesteps: int = 1000,
                  forward_pass: bool = True) -> list:
    """What one forward + backward call would compile on a GPU (:class:`fastdense.kernels._launch.Spec`).

    batch samples of ``numel`` elements each, ``steps`` timesteps drawn from a
    schedule of ``num_timesteps``; runs the launchers above on meta tensors.
    """
    import torch

    meta = _launch.meta_tensor
    z0 = meta(batch, numel, dtype=dtype)
    noise = meta(1 if shared_noise else steps, batch, numel, dtype=dtype)
    timesteps = meta(steps, dtype=torch.int64)
    alphas = meta(num_timesteps, dtype=torch.float32)
    with _launch.recording() as launches:
        if forward_pass:
            forward(z0, noise, timesteps, alphas, sample_major)
        if any(needs):
            backward(meta(steps * batch, numel, dtype=dtype), timesteps, alphas, batch, sample_major,
                     shared_noise, needs)
    case = (f"q_sample_multi B={batch} n={numel} k={steps} {'shared' if shared_noise else 'per-step'}"
            f"{' sample-major' if sample_major else ''} needs={tuple(int(v) for v in needs)}")
    return _launch.specs(launches, case)
