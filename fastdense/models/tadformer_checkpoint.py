"""Checkpoints of the released TADFormer code, and pretrained weights for :class:`TADFormerSwin`.

The released model (``models/swin_mtl.MultiTaskSwin`` around
``models/swin_transformer_tadformer.SwinTransformerTADFormer``) saves its state
dict under ``"model"``. Its keys, and where they go (``{i}`` stage, ``{j}``
block, ``{t}`` task, ``{k}`` stage index of a decoder input)::

    backbone.task_prompts                           task_prompts
    backbone.patch_embed.*                          backbone.patch_embed.*
    backbone.layers.{i}.blocks.{j}.norm1|norm2.*    the same
    ...attn.relative_position_bias_table            the same
    ...attn.relative_position_index, ...attn_mask   dropped (buffers we recompute)
    ...attn.qkv|attn.proj|mlp.fc1|mlp.fc2
       .linear.weight / .linear.bias                ... .weight / .bias
       .lora_shared_A / .lora_shared_B              the same
       .lora_filter.{t}.conv2d.*                    the same (filter="static")
       .lora_filter.conv.*                          .lora_filter.phi.* (a DTF, filter="dynamic")
       .lora_filter.chan_FilterNorm.std|mean        .lora_filter.filter_norm.std|mean
    ...attn.proj.prompt_layernorm.*                 ...attn.prompt_norm.*
    backbone.layers.{i}.prompt_gate  (1,)           stage_gate[i]  (one (n_stages,) tensor)
    backbone.layers.{i}.downsample.task_prompts_up  prompt_up.{i}
    backbone.layers.{i}.downsample.norm|reduction   backbone.layers.{i+1}.downsample.*
                                                    (the merging that ends stage i starts stage i+1)
    downsampler.{t}.downsample_{k}.weight           decoders.{t}.downsampler.proj.{k}.weight
    decoders.decoders.{t}.last_layer.*              decoders.{t}.head.last_layer.*

The released layer's task filters are static (``NaiveConvFilter``), so its
checkpoints load into ``tadformer_swin_t(filter="static")``; the DTF keys are
mapped too, for the released code with its commented-out DTF line restored.
Options the released configurations leave off (a classifier head, a LoRA on
the patch-merging reduction, a final norm) raise ValueError.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from fastdense.models.mtlora_checkpoint import BUFFERS, decoder_key
from fastdense.models.swin_checkpoint import LoadReport, _unwrap, read_state_file
from fastdense.models.swin_checkpoint import load_pretrained as load_swin_pretrained

_RENAMES = ((re.compile(r"(.*\.(?:qkv|proj|fc1|fc2))\.linear\.(weight|bias)"), r"\1.\2"),
            (re.compile(r"(.*)\.lora_filter\.conv\.(weight|bias)"), r"\1.lora_filter.phi.\2"),
            (re.compile(r"(.*)\.lora_filter\.chan_FilterNorm\.(std|mean)"), r"\1.lora_filter.filter_norm.\2"),
            (re.compile(r"(.*\.attn)\.proj\.prompt_layernorm\.(weight|bias)"), r"\1.prompt_norm.\2"))
_GATE = re.compile(r"layers\.(\d+)\.prompt_gate")
_PROMPT_UP = re.compile(r"layers\.(\d+)\.downsample\.task_prompts_up\.weight")
_MERGING = re.compile(r"layers\.(\d+)\.downsample\.(.*)")


def is_tadformer_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for a state dict of the released TADFormer model (after unwrapping)."""
    return any(k in ("backbone.task_prompts", "module.backbone.task_prompts") for k in state_dict)


def _convert_backbone_key(rest: str) -> str:
    if rest == "task_prompts":
        return "task_prompts"
    up = _PROMPT_UP.fullmatch(rest)
    if up:
        return f"prompt_up.{up.group(1)}.weight"
    merging = _MERGING.fullmatch(rest)
    if merging:
        stage, tail = int(merging.group(1)), merging.group(2)
        if tail.startswith("reduction.") and tail != "reduction.weight":
            raise ValueError(f"backbone.{rest}: a LoRA on the patch-merging reduction (DOWNSAMPLER_ENABLED) "
                             "is not supported")
        return f"backbone.layers.{stage + 1}.downsample.{tail}"
    if rest.startswith(("head.", "norm.")):
        raise ValueError(f"backbone.{rest}: the TADFormer backbone has no final norm or classifier "
                         "(the released multi-task configuration sets NUM_CLASSES = 0)")
    for pattern, repl in _RENAMES:
        if pattern.fullmatch(rest):
            return "backbone." + pattern.sub(repl, rest)
    return "backbone." + rest


