"""The three frozen networks of the concept-codebook model: a Stable Diffusion U-Net and VAE,
and a CLIP image encoder — from local folders, or tiny random ones built in code.

Weights are read from local directories only (``local_files_only=True``):
nothing is downloaded. :func:`load_backbones` checks the layout first and
names the missing folder or file, with the layout it expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch

SD_LAYOUT = """expected a Stable Diffusion 2.x folder in diffusers' layout (e.g. a local copy of
stable-diffusion-2-1-base):
  <sd_dir>/unet/config.json + diffusion_pytorch_model.safetensors (or .bin)
  <sd_dir>/vae/config.json  + diffusion_pytorch_model.safetensors (or .bin)
  <sd_dir>/scheduler/scheduler_config.json   (optional; SD's schedule otherwise)"""
CLIP_LAYOUT = """expected a CLIP image encoder folder in transformers' layout (CLIPVisionModelWithProjection,
e.g. a local copy of the image tower of a CLIP ViT-L/14 or ViT-H/14):
  <clip_dir>/config.json + model.safetensors (or pytorch_model.bin)"""

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                         "pytorch_model.bin.index.json")

#: The U-Net of Stable Diffusion 2.x (block widths, heads of 64 channels,
#: OpenCLIP-H context): what the benchmark builds with random weights.
SD2_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)


class Backbones(NamedTuple):
    unet: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    alphas_cumprod: Optional[torch.Tensor]  # None: SD's schedule


def _require(path: Path, what: str, layout: str, names=None) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}\n{layout}")
    if not (path / "config.json").is_file() and names is not None:
        raise FileNotFoundError(f"{what} folder {path} has no config.json\n{layout}")
    if names is not None and not any((path / n).is_file() for n in names):
        raise FileNotFoundError(f"{what} folder {path} has no weights ({' or '.join(names[:2])})\n{layout}")


def load_backbones(sd_dir, clip_dir, *, dtype: Optional[torch.dtype] = None, device=None) -> Backbones:
    """U-Net, VAE (and the training schedule) from ``sd_dir``; the CLIP image encoder from ``clip_dir``.

    Only local files are read. Raises FileNotFoundError naming the missing
    folder or file and the expected layout (:data:`SD_LAYOUT`, :data:`CLIP_LAYOUT`).
    """
    sd, clip = Path(sd_dir), Path(clip_dir)
    if not sd.is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder not found: {sd}\n{SD_LAYOUT}")
    _require(sd / "unet", "Stable Diffusion U-Net", SD_LAYOUT, _DIFFUSERS_WEIGHTS)
    _require(sd / "vae", "Stable Diffusion VAE", SD_LAYOUT, _DIFFUSERS_WEIGHTS)
    if not clip.is_dir():
        raise FileNotFoundError(f"CLIP image encoder folder not found: {clip}\n{CLIP_LAYOUT}")
    _require(clip, "CLIP image encoder", CLIP_LAYOUT, _TRANSFORMERS_WEIGHTS)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    kw = {} if dtype is None else {"torch_dtype": dtype}
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", local_files_only=True, **kw)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", local_files_only=True, **kw)
    alphas = None
    if (sd / "scheduler" / "scheduler_config.json").is_file():
        sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler", local_files_only=True)
        alphas = sched.alphas_cumprod.float()
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip, local_files_only=True, **kw)
    if device is not None:
        unet, vae, encoder = unet.to(device), vae.to(device), encoder.to(device)
    return Backbones(unet, vae, encoder, alphas)


