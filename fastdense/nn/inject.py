"""Swap the nn.Linear layers of an existing model for LoRA layers.

Target rule (:func:`inject_lora`). Each target is one of

* a string ``t``: matches the Linear whose qualified name (as printed by
  ``model.named_modules()``) equals ``t`` or ends with ``"." + t``, i.e. ``t``
  names whole trailing path components: ``"qkv"`` and ``"attn.qkv"`` match
  ``blocks.0.attn.qkv``; ``"kv"`` and ``"0.attn"`` do not. Strings are never
  read as regexes.
* a compiled ``re.Pattern``: matches names it ``fullmatch``-es, e.g.
  ``re.compile(r"blocks\\.[0-3]\\..*\\.(fc1|fc2)")``.

Every target must match at least one Linear, otherwise ValueError lists
available Linear names, so a typo cannot silently leave a model un-adapted.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping, Sequence

import torch.nn as nn

from fastdense.nn.lora import LoRALinear, MultiTaskLoRALinear
from fastdense.nn.dtf import TaskAwareLoRALinear

__all__ = ["inject_lora", "lora_parameters", "mark_only_lora_trainable"]

Target = str | re.Pattern
_LORA_TYPES = (LoRALinear, MultiTaskLoRALinear, TaskAwareLoRALinear)


def _normalise_targets(targets) -> list[Target]:
    if isinstance(targets, (str, re.Pattern)):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one Linear to adapt")
    for t in targets:
        if not isinstance(t, (str, re.Pattern)) or (isinstance(t, str) and not t.strip(".")):
            raise ValueError(f"each target must be a non-empty module name/suffix or a compiled re.Pattern, got {t!r}")
    return targets


def _matches(target: Target, name: str) -> bool:
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    return name == target or name.endswith("." + target)


def _show(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "[] (the model has no nn.Linear)"


def inject_lora(
    model: nn.Module,
    targets: Target | Iterable[Target],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    *,
    tasks: Sequence[str] | None = None,
    task_r: int | Mapping[str, int] = 4,
    task_alpha: float | None = None,
    shared_mode: str = "matrix",
    adapter_name: str = "default",
    freeze_base: bool = True,
) -> list[str]:
    """Replace, in place, every nn.Linear matched by ``targets`` with a LoRA layer
    wrapping (sharing) its weight and bias; returns the replaced names in
    ``named_modules()`` order. See the module docstring for the matching rule.

    Without ``tasks`` each match becomes a :class:`LoRALinear` with adapter
    ``adapter_name`` of rank ``r`` and scale α/r (LoRA Eq. 1). With ``tasks`` it
    becomes a :class:`MultiTaskLoRALinear` (MTLoRA Eqs. 2-4) with shared rank
    ``r`` and scale ``alpha / r``, task ranks ``task_r`` and task scale
    ``task_alpha / task_r`` (``task_alpha=None`` gives every task the shared
    scale, MTLoRA's usual setting). Such layers return ``(shared, {task: out})``,
    so the model's forward must be written for MTLoRA layers.

    A Linear reachable under several names is replaced under all of them.
    ``freeze_base`` freezes every parameter of ``model`` that is not a LoRA
    parameter (as peft's ``get_peft_model`` does); unfreeze task heads afterwards.
    """
    targets = _normalise_targets(targets)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lora_names = [n for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)]
    for t in targets:
        if not any(_matches(t, n) for n, _ in linears):
            hint = ""
            if any(_matches(t, n) for n in lora_names):
                hint = " (it matches a layer that already has LoRA; use add_adapter to add another adapter)"
            raise ValueError(f"target {t.pattern if isinstance(t, re.Pattern) else t!r} matches no nn.Linear"
                             f"{hint}; available Linear names: {_show([n for n, _ in linears])}")
    chosen = [(n, m) for n, m in linears if any(_matches(t, n) for t in targets)]

    parents = {id(m): m for m in model.modules()}
    owner = {}
    for parent in parents.values():
        for child in parent.children():
            owner.setdefault(id(child), parent)
    for name, linear in chosen:
        if name == "":
            raise ValueError("the model itself is an nn.Linear and cannot be replaced in place; "
                             "use LoRALinear.from_linear(model, ...) instead")
        if isinstance(owner.get(id(linear)), nn.MultiheadAttention):
            raise ValueError(f"{name!r} belongs to nn.MultiheadAttention, which reads its weight directly "
                             "instead of calling it, so a LoRA there would be silently ignored")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{name!r} is an uninitialised nn.LazyLinear; run a forward pass first")

    replacement = {}
    for _name, linear in chosen:
        if tasks is None:
            new = LoRALinear.from_linear(linear, r, alpha, dropout, adapter_name=adapter_name,
                                         freeze_base=freeze_base)
        else:
            shared_scale = alpha / r
            if task_alpha is None:
                task_scale = shared_scale
            elif isinstance(task_r, Mapping):
                task_scale = {t: task_alpha / rt for t, rt in task_r.items()}
            else:
                task_scale = task_alpha / task_r
            new = MultiTaskLoRALinear.from_linear(linear, tasks, r, task_r, shared_scale, task_scale, dropout,
                                                  shared_mode, freeze_base=freeze_base)
        replacement[id(linear)] = new
    # named_children() reports a module once per parent, so walk the raw
    # (parent, attribute) edges: an alias of a swapped Linear must be swapped too.
    for parent in parents.values():
        for key, child in list(parent._modules.items()):
            if id(child) in replacement:
                setattr(parent, key, replacement[id(child)])
    if freeze_base:
        mark_only_lora_trainable(model)
    return [n for n, _ in chosen]


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every LoRA parameter of the fastdense LoRA layers inside ``model``, once each."""
    seen = set()
    for module in model.modules():
        if isinstance(module, _LORA_TYPES):
            for p in module.lora_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad=True on the LoRA parameters, False on everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