def convert_tadformer_checkpoint(state_dict: Mapping[str, Any]) -> dict:
    """A state dict saved by the released TADFormer model -> :class:`TADFormerSwin`'s keys.

    Accepts the training checkpoint (weights under "model") or the bare state dict, with
    or without DDP's "module." prefix. Every key is mapped (see the module docstring) or
    raises ValueError naming it, so that ``load_state_dict(..., strict=True)`` of the
    result checks the rest. The per-stage gates are concatenated into ``stage_gate``;
    other tensors are not copied.
    """
    sd = _unwrap(state_dict)
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    out: dict = {}
    gates: dict = {}
    for key, value in sd.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.endswith(BUFFERS):
            continue
        if k.startswith("backbone."):
            rest = k[len("backbone."):]
            gate = _GATE.fullmatch(rest)
            if gate:
                gates[int(gate.group(1))] = value
                continue
            new = _convert_backbone_key(rest)
        else:
            new = decoder_key(k)
            if new is None:
                raise ValueError(f"{key!r} is not a key of the released TADFormer model")
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    if gates:
        if sorted(gates) != list(range(len(gates))):
            raise ValueError(f"the checkpoint has prompt gates of stages {sorted(gates)}; expected 0..{len(gates) - 1}")
        out["stage_gate"] = torch.cat([gates[i].reshape(-1) for i in range(len(gates))])
    return out


# The released training checkpoints pickle their yacs config next to the weights.
_REFUSED_HINT = ("The released TADFormer training checkpoints also pickle their yacs config object; in an "
                 "environment you trust, keep only the weights: "
                 "torch.save(torch.load(path, weights_only=False)['model'], 'tadformer_weights.pt')")


def _unused_prompt_norms(model: nn.Module, keys) -> list:
    """Converted prompt-norm keys of blocks where ``model`` builds none (prompt_norm_every_block=False):
    the released code keeps a prompt LayerNorm in every block but reads only the last of each stage's."""
    names = set(model.state_dict())
    return [k for k in keys if ".attn.prompt_norm." in k and k not in names]


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike], *, source: str = "auto",
                    strict: bool = True) -> LoadReport:
    """Load local weights into a :class:`~fastdense.models.tadformer.TADFormerSwin`; never downloads.

    ``source``: "tadformer" (a state dict of the released model, converted by
    :func:`convert_tadformer_checkpoint` and loaded whole), "timm" / "microsoft"
    (ImageNet Swin weights into ``model.backbone``), or "auto" (detect). For a Swin
    checkpoint the adapters, prompts, gates and decoders keep their initialisation and
    the checkpoint's final norm and classifier are dropped; with ``strict`` any other
    missing or unexpected key raises ValueError.
    """
    path = os.fspath(path)
    if source not in ("auto", "tadformer", "timm", "microsoft"):
        raise ValueError(f"source must be 'auto', 'tadformer', 'timm' or 'microsoft', got {source!r}")
    if source in ("auto", "tadformer"):
        sd = _unwrap(read_state_file(path, "TADFormer", _REFUSED_HINT))
        if source == "tadformer" or (isinstance(sd, Mapping) and is_tadformer_layout(sd)):
            converted = convert_tadformer_checkpoint(sd)
            static = any(".conv2d." in k for k in converted if ".lora_filter." in k)
            if static and getattr(model, "filter", "static") != "static":
                raise ValueError(f"{path} holds the released code's static task filters; build the model with "
                                 "filter='static' to load it")
            unused = _unused_prompt_norms(model, converted)
            for k in unused:
                del converted[k]
            result = model.load_state_dict(converted, strict=strict)
            report = LoadReport(path=path, missing=list(result.missing_keys),
                                unexpected=list(result.unexpected_keys), converted_from=["tadformer"])
            report.dropped = [k for k in sd if k.endswith(BUFFERS)] + unused
            if unused:
                report.notes.append(f"{len(unused)} prompt LayerNorm parameter(s) of blocks that never read them "
                                    "are dropped (prompt_norm_every_block=False)")
            return report
    report = load_swin_pretrained(model.backbone, path, source="auto" if source == "auto" else source)
    adapters = [k for k in report.missing if ".lora_" in f".{k}" or ".prompt_norm." in f".{k}"]
    report.missing = ["backbone." + k for k in report.missing if k not in adapters]
    final = [k for k in report.unexpected if k.startswith("norm.")]
    report.unexpected = [k for k in report.unexpected if k not in final]
    report.dropped += final
    if final:
        report.notes.append("the checkpoint's final norm is dropped: TADFormer's backbone has none")
    if adapters:
        report.notes.append(f"{len(adapters)} adapter and prompt-norm parameter(s), the prompts, gates and "
                            "decoders keep their initialisation")
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{path} does not fit the TADFormer backbone:\n{report}")
    return report


__all__ = ["convert_tadformer_checkpoint", "is_tadformer_layout", "load_pretrained"]
