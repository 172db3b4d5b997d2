"""A hook-free walk through a diffusers ``UNet2DConditionModel`` that returns
intermediate block outputs.

Why not forward hooks: hooks registered after ``torch.compile`` are not seen
by the compiled graph, and hooks writing into a Python dict from inside a
traced module are a classic source of graph breaks. Running the U-Net's own
submodules from our forward (the way ``UNet2DConditionModel.forward`` does)
returns the features as ordinary outputs, traces with ``fullgraph=True`` and
stops after the deepest requested block, so the tail of the decoder and the
output convolution are never computed.

The walk mirrors ``UNet2DConditionModel.forward`` of diffusers 0.2x–0.4x for
the configurations Stable Diffusion 1.x/2.x use (no class / addition
embeddings, no image-projected encoder states, no attention masks, no
ControlNet or T2I-Adapter residuals). :func:`unsupported_reasons` lists why a
U-Net outside that set is refused, rather than silently computing something
else.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def block_names(unet: nn.Module) -> list[str]:
    """Every block whose output can be returned, in execution order."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return names


def unsupported_reasons(unet: nn.Module) -> list[str]:
    """Why :func:`unet_block_features` cannot mirror this U-Net's forward (empty when it can)."""
    reasons = []
    for attr in ("down_blocks", "up_blocks", "conv_in", "time_proj", "time_embedding"):
        if not hasattr(unet, attr):
            reasons.append(f"no attribute {attr!r}: not a diffusers UNet2DConditionModel")
    if reasons:
        return reasons
    config = unet.config
    if getattr(unet, "class_embedding", None) is not None:
        reasons.append("class embeddings (class_embed_type) are not supported")
    if config.get("addition_embed_type") is not None:
        reasons.append(f"addition_embed_type={config.get('addition_embed_type')!r} is not supported")
    hid_type = config.get("encoder_hid_dim_type")
    if getattr(unet, "encoder_hid_proj", None) is not None and hid_type != "text_proj":
        reasons.append(f"encoder_hid_dim_type={hid_type!r} needs image embeddings and is not supported")
    if getattr(unet, "position_net", None) is not None:
        reasons.append("GLIGEN position nets are not supported")
    return reasons


def unet_block_features(
    unet: nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    wanted: frozenset[str] | set[str],
    last: str,
) -> dict[str, torch.Tensor]:
    """Run ``unet`` on ``sample`` (N, C, h, w) with one timestep per row
    (``timesteps`` (N,)) and return the outputs of the blocks in ``wanted``,
    stopping after block ``last``.

    ``encoder_hidden_states`` is (N, n, D) (an expanded view is fine). The
    code follows ``UNet2DConditionModel.forward`` step by step; the step
    numbers in the comments are diffusers'.
    """
    out: dict[str, torch.Tensor] = {}

    # Odd latent sizes: the down path rounds up (stride-2 convs with padding 1),
    # so each upsampler must be told the size of the skip it meets.
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. time: sinusoidal projection (always fp32) cast to the U-Net's dtype, then the MLP.
    t_emb = unet.time_proj(timesteps).to(dtype=sample.dtype)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    if unet.encoder_hid_proj is not None:  # "text_proj", the only kind unsupported_reasons lets through
        encoder_hidden_states = unet.encoder_hid_proj(encoder_hidden_states)

    # 2. pre-process
    sample = unet.conv_in(sample)

    # 3. down
    skips: tuple[torch.Tensor, ...] = (sample,)
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
        name = f"down_blocks.{i}"
        if name in wanted:
            out[name] = sample
        if name == last:
            return out

    # 4. mid
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
        if "mid_block" in wanted:
            out["mid_block"] = sample
        if last == "mid_block":
            return out

    # 5. up
    for i, block in enumerate(unet.up_blocks):
        is_final = i == len(unet.up_blocks) - 1
        n_res = len(block.resnets)
        res, skips = skips[-n_res:], skips[:-n_res]
        upsample_size = skips[-1].shape[2:] if (not is_final and forward_upsample_size) else None
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states,
                upsample_size=upsample_size,
            )
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        name = f"up_blocks.{i}"
        if name in wanted:
            out[name] = sample
        if name == last:
            return out
    return out
