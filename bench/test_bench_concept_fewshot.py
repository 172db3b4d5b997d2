"""concept_fewshot: one fine-tuning step and one inference pass, fused vs the materialised reference.

Implementations (``ConceptFewShot(attention=...)``), on each case:

* ``fused``      M_attn = M_saᵀ M_ca through ``fastdense.ops.attn_mask_aggregate`` (automatic
                 dispatch): the self-attention probabilities are never materialised
* ``reference``  softmax(QKᵀ) materialised per recorded block, then M_saᵀ M_ca
                 (``fastdense.ops.reference.attn_mask_aggregate``): what a plain
                 implementation of the paper does

Cases:

* ``step``       a fine-tuning step: z_t from given latents (the frozen VAE and CLIP
                 run once per support set, not per step), U-Net forward with the
                 concept embeddings, M_label at image size, codebook, L_cls + α L_reg,
                 backward into the trainable set, an Adam update
* ``inference``  the same forward at t = 200 under ``torch.no_grad``

GPU: Stable Diffusion 2.x's U-Net (block widths 320/640/1280/1280, heads of 64,
cross-attention 1024; random weights) at 64 × 64 latents (L = 4096 at the first
level, where three of the paper's eight recorded blocks sit), batch 4, N = 40
concepts (depth), M_label at 512 × 512, bf16 networks; the issue's goal: the
fused step ≥ 2× faster than the reference with ≤ 1/4 of its peak memory. CPU
(scaled down to what a 2-core machine runs): the same four-level U-Net shape at
widths 32/64/128/128 and 16 × 16 latents (M_label at 128 × 128), batch 2, fp32.

``extra_info``: the ``measure`` fields (median time; ``max_memory_allocated_mb``
on CUDA) and, on the CPU, ``peak_rss_growth_mb``: the growth of the process's
peak resident set over one call (Linux VmHWM, reset before the call), since
torch's CPU allocations are invisible to tracemalloc. It is a lower bound:
memory the allocator kept from the warm-up call is reused without growing the
resident set (tests/models/test_concept_fewshot_memory.py measures a step in a
fresh process with glibc's mmap threshold pinned instead).
"""
from __future__ import annotations

import re
import sys

import pytest
import torch

from fastdense.models._concept_backbones import SD2_UNET_CONFIG, tiny_clip, tiny_vae
from fastdense.models.concept_fewshot import EncodedImages, concept_fewshot

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ON_GPU = torch.cuda.is_available()
GPU_CONFIG = dict(unet=SD2_UNET_CONFIG, latent=64, batch=4, concepts=40)
CPU_CONFIG = dict(unet=dict(SD2_UNET_CONFIG, block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4),
                            cross_attention_dim=64, sample_size=16),
                  latent=16, batch=2, concepts=40)
IMPLS = ("fused", "reference")


def _build(device, dtype, cfg, attention):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"]).to(device, dtype)
    # The VAE and CLIP only run in encode(), once per support set: tiny stand-ins, unused here.
    model = concept_fewshot(unet, tiny_vae(8, calibrate=False), tiny_clip(projection_dim=768), task="depth_zbuffer",
                            num_concepts=cfg["concepts"], attention=attention).to(device)
    g = torch.Generator().manual_seed(1)
    b, side = cfg["batch"], cfg["latent"]
    labels = torch.rand(b, 1, 8 * side, 8 * side, generator=g).to(device)
    model.fit_buckets(labels)
    encoded = EncodedImages(torch.randn(b, 4, side, side, generator=g).to(device),
                            torch.randn(b, 768, generator=g).to(device))
    targets = model.prepare_targets(labels)
    t, noise = model.sample_step_inputs(encoded.latents, g)
    return model, encoded, targets, t, noise


def _fn(case, model, encoded, targets, t, noise):
    if case == "inference":
        size = targets.ids.shape[-2:]

        def infer():
            with torch.no_grad():
                t200 = torch.full_like(t, model.inference_timestep)
                return model.forward(encoded, t200, noise, size)["value"]
        return infer, None

    opt = torch.optim.Adam(model.mark_trainable().trainable_parameters(), lr=1e-3)

    def step():
        loss, _, _ = model.loss(encoded, targets, t, noise)
        loss.backward()
        opt.step()
        return loss

    return step, lambda: opt.zero_grad(set_to_none=True)


def _peak_rss_growth_mb(fn, reset) -> float | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        if reset is not None:
            reset()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None

    def hwm():
        return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    base = hwm()
    fn()
    return hwm() - base


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["step", "inference"])
def test_bench_concept_fewshot(benchmark, measure, device, dtype, case, impl):
    cfg = GPU_CONFIG if device.type == "cuda" else CPU_CONFIG
    model, encoded, targets, t, noise = _build(device, dtype, cfg, impl)
    fn, reset = _fn(case, model, encoded, targets, t, noise)
    info = {"suite": "concept_fewshot", "case": case, "impl": impl, "batch": cfg["batch"],
            "latent": cfg["latent"], "tokens_first_level": cfg["latent"] ** 2, "concepts": cfg["concepts"],
            "widths": list(cfg["unet"]["block_out_channels"]), "label_size": 8 * cfg["latent"],
            "recorded_blocks": len(model.recorder.layers)}
    if device.type == "cpu":
        fn()  # warm-up before the resident-set measurement (kernels, BLAS buffers)
        info["peak_rss_growth_mb"] = _peak_rss_growth_mb(fn, reset)
    benchmark.group = f"concept_fewshot {case}"
    measure(benchmark, fn, device=device, dtype=dtype, reset=reset, info=info)
    out = fn()
    assert torch.isfinite(out).all()