# ----------------------------------------------------------------------------- tiny random networks
def tiny_unet(levels: int = 2, width: int = 32, cross_dim: int = 32, heads: int = 2, layers_per_block: int = 1,
              seed: int = 0, sample_size: int = 16, self_attention_gain: float | None = 2.0):
    """A random SD-shaped U-Net: ``levels`` resolutions, cross-attention on all but the lowest
    (SD 1.x/2.x with 4 levels and 2 layers per block has SD's 16 transformer blocks), ``heads``
    attention heads per block (what diffusers' UNet2DConditionModel calls attention_head_dim).

    ``self_attention_gain``: with diffusers' default initialisation the
    self-attention logits are tiny (q·k/√d has a standard deviation of about
    0.3), so every M_sa is nearly uniform and M_saᵀ M_ca is the same at every
    pixel: a random U-Net would hold no spatial information for the concepts
    to read. Trained SD self-attention instead attends to positions that look
    alike. So, by default, each self-attention's key projection is set to its
    query projection (logits q_i·q_j: largest for similar features) and both
    are scaled by this gain; the cross-attention queries are scaled by it too,
    so that concept embeddings of unit scale already give peaked M_ca. None
    keeps diffusers' initialisation.
    """
    import diffusers

    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    widths = tuple(width * min(2 ** i, 4) for i in range(levels))
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=widths,
        layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_dim, attention_head_dim=heads, norm_num_groups=8).eval()
    if self_attention_gain is not None:
        from diffusers.models.attention import BasicTransformerBlock

        with torch.no_grad():
            for block in unet.modules():
                if isinstance(block, BasicTransformerBlock):
                    block.attn1.to_q.weight.mul_(self_attention_gain)
                    block.attn1.to_k.weight.copy_(block.attn1.to_q.weight)
                    block.attn2.to_q.weight.mul_(self_attention_gain)
    return unet


def tiny_vae(downsample: int = 4, width: int = 16, seed: int = 0, calibrate: bool = True, latent_channels: int = 4):
    """A random AutoencoderKL that shrinks images by ``downsample`` (a power of two) to 4 latent channels.

    ``calibrate``: set ``scaling_factor`` to 1 / the standard deviation of the
    latents of a few synthetic scenes, the way SD's 0.18215 was chosen for its
    VAE. With SD's factor, this random VAE's latents would have a standard
    deviation of about 0.06, and at t = 200 (√(1 − ᾱ) ≈ 0.5) the U-Net would
    see almost nothing but noise.
    """
    import diffusers

    levels = int(downsample).bit_length()  # 1 -> 1 level, 2 -> 2, 4 -> 3, 8 -> 4
    if downsample < 1 or 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    widths = tuple(width * min(2 ** i, 2) for i in range(levels))
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=widths, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8, sample_size=64).eval()
    if calibrate:
        from fastdense.data import SyntheticScenes

        scenes = SyntheticScenes(4, 64, seed=0, tasks=["semseg"])
        images = torch.stack([scenes[i]["image"] for i in range(len(scenes))])
        with torch.no_grad():
            std = float(vae.encode(images * 2 - 1).latent_dist.mean.std())
        vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def tiny_clip(hidden: int = 32, projection_dim: int = 16, image_size: int = 32, seed: int = 0):
    """A random CLIPVisionModelWithProjection (2 layers, 4 heads, patches of 8)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=8,
                              projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_backbones(seed: int = 0, levels: int = 2, width: int = 32, cross_dim: int = 32, heads: int = 2,
                   layers_per_block: int = 1, vae_downsample: int = 4,
                   self_attention_gain: float | None = 2.0) -> Backbones:
    """Tiny random U-Net (see :func:`tiny_unet`), VAE and CLIP image encoder for tests and demos."""
    return Backbones(tiny_unet(levels, width, cross_dim, heads, layers_per_block, seed,
                               self_attention_gain=self_attention_gain),
                     tiny_vae(vae_downsample, seed=seed + 1), tiny_clip(seed=seed + 2), None)


__all__ = ["Backbones", "CLIP_LAYOUT", "SD2_UNET_CONFIG", "SD_LAYOUT", "load_backbones", "tiny_backbones",
           "tiny_clip", "tiny_unet", "tiny_vae"]
