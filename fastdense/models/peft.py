"""What every parameter-efficient (PEFT) model shares: its paper's trainable set, a
count of it by group, and checkpoints that hold only the trainable state.

A model mixes :class:`PEFTModel` into its ``nn.Module`` and implements
:meth:`PEFTModel.is_paper_trainable` (the paper's rule, by parameter name);
``mark_trainable`` applies it (or unfreezes everything with ``train_base``),
``trainable_parameter_report`` counts by :meth:`PEFTModel.parameter_group`,
and ``trainable_state_dict`` / ``load_trainable_state_dict`` save and restore
the trainable parameters plus the buffers of the modules that own them (batch
norm running statistics), so a fine-tuned model is stored in megabytes and
rebuilt from the pretrained backbone.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn

#: Report groups, in display order.
GROUPS = ("adapters", "decoders", "norms", "position_bias", "patch_embed", "patch_merging", "other")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclasses.dataclass
class ParameterReport:
    """Trainable parameter counts by group (``groups``), their ``total`` and the count of
    frozen parameters; ``str()`` is a small table in millions."""

    groups: Dict[str, int]
    frozen: int

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    def __str__(self) -> str:
        width = max(len(g) for g in (*self.groups, "trainable total"))
        lines = [f"  {g:<{width}} {n:>12,}  {n / 1e6:8.3f} M" for g, n in self.groups.items() if n]
        lines.append(f"  {'trainable total':<{width}} {self.total:>12,}  {self.total / 1e6:8.3f} M")
        lines.append(f"  {'frozen':<{width}} {self.frozen:>12,}  {self.frozen / 1e6:8.3f} M")
        return "\n".join(lines)


class LoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class PEFTModel:
    """Mixin for ``nn.Module`` PEFT models; see the module docstring.

    Subclasses set ``self.train_base`` (bool) and implement
    :meth:`is_paper_trainable`; they may extend :meth:`parameter_group`.
    """

    train_base: bool = False

    # ------------------------------------------------------------------ the trainable set
    def is_paper_trainable(self, name: str) -> bool:  # pragma: no cover - abstract
        """Whether the paper trains the parameter ``name`` (a ``named_parameters`` key)."""
        raise NotImplementedError

    def mark_trainable(self, train_base: Optional[bool] = None):
        """requires_grad as the paper sets it (or on every parameter with ``train_base``,
        which defaults to the model's own setting); returns the model."""
        if train_base is not None:
            self.train_base = bool(train_base)
        for name, p in self.named_parameters():
            p.requires_grad_(self.train_base or self.is_paper_trainable(name))
        return self

    # ------------------------------------------------------------------ reporting
    def parameter_group(self, name: str, module: nn.Module) -> str:
        """The report group of parameter ``name`` owned by ``module``."""
        leaf = name.rsplit(".", 1)[-1]
        if ".lora_" in f".{name}" or leaf.startswith("lora_"):
            return "adapters"
        if name.startswith(("decoders.", "heads.")):
            return "decoders"
        if isinstance(module, _NORM_TYPES):
            return "norms"
        if leaf == "relative_position_bias_table":
            return "position_bias"
        if ".patch_embed." in f".{name}":
            return "patch_embed"
        if ".downsample.reduction." in f".{name}":
            return "patch_merging"
        return "other"

    def _owned_parameters(self) -> Iterable[tuple[str, nn.Module, nn.Parameter]]:
        for mod_name, module in self.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, p

    def trainable_parameter_report(self) -> ParameterReport:
        """Counts of the parameters with requires_grad, by group (shared Parameters once)."""
        groups = {g: 0 for g in GROUPS}
        frozen, seen = 0, set()
        for name, module, p in self._owned_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                frozen += p.numel()
                continue
            group = self.parameter_group(name, module)
            groups[group] = groups.get(group, 0) + p.numel()
        return ParameterReport(groups, frozen)

    # ------------------------------------------------------------------ checkpoints
    def _trainable_keys(self) -> list[str]:
        """State-dict keys of the trainable parameters and of the persistent buffers of
        the modules that own one (e.g. a trained BatchNorm's running statistics)."""
        keys, owners = set(), set()
        for name, _module, p in self._owned_parameters():
            if p.requires_grad:
                keys.add(name)
                owners.add(name.rsplit(".", 1)[0] if "." in name else "")
        for mod_name, module in self.named_modules():
            if mod_name in owners:
                for b_name, _ in module.named_buffers(recurse=False):
                    if b_name not in module._non_persistent_buffers_set:
                        keys.add(f"{mod_name}.{b_name}" if mod_name else b_name)
        return [k for k in self.state_dict() if k in keys]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable part of ``state_dict()`` (see :meth:`_trainable_keys`), detached."""
        keep = set(self._trainable_keys())
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Load a :meth:`trainable_state_dict`; the rest of the model is left as it is.

        With ``strict``, a key outside the model's trainable state or a trainable key the
        dict lacks raises RuntimeError naming them (a checkpoint of another configuration).
        """
        expected = set(self._trainable_keys())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"trainable state dict does not match the model: missing {missing[:8]}"
                               f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                               f"{' ...' if len(unexpected) > 8 else ''}")
        model_keys = set(self.state_dict())
        known = {k: v for k, v in state_dict.items() if k in model_keys}
        result = self.load_state_dict(known, strict=False)
        return LoadResult(missing, sorted(set(unexpected) | set(result.unexpected_keys)))


__all__ = ["GROUPS", "LoadResult", "PEFTModel", "ParameterReport"]
