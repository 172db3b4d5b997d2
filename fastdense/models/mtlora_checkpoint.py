"""Checkpoints of the released MTLoRA code, and pretrained weights for :class:`MTLoRASwin`.

The released model (``models/swin_mtl.MultiTaskSwin`` around
``models/swin_transformer_mtlora.SwinTransformerMTLoRA``) saves its state dict
under ``"model"``. Its keys, and where they go (``{i}`` stage, ``{j}`` block,
``{t}`` task, ``{k}`` stage index of a decoder input)::

    backbone.patch_embed.*                          backbone.patch_embed.*
    backbone.layers.{i}.blocks.{j}.norm1|norm2.*    the same
    ...attn.relative_position_bias_table            the same
    ...attn.relative_position_index, ...attn_mask   dropped (buffers we recompute)
    ...attn.qkv|attn.proj|mlp.fc1|mlp.fc2.linear.*  ...attn.qkv|... .weight / .bias
    ...lora_shared_A|B, lora_tasks_A|B.{t},
       lora_norm.*, lora_shared_scale,
       lora_task_scale.{t}                           the same
    backbone.layers.{i}.downsample.*                backbone.layers.{i+1}.downsample.*
                                                    (the merging that ends stage i starts stage i+1)
    downsampler.{t}.downsample_{k}.weight           decoders.{t}.downsampler.proj.{k}.weight
    decoders.decoders.{t}.last_layer.*              decoders.{t}.head.last_layer.*

Options of the released code that the configurations of the paper leave off
(a LoRA on the patch-merging reduction, q/k/v split into three layers, a
classification head) have no counterpart here; their keys raise ValueError.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Union

import torch.nn as nn

from fastdense.models.swin_checkpoint import LoadReport, _unwrap, read_state_file
from fastdense.models.swin_checkpoint import load_pretrained as load_swin_pretrained

# Buffers the released models save and fastdense recomputes (also read by tadformer_checkpoint).
BUFFERS = ("relative_position_index", "attn_mask")
_LINEAR_BASE = re.compile(r"(.*\.(?:qkv|proj|fc1|fc2))\.linear\.(weight|bias)")
_MERGING = re.compile(r"layers\.(\d+)\.downsample\.(.*)")
_DOWNSAMPLER = re.compile(r"downsampler\.([^.]+)\.downsample_(\d+)\.(weight|bias)")
_HEAD = re.compile(r"decoders\.decoders\.([^.]+)\.(last_layer\..*)")


def decoder_key(key: str) -> str | None:
    """fastdense's name of a decoder key of the released MTLoRA layout (which TADFormer's code
    keeps), or None for any other key."""
    m = _DOWNSAMPLER.fullmatch(key)
    if m:
        task, stage, kind = m.groups()
        return f"decoders.{task}.downsampler.proj.{stage}.{kind}"
    m = _HEAD.fullmatch(key)
    if m:
        task, rest = m.groups()
        return f"decoders.{task}.head.{rest}"
    return None


def is_mtlora_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for a state dict of the released MTLoRA model (after unwrapping)."""
    return any(k.startswith(("backbone.layers.", "module.backbone.layers.")) and ".linear.weight" in k
               for k in state_dict) or any(k.startswith("decoders.decoders.") for k in state_dict)


def _convert_backbone_key(rest: str) -> str:
    if ".qkv.q." in rest or ".qkv.k." in rest or ".qkv.v." in rest:
        raise ValueError(f"backbone.{rest}: the released SPLIT_QKV option (separate q, k, v layers) "
                         "is not supported")
    merging = _MERGING.fullmatch(rest)
    if merging:
        stage, tail = int(merging.group(1)), merging.group(2)
        if tail.startswith("reduction.") and tail != "reduction.weight":
            raise ValueError(f"backbone.{rest}: a LoRA on the patch-merging reduction (DOWNSAMPLER_ENABLED) "
                             "is not supported")
        return f"layers.{stage + 1}.downsample.{tail}"
    if rest.startswith(("head.", "norm.")):
        raise ValueError(f"backbone.{rest}: the MTLoRA backbone has no final norm or classifier")
    base = _LINEAR_BASE.fullmatch(rest)
    if base:
        return f"{base.group(1)}.{base.group(2)}"
    return rest


