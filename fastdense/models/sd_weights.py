"""Stable Diffusion U-Net and VAE for the diffusion few-shot models: loaded from a
LOCAL diffusers folder only (:func:`build_unet_vae`; nothing is downloaded, a
wrong folder names the layout it expects), or tiny random ones built in code
for tests, demos and CPU benchmarks (:func:`tiny_unet_vae`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn



@dataclass
class StableDiffusionParts:
    """What :func:`build_unet_vae` loads: the frozen U-Net and VAE, the training
    schedule's ᾱ_t and the empty-prompt conditioning (None when the folder has
    no text encoder: the model then uses an all-zero context)."""

    unet: nn.Module
    vae: nn.Module
    alphas_cumprod: torch.Tensor
    conditioning: torch.Tensor | None
    sd_dir: str


SD_LAYOUT = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors (or .bin)",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors (or .bin)",
             "scheduler/scheduler_config.json",
             "optional: text_encoder/ and tokenizer/ (the empty-prompt conditioning)")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def _sd_layout_error(sd_dir: Path, problem: str) -> FileNotFoundError:
    layout = "\n".join(f"  {sd_dir}/{p}" for p in SD_LAYOUT)
    return FileNotFoundError(f"{problem}. A Stable Diffusion v1.4 / v2.1 folder (diffusers layout, e.g. "
                             f"CompVis/stable-diffusion-v1-4 as saved by save_pretrained) must hold:\n{layout}")


def build_unet_vae(sd_dir, *, dtype: torch.dtype | None = None, device=None,
                   empty_prompt: bool = True) -> StableDiffusionParts:
    """Load Stable Diffusion's U-Net, VAE and schedule from a LOCAL diffusers
    folder (``from_pretrained(local_dir, local_files_only=True)``; nothing is
    downloaded). A missing folder, subfolder, config or weight file raises
    FileNotFoundError naming the folder and the expected layout
    (:data:`SD_LAYOUT`). With ``text_encoder/`` and ``tokenizer/`` present
    (and transformers installed) the empty prompt is encoded once as the
    U-Net's conditioning (docs/paper-decisions.md, 'U-Net conditioning')."""
    root = Path(sd_dir).expanduser()
    if not root.is_dir():
        raise _sd_layout_error(root, f"Stable Diffusion folder {root} does not exist")
    for sub, config in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (root / sub / config).is_file():
            raise _sd_layout_error(root, f"{root / sub / config} is missing")
        if sub != "scheduler" and not any((root / sub / w).is_file() for w in _WEIGHT_FILES):
            raise _sd_layout_error(root, f"no weights in {root / sub} (looked for {', '.join(_WEIGHT_FILES)})")
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("build_unet_vae needs diffusers (pip install 'fastdense[diffusion]')") from exc
    kw = dict(local_files_only=True)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    variant = None if any((root / "unet" / w).is_file() for w in _WEIGHT_FILES[:2]) else "fp16"
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(root, subfolder="unet", variant=variant, **kw)
        vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", variant=variant, **kw)
        scheduler = diffusers.DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _sd_layout_error(root, f"diffusers could not load {root}: {str(exc).splitlines()[0]}") from exc
    conditioning = _empty_prompt(root, unet.config.cross_attention_dim) if empty_prompt else None
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if device is not None:
        unet.to(device)
        vae.to(device)
    if conditioning is not None:
        conditioning = conditioning.to(device=device, dtype=dtype or conditioning.dtype)
    return StableDiffusionParts(unet, vae, scheduler.alphas_cumprod.float(), conditioning, str(root))


@torch.no_grad()
def _empty_prompt(root: Path, dim: int) -> torch.Tensor | None:
    if not ((root / "text_encoder").is_dir() and (root / "tokenizer").is_dir()):
        return None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        return None
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    hidden = encoder(ids)[0].float()
    if hidden.shape[-1] != dim:
        raise ValueError(f"text encoder width {hidden.shape[-1]} != U-Net cross_attention_dim {dim} in {root}")
    return hidden


#: A tiny random U-Net with SD 1.x's block structure (three cross-attention
#: levels and a plain one, mirrored in the decoder) and a tiny 8× VAE: 64 px
#: images give 8 × 8 latents. For tests, demos and the CPU benchmarks. The
#: VAE's scaling factor plays the part of SD's 0.18215: the inverse std of its
#: latents (about 0.2 for these random weights on the synthetic scenes), so
#: the signal-to-noise ratio of z_t at each timestep is SD's, not drowned.
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32, 32),
                        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16,
                        attention_head_dim=8, norm_num_groups=4)
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                       latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=64,
                       scaling_factor=5.0)


def tiny_unet_vae(seed: int = 0, unet_config: Mapping | None = None, vae_config: Mapping | None = None):
    """``(unet, vae)``: random diffusers models of :data:`TINY_UNET_CONFIG` and
    :data:`TINY_VAE_CONFIG` (overridable), built in code from ``seed`` without
    touching the global RNG."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**{**TINY_UNET_CONFIG, **(unet_config or {})})
        vae = diffusers.AutoencoderKL(**{**TINY_VAE_CONFIG, **(vae_config or {})})
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)
