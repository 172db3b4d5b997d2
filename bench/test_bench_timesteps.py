"""Diffusion features at k = 4 timesteps: one batched U-Net pass against four.

Variants, on each case (latents (B, 4, s, s), timesteps (1, 100, 200, 300),
features of every up block, empty conditioning):

* ``sequential-unet``   the way ddpm-segmentation and the paper's Alg. 1 run
                        it: per timestep, noise the latent, call the diffusers
                        ``UNet2DConditionModel`` (full forward, integer
                        timestep) and read the up-block outputs with forward
                        hooks. The baseline of ``speedup``.
* ``sequential``        four calls of :class:`MultiTimestepFeatures` with one
                        timestep each (the early stop and the hook-free walk,
                        but no batching): isolates what batching buys.
* ``batched``           one :class:`MultiTimestepFeatures` call on the 4·B batch.
* ``*-compiled``        the extractor under ``torch.compile`` (default mode);
* ``*-cudagraph``       under ``torch.compile(mode="reduce-overhead")``
                        (CUDA-graph replay; GPU only). Sequential outputs are
                        cloned, as a user must before the next replay.

GPU: a U-Net with SD 1.x's widths (``UNet2DConditionModel`` with block
widths 320, 640, 1280, 1280, cross-attention dim 768; random weights, which
time like trained ones) at 64×64 latents, B = 1, 2, 8, bf16.
CPU (a 2-core machine): the same code on a tiny U-Net (widths 32, 64) at
32×32 latents, fp32, eager only, so the suite takes under a minute.

``flops`` in extra_info are the batched extractor's (counted with
``torch.utils.flop_counter``), the minimum every variant must do.
"""
from __future__ import annotations

import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdense.diffusion import MultiTimestepFeatures, sd_alphas_cumprod  # noqa: E402

ON_GPU = torch.cuda.is_available()
TIMESTEPS = (1, 100, 200, 300)
BATCHES = (1, 2, 8)
SIDE = 64 if ON_GPU else 32
CROSS_DIM = 768 if ON_GPU else 32
_MEDIANS: dict[tuple, float] = {}


def _unet_config() -> dict:
    if ON_GPU:  # Stable Diffusion 1.x's U-Net, random weights
        return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                    attention_head_dim=8, layers_per_block=2)
    return dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CROSS_DIM,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def unet(device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: 860M parameters need not pass through the host
        model = diffusers.UNet2DConditionModel(**_unet_config())
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _variants():
    for variant in ("sequential-unet", "sequential", "batched"):
        yield pytest.param(variant, id=variant)
    gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled variants are measured on the GPU only: Inductor's "
                                  "CPU compile of a U-Net takes minutes on a 2-core machine")
    for variant in ("sequential-compiled", "batched-compiled", "sequential-cudagraph", "batched-cudagraph"):
        yield pytest.param(variant, id=variant, marks=[pytest.mark.compile, pytest.mark.slow, gpu_only])


def _sequential_unet(unet, latents, noise, layers):
    """The official loop: one full diffusers forward per timestep, features through hooks."""
    abar = sd_alphas_cumprod().to(latents.device)
    captured: dict[str, torch.Tensor] = {}
    for name in layers:
        unet.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: captured.__setitem__(name, out))
    cond = torch.zeros(latents.shape[0], 77, CROSS_DIM, device=latents.device, dtype=latents.dtype)

    def run():
        per_t = {name: [] for name in layers}
        for t in TIMESTEPS:
            z_t = abar[t].sqrt() * latents.float() + (1 - abar[t]).sqrt() * noise
            unet(z_t.to(latents.dtype), t, encoder_hidden_states=cond)
            for name in layers:
                per_t[name].append(captured[name])
        return {name: torch.stack(v, dim=1) for name, v in per_t.items()}

    return run


def _remove_hooks(unet):
    for module in unet.modules():
        module._forward_hooks.clear()


def _make(variant: str, ext: MultiTimestepFeatures, unet, latents, noise):
    if variant == "sequential-unet":
        return _sequential_unet(unet, latents, noise, ext.layers)
    mode = "reduce-overhead" if variant.endswith("cudagraph") else None
    fn = ext if mode is None and not variant.endswith("compiled") else torch.compile(ext, mode=mode)
    graphs = variant.endswith("cudagraph")
    if variant.startswith("batched"):
        def run():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return fn(latents, noise=noise)
        return run
    # One timestep per call; a (1,) device tensor, so a compiled extractor keeps one graph.
    steps = [torch.tensor([t], device=latents.device) for t in TIMESTEPS]

    def run():
        outs = []
        for t in steps:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(latents, timesteps=t, noise=noise)
            outs.append({k: v.clone() for k, v in out.items()} if graphs else out)
        return {name: torch.cat([o[name] for o in outs], dim=1) for name in ext.layers}

    return run


def _flops(ext, latents, noise) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        ext(latents, noise=noise)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("batch", BATCHES, ids=[f"B{b}" for b in BATCHES])
def test_timesteps_features(benchmark, measure, device, dtype, unet, batch, variant):
    torch._dynamo.reset()
    _remove_hooks(unet)
    if device.type == "cpu":
        torch.set_num_threads(1)  # two threads on a shared 2-core machine spin against other processes
    ext = MultiTimestepFeatures(unet, timesteps=TIMESTEPS)
    gen = torch.Generator(device=device).manual_seed(batch)
    latents = torch.randn(batch, 4, SIDE, SIDE, device=device, generator=gen)
    noise = torch.randn(batch, 4, SIDE, SIDE, device=device, generator=gen)
    fn = _make(variant, ext, unet, latents.to(dtype), noise)

    # Guard: every variant computes the features the batched extractor does.
    with torch.no_grad():
        t0 = time.perf_counter()
        got = fn()  # first call: compilation and graph capture, timed apart
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s = time.perf_counter() - t0
        want = ext(latents.to(dtype), noise=noise)
    for name in ext.layers:
        err = ((got[name].float() - want[name].float()).norm() / want[name].float().norm()).item()
        tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        assert err <= tol, f"{variant} differs from the batched extractor on {name}: relative error {err:.2e}"

    info = {"suite": "timesteps", "variant": variant, "batch": batch, "k": len(TIMESTEPS), "latent_side": SIDE,
            "block_out_channels": list(unet.config.block_out_channels), "layers": list(ext.layers),
            "first_call_s": first_call_s}
    benchmark.group = f"timesteps B={batch} {SIDE}x{SIDE}"
    with torch.no_grad():
        flops = _flops(ext, latents.to(dtype), noise)
        median = measure(benchmark, fn, device=device, dtype=dtype, flops=flops, info=info)
    _remove_hooks(unet)
    if median is not None:
        _MEDIANS[(batch, variant)] = median
        for base in ("sequential-unet", "sequential"):
            if (batch, base) in _MEDIANS:
                benchmark.extra_info[f"speedup_vs_{base}"] = _MEDIANS[(batch, base)] / median
