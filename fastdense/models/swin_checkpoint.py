"""Swin checkpoints: the original Microsoft layout converted to timm's, and loading from local files.

:func:`load_pretrained` reads local ``.safetensors`` or torch files (never
downloads), converts the original Microsoft layout (also timm < 0.9's), drops a
classifier the model does not have, and resizes relative-position bias tables
bicubically when the window size differs (as the Swin code does for fine-tuning
at another window size).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from fastdense.models.swin import resize_relative_position_bias_table, to_2tuple

_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")
_TABLE_SUFFIX = "relative_position_bias_table"
_PREFIXES = ("module.", "backbone.")


def _unwrap(obj: Any) -> Any:
    # Training checkpoints nest the weights under "model" (Microsoft) or "state_dict".
    while isinstance(obj, Mapping) and "patch_embed.proj.weight" not in obj:
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def is_microsoft_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for the original Microsoft (and timm < 0.9) layout: patch merging at the end
    of stages 0..2 (``layers.0.downsample.*`` exists) or a bare ``head.weight``."""
    return "head.weight" in state_dict or any(k.startswith("layers.0.downsample.") for k in state_dict)


def convert_microsoft_swin(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Original Microsoft Swin checkpoint -> this module's (timm >= 0.9) key layout.

    Moves ``layers.{i}.downsample.*`` to ``layers.{i+1}.downsample.*`` (the merging that
    ends stage i feeds stage i+1), renames ``head.{weight,bias}`` to ``head.fc.*`` and
    drops the ``relative_position_index`` / ``attn_mask`` buffers. A dict wrapped under
    "model" or "state_dict" is unwrapped. Tensors are not copied.
    """
    sd = _unwrap(state_dict)
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        if key in ("head.weight", "head.bias"):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    missing / unexpected: model keys the checkpoint lacked / checkpoint keys the model
    lacks, after conversion (as ``load_state_dict`` reports them). converted_from: the
    conversions applied (``"microsoft"``, ``"prefix 'module.'"``). interpolated: bias
    tables resized to the model's window. dropped: checkpoint keys left out on purpose
    (buffers, a classifier the model does not have); ``notes`` says why.
    """

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    converted_from: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing and no unexpected keys."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        def short(keys: list[str], limit: int = 6) -> str:
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        lines = [f"loaded Swin weights from {self.path}"]
        if self.converted_from:
            lines.append(f"  converted from: {', '.join(self.converted_from)}")
        if self.interpolated:
            lines.append(f"  interpolated {len(self.interpolated)} bias table(s): {short(self.interpolated, 3)}")
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} key(s): {short(self.dropped)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append(f"  missing {len(self.missing)}" + (f": {short(self.missing)}" if self.missing else ""))
        lines.append(f"  unexpected {len(self.unexpected)}"
                     + (f": {short(self.unexpected)}" if self.unexpected else ""))
        return "\n".join(lines)


def read_state_file(path: str, what: str = "Swin", refused_hint: str = "") -> Any:
    """The object of a local ``.safetensors`` or torch file, read without running pickled code
    (``weights_only=True``). A missing file raises FileNotFoundError, an unreadable one
    ValueError naming the file as "not a <what> checkpoint" and adding ``refused_hint``
    (how to extract the weights from a file that pickles other objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors comes with transformers/diffusers
            raise ImportError(f"reading {path} needs the 'safetensors' package: pip install safetensors") from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise ValueError(f"{path} is not a {what} checkpoint: not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (non-tensor objects), not a torch file, truncated...
        raise ValueError(f"{path} is not a {what} checkpoint: torch.load(weights_only=True) failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         + (f". {refused_hint}" if refused_hint else "")) from e


def _window_of(model: nn.Module, table_key: str) -> Optional[tuple[int, int]]:
    try:
        owner = model.get_submodule(table_key[: -len(_TABLE_SUFFIX) - 1])
    except AttributeError:
        return None
    window = getattr(owner, "window_size", None)
    return to_2tuple(window) if window is not None else None


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike], *, source: str = "auto",
                    strict: bool = False) -> LoadReport:
    """Load local Swin weights into ``model``; never downloads.

    ``path``: a ``.safetensors`` file or a torch file (read with ``weights_only=True``),
    a bare state dict or one wrapped under "model"/"state_dict"; a "module." or
    "backbone." prefix is stripped. ``source``: "auto" (detect the layout), "timm"
    (>= 0.9, this module's) or "microsoft" (the original release, also timm < 0.9).
    Classifier keys are dropped when the model has no classifier or another class
    count; relative-position bias tables are resized bicubically to the model's window.
    With ``strict`` the final ``load_state_dict`` is strict (missing or unexpected keys
    raise RuntimeError). Raises FileNotFoundError for a missing file and ValueError,
    naming the file, when it is not a Swin checkpoint or a tensor has a shape that no
    conversion explains (another variant).
    """
    path = os.fspath(path)
    if source not in ("auto", "timm", "microsoft"):
        raise ValueError(f"source must be 'auto', 'timm' or 'microsoft', got {source!r}")
    report = LoadReport(path=path)
    sd = _unwrap(read_state_file(path))
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{path} is not a Swin checkpoint: it holds a {type(sd).__name__}, not a state dict")
    if "patch_embed.proj.weight" not in sd:
        for prefix in _PREFIXES:
            if prefix + "patch_embed.proj.weight" in sd:
                report.dropped += [k for k in sd if not k.startswith(prefix)]
                if report.dropped:
                    report.notes.append(f"keys outside {prefix!r} are not part of the backbone")
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                report.converted_from.append(f"prefix {prefix!r}")
                break
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("layers.") for k in sd):
        sample = ", ".join(list(sd)[:5]) or "no keys"
        raise ValueError(f"{path} is not a Swin checkpoint: no 'patch_embed.proj.weight' and 'layers.*' "
                         f"keys (found: {sample})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a Swin checkpoint: non-tensor entries {bad[:5]}")
    adapted = [k for k in sd if "lora_" in k or ".linear.weight" in k]
    if adapted:  # a PEFT model's checkpoint: its backbone keys are wrapped, loading would half-fit
        raise ValueError(f"{path} holds a parameter-efficient model (e.g. {adapted[0]!r}), not a plain Swin "
                         "checkpoint: load it with fastdense.models.mtlora_checkpoint.load_pretrained or "
                         "tadformer_checkpoint.load_pretrained")

    if source == "microsoft" or (source == "auto" and is_microsoft_layout(sd)):
        report.converted_from.append("microsoft")
        buffers = [k for k in sd if k.endswith(_BUFFER_SUFFIXES)]
        sd = convert_microsoft_swin(sd)
    else:
        buffers = [k for k in sd if k.endswith(_BUFFER_SUFFIXES)]
        sd = {k: v for k, v in sd.items() if not k.endswith(_BUFFER_SUFFIXES)}
    if buffers:
        report.dropped += buffers
        report.notes.append(f"{len(buffers)} relative_position_index/attn_mask buffer(s) are recomputed, not loaded")

    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    head_dropped: list[str] = []
    mismatched: list[str] = []
    for key, value in sd.items():
        want = target.get(key)
        if key.startswith("head.") and (want is None or want.shape != value.shape):
            head_dropped.append(key)
            continue
        if want is not None and want.shape != value.shape:
            if key.endswith(_TABLE_SUFFIX) and value.ndim == 2 and value.shape[1] == want.shape[1]:
                window = _window_of(model, key)
                if window is not None and (2 * window[0] - 1) * (2 * window[1] - 1) == want.shape[0]:
                    value = resize_relative_position_bias_table(value, window)
                    report.interpolated.append(key)
                    out[key] = value
                    continue
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
            continue
        out[key] = value
    if mismatched:
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise ValueError(f"{path}: tensor shapes do not match the model (another Swin variant?): "
                         + "; ".join(mismatched[:5]) + more)
    if head_dropped:
        report.dropped += head_dropped
        has_fc = any(k.startswith("head.") for k in target)
        report.notes.append("classifier dropped: " + ("the class count differs" if has_fc
                                                      else "the model has no classifier"))
    result = model.load_state_dict(out, strict=strict)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    return report