def convert_mtlora_checkpoint(state_dict: Mapping[str, Any]) -> dict:
    """A state dict saved by the released MTLoRA model -> :class:`MTLoRASwin`'s keys.

    Accepts the training checkpoint (weights under "model") or the bare state dict, with
    or without DDP's "module." prefix. Every key is mapped (see the module docstring) or
    raises ValueError naming it, so that ``load_state_dict(..., strict=True)`` of the
    result checks the rest. Tensors are not copied.
    """
    sd = _unwrap(state_dict)
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    out: dict = {}
    for key, value in sd.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.endswith(BUFFERS):
            continue
        if k.startswith("backbone."):
            new = "backbone." + _convert_backbone_key(k[len("backbone."):])
        else:
            new = decoder_key(k)
            if new is None:
                raise ValueError(f"{key!r} is not a key of the released MTLoRA model")
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


# The released training checkpoints pickle their yacs config next to the weights.
_REFUSED_HINT = ("The released MTLoRA training checkpoints also pickle their yacs config object; in an "
                 "environment you trust, keep only the weights: "
                 "torch.save(torch.load(path, weights_only=False)['model'], 'mtlora_weights.pt')")


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike], *, source: str = "auto",
                    strict: bool = True) -> LoadReport:
    """Load local weights into an :class:`~fastdense.models.mtlora.MTLoRASwin`; never downloads.

    ``source``: "mtlora" (a state dict of the released MTLoRA model, converted by
    :func:`convert_mtlora_checkpoint` and loaded whole), "timm" / "microsoft" (ImageNet
    Swin weights, loaded into ``model.backbone`` by
    :func:`fastdense.models.swin_checkpoint.load_pretrained`), or "auto" (detect). For a
    Swin checkpoint the adapters and decoders keep their initialisation and the
    checkpoint's final norm and classifier are dropped (MTLoRA's backbone has neither);
    with ``strict`` any other missing or unexpected key raises ValueError.
    """
    path = os.fspath(path)
    if source not in ("auto", "mtlora", "timm", "microsoft"):
        raise ValueError(f"source must be 'auto', 'mtlora', 'timm' or 'microsoft', got {source!r}")
    if source in ("auto", "mtlora"):
        sd = _unwrap(read_state_file(path, "MTLoRA", _REFUSED_HINT))
        if source == "mtlora" or (isinstance(sd, Mapping) and is_mtlora_layout(sd)):
            converted = convert_mtlora_checkpoint(sd)
            result = model.load_state_dict(converted, strict=strict)
            report = LoadReport(path=path, missing=list(result.missing_keys),
                                unexpected=list(result.unexpected_keys), converted_from=["mtlora"])
            report.dropped = [k for k in sd if k.endswith(BUFFERS)]
            return report
    report = load_swin_pretrained(model.backbone, path, source="auto" if source == "auto" else source)
    adapters = [k for k in report.missing if ".lora_" in f".{k}"]
    report.missing = ["backbone." + k for k in report.missing if k not in adapters]
    final = [k for k in report.unexpected if k.startswith("norm.")]
    report.unexpected = [k for k in report.unexpected if k not in final]
    report.dropped += final
    if final:
        report.notes.append("the checkpoint's final norm is dropped: MTLoRA's backbone has none")
    if adapters:
        report.notes.append(f"{len(adapters)} LoRA parameter(s) and the decoders keep their initialisation")
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{path} does not fit the MTLoRA backbone:\n{report}")
    return report


__all__ = ["convert_mtlora_checkpoint", "is_mtlora_layout", "load_pretrained"]
