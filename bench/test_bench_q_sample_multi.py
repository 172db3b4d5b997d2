"""q_sample_multi against what a diffusion-features user would otherwise run.

Implementations, on each case:

* ``fused``            ``fastdense.ops.q_sample_multi`` with automatic dispatch
* ``fused-<backend>``  the same op forced onto one backend (skipped, with the
                       backend's reasons, where it cannot run)
* ``diffusers-loop``   a Python loop of ``DDPMScheduler.add_noise`` per timestep,
                       then ``torch.cat`` -- how ddpm-segmentation style code
                       builds the k-timestep batch
* ``reference``        ``reference.q_sample_multi`` (broadcast in eager PyTorch)
* ``reference-compiled``  the reference under ``torch.compile`` (marked ``compile``)

Shapes: Stable Diffusion latents 4×64×64, B = 1, 2, 8, k = 4 timesteps (the
timestep paper's initial set 1, 100, 200, 300), noise one draw per timestep or
shared. On the GPU a ``bw`` case with B = 256 (a 75 MB bf16 working set, above
L2) measures the bandwidth the kernels reach: the SD cases move 0.2-1.6 MB and
are bound by launch latency, not by HBM. Dtype bf16 on CUDA, fp32 on CPU.

Bytes in ``extra_info`` are the minimum: forward reads z0 and the S noise
tensors and writes the k outputs; backward reads the k output gradients and
writes ∂z0 and the S noise gradients (S = 1 shared, k per timestep). GB/s and
% of the HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, from the device name)
are derived from the median device time.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdense
from _cases import ON_GPU, assert_computes, impl_params, maybe_compiled, measure_modes
from fastdense.ops import reference

SUITE = "q_sample_multi"
OP = "q_sample_multi"
TIMESTEPS = (1, 100, 200, 300)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    shared: bool
    channels: int = 4
    side: int = 64

    @property
    def id(self) -> str:
        return (f"B{self.batch}-{self.channels}x{self.side}x{self.side}-k{len(TIMESTEPS)}-"
                f"{'shared' if self.shared else 'per-step'}")


SHAPES = [Shape(b, shared) for b in (1, 2, 8) for shared in (False, True)]
BW_SHAPES = [Shape(256, False)] if ON_GPU else []  # bandwidth case, GPU only (see the docstring)


def _cases():
    for shape in SHAPES + BW_SHAPES:
        compiled = shape.batch == 8 or shape in BW_SHAPES
        yield from impl_params(shape, ["diffusers-loop", "reference"], "reference-compiled" if compiled else None)


def cost(shape: Shape, itemsize: int, mode: str) -> int:
    k, s = len(TIMESTEPS), 1 if shape.shared else len(TIMESTEPS)
    elems = shape.batch * shape.channels * shape.side * shape.side
    fwd = (1 + s + k) * elems
    bwd = (k + 1 + s) * elems
    return (fwd if mode == "fwd" else fwd + bwd) * itemsize


def _scheduler():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape, impl", list(_cases()))
def test_q_sample_multi(benchmark, measure, use_backend, device, dtype, shape, impl, mode):
    scheduler = _scheduler()
    k, b = len(TIMESTEPS), shape.batch
    latent = (b, shape.channels, shape.side, shape.side)
    z0 = torch.randn(latent, device=device, dtype=dtype, requires_grad=mode == "fwdbwd")
    noise = torch.randn(latent if shape.shared else (k, *latent), device=device, dtype=dtype,
                        requires_grad=mode == "fwdbwd")
    ts = torch.tensor(TIMESTEPS, device=device)
    alphas = scheduler.alphas_cumprod.to(device)
    grad = torch.randn(k * b, *latent[1:], device=device, dtype=dtype)
    info = {"impl": impl, "mode": mode, "batch": b, "latent": list(latent[1:]), "k": k,
            "noise": "shared" if shape.shared else "per-step"}

    # The op's flat (B, N) and (k or 1, B, N) layout, which backends check.
    op_args = (z0.reshape(b, -1), noise.reshape(-1, b, z0[0].numel()), ts, alphas, False)
    use_backend(OP, impl, op_args, info)

    if impl.startswith("fused"):
        def forward():
            return fastdense.ops.q_sample_multi(z0, noise, ts, alphas)
    elif impl == "diffusers-loop":
        per_sample = [torch.full((b,), t, device=device, dtype=torch.long) for t in TIMESTEPS]

        def forward():
            outs = [scheduler.add_noise(z0, noise if shape.shared else noise[i], per_sample[i]) for i in range(k)]
            return torch.cat(outs)
    else:
        fn = maybe_compiled(impl, reference.q_sample_multi)

        def forward():
            return fn(z0, noise, ts, alphas)

    # Guard: what is timed computes the right thing.
    with torch.no_grad():
        expected = reference.q_sample_multi(z0.float(), noise.float(), ts, alphas.float())
    # bf16 baselines round ᾱ and each product to bf16; the scale is the largest output.
    assert_computes(impl, forward().detach(), expected, dtype, high=1e-5)

    measure_modes(benchmark, measure, suite=SUITE, case_id=shape.id, mode=mode, forward=forward, leaves=[z0, noise],
                  grad=grad, device=device, dtype=dtype, info=info, bytes_moved=cost(shape, z0.element_size(), mode),
                  first_call=True)
