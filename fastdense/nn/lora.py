"""LoRA modules built on the fused ``fastdense.ops`` LoRA operator.

Notation (LoRA, Hu et al. 2021, Eq. 3 and Sec. 4.1): a frozen linear layer
``h = x W0ᵀ + b`` is adapted by a rank-r update ``ΔW = s · B A`` with
``A ∈ R^{r×K}``, ``B ∈ R^{N×r}`` and ``s = α / r``:

    h = x W0ᵀ + b + s · u Aᵀ Bᵀ,        u = dropout(x)               (1)

``A`` starts Kaiming-uniform (a = √5, the nn.Linear default) and ``B`` at zero,
so an adapted layer initially computes exactly the pretrained function.

MTLoRA (Agiza et al., CVPR 2024) keeps one shared adapter (A_0, B_0, s_0) and
one adapter (A_t, B_t, s_t) per task t, and returns a shared output plus one
output per task:

    h_0 = x W0ᵀ + b + s_0 · u A_0ᵀ B_0ᵀ                                 (2)
    h_t = x W0ᵀ + b + s_t · u_t A_tᵀ B_tᵀ          ('matrix')           (3)
    h_t = h_0        + s_t · u_t A_tᵀ B_tᵀ          ('matrixv2')         (4)

where u_t is the task's own input ``x_tasks[t]`` when given, else u. The
released code's third mode, 'addition', has no shared adapter:

    h_0 = x W0ᵀ + b + LayerNorm(Σ_t h_t),  h_t as in (3)               (5)
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.nn._tasks import task_outputs
from fastdense.ops import lora_linear, mt_lora_linear

__all__ = ["LoRALinear", "MultiTaskLoRALinear"]

SHARED_MODES = ("matrix", "matrixv2", "addition")


# ----------------------------------------------------------------------------- helpers
def _check_rank(r, what: str) -> int:
    # bool is an int subclass; a rank of True is almost certainly a bug.
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{what} must be a positive int, got {r!r}")
    return r


def _check_scale(s, what: str) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"{what} must be a number, got {s!r}")
    return float(s)


def _check_dropout(p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def _check_key(name, container: nn.Module, what: str) -> str:
    """Adapter and task names become ParameterDict keys, hence attribute names."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what} must be a non-empty string without '.', got {name!r}")
    # A key that shadows a Module attribute ('training', 'keys', ...) would leave
    # the ParameterDict half-updated when register_parameter refuses it.
    if name not in container and hasattr(container, name):
        raise ValueError(f"{what} {name!r} clashes with an attribute of nn.ParameterDict; choose another name")
    return name


def _init_lora_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


def _new_pair(r: int, weight: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    n, k = weight.shape
    a = nn.Parameter(weight.new_empty((r, k)))
    b = nn.Parameter(weight.new_empty((n, r)))
    _init_lora_pair(a, b)
    return a, b


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """ΔW = s · B A (Eq. 1), accumulated in at least float32 so that merging into a
    half-precision weight rounds once, not once per product term."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (scale * (b.detach().to(acc) @ a.detach().to(acc))).to(dtype)


def _remap_keys(state_dict, prefix: str, renames: Mapping[str, str]) -> None:
    """Rename checkpoint keys written by other LoRA implementations in place;
    a key already present under our own name wins."""
    for old, new in renames.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


_FOREIGN_BASE_KEYS = {"linear.weight": "weight", "linear.bias": "bias",          # MTLoRA
                      "base_layer.weight": "weight", "base_layer.bias": "bias"}  # peft


class _FrozenBase(nn.Module):
    """``weight``/``bias`` stored exactly where nn.Linear stores them, so a plain
    Linear's state dict loads into a LoRA layer (strict=False: LoRA keys are extra)."""

    in_features: int
    out_features: int

    def _bind_base(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    def _new_base(self, in_features, out_features, bias, device, dtype) -> None:
        weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype),
                              requires_grad=False)
        b = None
        if bias:
            b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        self._bind_base(weight, b)
        self.reset_base_parameters()

    def reset_base_parameters(self) -> None:
        """nn.Linear's initialisation: W ~ U(±1/√K) via kaiming_uniform(a=√5), b ~ U(±1/√K)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                nn.init.uniform_(self.bias, -bound, bound)

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter parameters (every parameter except the frozen base)."""
        for name, p in self.named_parameters():
            if name.startswith("lora_"):
                yield p

    @staticmethod
    def _take_linear(linear: nn.Linear, freeze_base: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("from_linear got an uninitialised nn.LazyLinear; run a forward pass first")
        if freeze_base:
            linear.weight.requires_grad_(False)
            if linear.bias is not None:
                linear.bias.requires_grad_(False)
        return linear.weight, linear.bias


# ----------------------------------------------------------------------------- LoRALinear
class LoRALinear(_FrozenBase):
    """Drop-in replacement for ``nn.Linear`` with one or more named LoRA adapters.

    Computes Eq. (1) summed over the active adapters (peft's semantics)::

        y = x W0ᵀ + b + Σ_{a active, not merged} s_a · dropout_a(x) A_aᵀ B_aᵀ,   s_a = α_a / r_a

    ``weight``/``bias`` are the frozen base under nn.Linear's state-dict keys;
    adapter ``a`` owns ``lora_A[a]`` (r_a × in_features) and ``lora_B[a]``
    (out_features × r_a). Dropout acts only on the LoRA input and only in
    training mode; each adapter draws its own mask.

    How the fused op is used: ``fastdense.ops.lora_linear`` computes the base
    GEMM plus *one* LoRA. Active adapters that read the same input (every
    adapter in eval mode, or with dropout 0) are folded into that one LoRA by
    concatenating their A's along the rank and their s_a·B_a along the columns,
    which is exact: [A_1; A_2]ᵀ [s_1 B_1 | s_2 B_2]ᵀ = Σ s_a A_aᵀ B_aᵀ. An adapter
    with live dropout needs its own input; the first one rides in the fused call
    as ``x_lora`` when no undropped adapter is active, the others are added as
    two skinny GEMMs each.

    An adapter added to a layer with no other adapter becomes active; add more with :meth:`add_adapter`
    and choose with :meth:`set_adapter` (an empty list disables LoRA).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: bool = True, *, adapter_name: str = "default",
                 device=None, dtype=None) -> None:
        super().__init__()
        self._new_base(in_features, out_features, bias, device, dtype)
        self._init_adapter_state()
        self.add_adapter(adapter_name, r, alpha, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
                    adapter_name: str = "default", freeze_base: bool = True) -> "LoRALinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias Parameters.

        Merging therefore also changes ``linear``; ``freeze_base`` sets
        ``requires_grad=False`` on the shared Parameters.
        """
        weight, bias = cls._take_linear(linear, freeze_base)
        self = cls.__new__(cls)
        _FrozenBase.__init__(self)
        self._bind_base(weight, bias)
        self._init_adapter_state()
        self.add_adapter(adapter_name, r, alpha, dropout)
        return self

    def _init_adapter_state(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.register_load_state_dict_pre_hook(LoRALinear._adapt_foreign_keys)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        """Add adapter ``name`` with s = alpha / r; it becomes active if it is the only one."""
        _check_key(name, self.lora_A, "adapter name")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists (adapters: {self.adapters})")
        r = _check_rank(r, "r")
        alpha = _check_scale(alpha, "alpha")
        p = _check_dropout(dropout)
        a, b = _new_pair(r, self.weight)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(p)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / r
        if len(self.lora_A) == 1:
            self.active_adapters = [name]

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Choose the active adapters (a name, or a list whose LoRAs are summed)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {self.adapters}")
        self.active_adapters = list(dict.fromkeys(names))

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; adapters: {self.adapters}")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weight; unmerge() before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.r[name], self.lora_alpha[name], self.scaling[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def reset_lora_parameters(self, name: str | None = None) -> None:
        for n in ([name] if name is not None else self.adapters):
            _init_lora_pair(self.lora_A[n], self.lora_B[n])

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW_a = s_a · B_a A_a, detached, in the weight's dtype."""
        return _delta(self.lora_A[name], self.lora_B[name], self.scaling[name], self.weight.dtype)

    def merge(self, adapter_names: Iterable[str] | None = None, *, safe: bool = False) -> None:
        """W0 += Σ s_a B_a A_a for the given adapters (default: active, not yet merged).

        ``safe`` checks the merged weight for inf/nan before writing it. A merged
        adapter is part of W0 and gets no gradient; unmerge before training it.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {self.adapters}")
        names = [n for n in names if n not in self.merged_adapters]
        with torch.no_grad():
            for n in names:
                delta = self.get_delta_weight(n)
                if safe and not torch.isfinite(self.weight + delta).all():
                    raise ValueError(f"merging adapter {n!r} would produce inf/nan weights")
                self.weight.add_(delta)
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        """Subtract every merged ΔW again (last merged first); exact up to rounding."""
        with torch.no_grad():
            while self.merged_adapters:
                self.weight.sub_(self.get_delta_weight(self.merged_adapters.pop()))

    def to_linear(self) -> nn.Linear:
        """A new nn.Linear computing this layer's eval-mode function (W0 + Σ_active ΔW_a)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self.weight.detach().clone()
            for n in self.active_adapters:
                if n not in self.merged_adapters:
                    w += self.get_delta_weight(n)
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------ forward
    def _reads_x(self, name: str) -> bool:
        """True when the adapter's LoRA input is x itself (eval mode or p = 0)."""
        return not (self.training and self.lora_dropout[name].p > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return F.linear(x, self.weight, self.bias)
        undropped = [n for n in pending if self._reads_x(n)]
        dropped = [n for n in pending if not self._reads_x(n)]
        fused, rest = (undropped, dropped) if undropped else (dropped[:1], dropped[1:])
        x_lora = None if undropped else self.lora_dropout[fused[0]](x)
        if len(fused) == 1:
            n = fused[0]
            y = lora_linear(x, self.weight, self.bias, self.lora_A[n], self.lora_B[n], self.scaling[n],
                            x_lora=x_lora)
        else:
            a = torch.cat([self.lora_A[n] for n in fused], dim=0)
            b = torch.cat([self.lora_B[n] * self.scaling[n] for n in fused], dim=1)
            y = lora_linear(x, self.weight, self.bias, a, b, 1.0, x_lora=x_lora)
        for n in rest:
            u = self.lora_dropout[n](x)
            y = y + self.scaling[n] * F.linear(F.linear(u, self.lora_A[n]), self.lora_B[n])
        return y

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _adapt_foreign_keys(module, state_dict, prefix, *args) -> None:
        """Accept MTLoRA's (``linear.weight``, bare ``lora_A``) and peft's
        (``base_layer.weight``, ``lora_A.<name>.weight``) key layouts."""
        renames = dict(_FOREIGN_BASE_KEYS)
        for n in module.adapters:
            renames[f"lora_A.{n}.weight"] = f"lora_A.{n}"
            renames[f"lora_B.{n}.weight"] = f"lora_B.{n}"
        if len(module.adapters) == 1:
            only = module.adapters[0]
            renames["lora_A"] = f"lora_A.{only}"
            renames["lora_B"] = f"lora_B.{only}"
        _remap_keys(state_dict, prefix, renames)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]:g}, dropout={self.lora_dropout[n].p:g})"
                             for n in self.adapters)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, adapters=[{adapters}], active={self.active_adapters}, "
                f"merged={self.merged_adapters}")


# ----------------------------------------------------------------------------- MultiTaskLoRALinear
def _per_task(value, tasks: Sequence[str], what: str, check) -> dict[str, object]:
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        extra = [k for k in value if k not in tasks]
        if missing or extra:
            raise ValueError(f"{what} must have exactly one entry per task {list(tasks)}; "
                             f"missing {missing}, unknown {extra}")
        return {t: check(value[t], f"{what}[{t!r}]") for t in tasks}
    return {t: check(value, what) for t in tasks}


def _scale_parameter(value: float, like: torch.Tensor) -> nn.Parameter:
    # MTLoRA stores a trainable scale as a one-element float32 tensor; the same shape lets
    # its checkpoints load without reshaping.
    return nn.Parameter(torch.full((1,), value, dtype=torch.float32, device=like.device))


class MultiTaskLoRALinear(_FrozenBase):
    """MTLoRA's task-agnostic + task-specific LoRA linear (Eqs. 2-5), fused.

    ``forward(x, x_tasks=None)`` returns ``(h_0, {task: h_t})`` exactly like
    MTLoRA's ``MTLoRALinear``: h_0 is the shared output (Eq. 2); h_t adds task
    t's LoRA to the pretrained output alone ('matrix', Eq. 3) or to h_0
    ('matrixv2', Eq. 4). In 'addition' mode the layer has no shared LoRA and
    the shared output is built from the task outputs (Eq. 5)::

        h_0 = x W0ᵀ + b + LayerNorm(Σ_t h_t),   h_t as in Eq. 3            (5)

    (the released code's ``lora_norm``; note that every h_t already contains
    the pretrained output). Without tasks, 'addition' falls back to 'matrix',
    as in the released layer. Scales are used as given (MTLoRA's
    ``lora_shared_scale``/``lora_task_scale``), not divided by the rank.

    Dropout is applied once to x and feeds the shared LoRA and every task
    without an entry in ``x_tasks``; ``x_tasks[t]`` is used as is (no dropout),
    as in MTLoRA. All 1+T outputs come from one ``fastdense.ops.mt_lora_linear``
    call: the A's and B's are concatenated on every forward (they are small),
    so autograd routes each slice of the concatenated gradient back to its
    adapter's Parameters. :meth:`forward_stacked` returns the op's stacked
    (1+T, ..., N) output without splitting it.

    Trainable scales (``trainable_shared_scale`` / ``trainable_task_scale``,
    MTLoRA's ``trainable_scale_shared`` / ``trainable_scale_per_task``) are
    one-element Parameters ``lora_shared_scale`` and ``lora_task_scale[t]``.
    The fused op takes its scales as Python floats, so a trainable scale is
    folded into its adapter's B inside the graph (s·u Aᵀ Bᵀ = u Aᵀ (s B)ᵀ) and
    the op runs with scale 1: autograd then carries the gradient to s.

    Parameter names follow MTLoRA (``lora_shared_A``, ``lora_shared_B``,
    ``lora_tasks_A[t]``, ``lora_tasks_B[t]``, ``lora_norm``,
    ``lora_shared_scale``, ``lora_task_scale[t]``) and MTLoRA's
    ``linear.weight`` / ``linear.bias`` checkpoint keys are read into
    ``weight`` / ``bias``, so MTLoRA checkpoints load. With ``tasks`` empty or
    None the layer is a shared-only LoRA returning ``(h_0, None)``. Unlike
    MTLoRA, ``x_tasks`` may name a subset of the tasks; the others read the
    dropped-out x.
    """

    def __init__(self, in_features: int, out_features: int, tasks: Sequence[str] | None = None,
                 shared_rank: int = 64, task_ranks: int | Mapping[str, int] = 4, shared_scale: float = 4.0,
                 task_scale: float | Mapping[str, float] = 4.0, dropout: float = 0.05,
                 shared_mode: str = "matrix", bias: bool = True, *, trainable_shared_scale: bool = False,
                 trainable_task_scale: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self._new_base(in_features, out_features, bias, device, dtype)
        self._init_lora(tasks, shared_rank, task_ranks, shared_scale, task_scale, dropout, shared_mode,
                        trainable_shared_scale, trainable_task_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tasks: Sequence[str] | None = None, shared_rank: int = 64,
                    task_ranks: int | Mapping[str, int] = 4, shared_scale: float = 4.0,
                    task_scale: float | Mapping[str, float] = 4.0, dropout: float = 0.05,
                    shared_mode: str = "matrix", *, freeze_base: bool = True, trainable_shared_scale: bool = False,
                    trainable_task_scale: bool = False) -> "MultiTaskLoRALinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias Parameters."""
        weight, bias = cls._take_linear(linear, freeze_base)
        self = cls.__new__(cls)
        _FrozenBase.__init__(self)
        self._bind_base(weight, bias)
        self._init_lora(tasks, shared_rank, task_ranks, shared_scale, task_scale, dropout, shared_mode,
                        trainable_shared_scale, trainable_task_scale)
        return self

    def _init_lora(self, tasks, shared_rank, task_ranks, shared_scale, task_scale, dropout, shared_mode,
                   trainable_shared_scale, trainable_task_scale) -> None:
        shared_mode = "addition" if shared_mode == "add" else shared_mode  # the released code's alias
        if shared_mode not in SHARED_MODES:
            raise ValueError(f"shared_mode must be one of {SHARED_MODES}, got {shared_mode!r} "
                             "(MTLoRA's 'lora_only' mode is a layer without tasks: pass tasks=None)")
        if isinstance(tasks, str):
            raise ValueError(f"tasks must be a sequence of task names, got the string {tasks!r}")
        tasks = list(tasks) if tasks is not None else []
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be unique, got {tasks}")
        if not tasks and shared_mode == "addition":
            # Eq. 5 needs task outputs; the released layer switches to 'matrix' without tasks.
            shared_mode = "matrix"
        self.lora_tasks_A = nn.ParameterDict()
        self.lora_tasks_B = nn.ParameterDict()
        for t in tasks:
            _check_key(t, self.lora_tasks_A, "task name")
        self.tasks = tasks
        self.shared_mode = shared_mode
        self.shared_rank = _check_rank(shared_rank, "shared_rank")
        self._shared_scale = _check_scale(shared_scale, "shared_scale")
        self.task_ranks: dict[str, int] = _per_task(task_ranks, tasks, "task_ranks", _check_rank)
        self._task_scales: dict[str, float] = _per_task(task_scale, tasks, "task_scale", _check_scale)
        self.lora_dropout = nn.Dropout(_check_dropout(dropout))
        if shared_mode == "addition":
            self.lora_norm = nn.LayerNorm(self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        else:
            self.lora_shared_A, self.lora_shared_B = _new_pair(self.shared_rank, self.weight)
        for t in tasks:
            self.lora_tasks_A[t], self.lora_tasks_B[t] = _new_pair(self.task_ranks[t], self.weight)
        # The shared scale has nothing to scale in 'addition' mode (no shared LoRA).
        self.trainable_shared_scale = bool(trainable_shared_scale) and shared_mode != "addition"
        self.trainable_task_scale = bool(trainable_task_scale) and bool(tasks)
        if self.trainable_shared_scale:
            self.lora_shared_scale = _scale_parameter(self._shared_scale, self.weight)
        if self.trainable_task_scale:
            self.lora_task_scale = nn.ParameterDict(
                {t: _scale_parameter(self._task_scales[t], self.weight) for t in tasks})
        self.register_load_state_dict_pre_hook(MultiTaskLoRALinear._adapt_foreign_keys)

    # ------------------------------------------------------------------ scales
    @property
    def shared_scale(self) -> float:
        """s_0 as a number (the current value of ``lora_shared_scale`` when trainable)."""
        return float(self.lora_shared_scale.detach()) if self.trainable_shared_scale else self._shared_scale

    @property
    def task_scales(self) -> dict[str, float]:
        """s_t per task as numbers (current values when trainable)."""
        if self.trainable_task_scale:
            return {t: float(self.lora_task_scale[t].detach()) for t in self.tasks}
        return dict(self._task_scales)

    def _scaled_b(self, b: torch.Tensor, trainable: bool, key: str | None) -> tuple[torch.Tensor, float]:
        """(B, s) for the op, or (s B, 1) when s is a Parameter (see the class docstring)."""
        if not trainable:
            return b, (self._shared_scale if key is None else self._task_scales[key])
        s = self.lora_shared_scale if key is None else self.lora_task_scale[key]
        return b * s.to(b.dtype), 1.0

    def reset_lora_parameters(self) -> None:
        if self.shared_mode != "addition":
            _init_lora_pair(self.lora_shared_A, self.lora_shared_B)
        for t in self.tasks:
            _init_lora_pair(self.lora_tasks_A[t], self.lora_tasks_B[t])

    # ------------------------------------------------------------------ forward
    def _task_inputs(self, x: torch.Tensor, u: torch.Tensor, x_tasks) -> torch.Tensor | None:
        """Per-task LoRA inputs in the op's (T, ..., K) layout: a mapping is stacked (tasks
        absent from it read the dropped-out x, as they would with no x_tasks); a tensor
        of shape (T, *x.shape), tasks in ``self.tasks`` order, is used as is."""
        if x_tasks is None:
            return None
        if isinstance(x_tasks, torch.Tensor):
            if x_tasks.shape != (len(self.tasks), *x.shape):
                raise ValueError(f"stacked x_tasks must have shape (T={len(self.tasks)}, *x.shape) = "
                                 f"{(len(self.tasks), *x.shape)}, got {tuple(x_tasks.shape)}")
            return x_tasks
        if not x_tasks:
            return None
        unknown = [k for k in x_tasks if k not in self.lora_tasks_A]
        if unknown:
            raise ValueError(f"x_tasks has unknown task(s) {unknown}; this layer's tasks are {self.tasks}")
        for t, xt in x_tasks.items():
            if not isinstance(xt, torch.Tensor) or xt.shape != x.shape:
                got = tuple(xt.shape) if isinstance(xt, torch.Tensor) else type(xt).__name__
                raise ValueError(f"x_tasks[{t!r}] must be a tensor of x's shape {tuple(x.shape)}, got {got}")
        return torch.stack([x_tasks.get(t, u) for t in self.tasks])

    def forward_stacked(self, x: torch.Tensor,
                        x_tasks: Mapping[str, torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """All outputs stacked, (1 + T, *x.shape[:-1], N): index 0 is h_0, index 1 + i
        the output of ``self.tasks[i]`` (one fused op call). ``x_tasks`` is a mapping as in
        :meth:`forward` or an already stacked (T, *x.shape) tensor."""
        x_lora = self.lora_dropout(x) if self.training and self.lora_dropout.p > 0 else None
        if not self.tasks:
            if x_tasks is not None and len(x_tasks):
                names = list(x_tasks) if isinstance(x_tasks, Mapping) else f"a tensor of {len(x_tasks)} task inputs"
                raise ValueError(f"x_tasks has unknown task(s) {names}; this layer has no tasks")
            b, s = self._scaled_b(self.lora_shared_B, self.trainable_shared_scale, None)
            return lora_linear(x, self.weight, self.bias, self.lora_shared_A, b, s, x_lora=x_lora).unsqueeze(0)
        stacked = self._task_inputs(x, x if x_lora is None else x_lora, x_tasks)
        addition = self.shared_mode == "addition"
        if addition:
            # No shared LoRA: a rank-1 zero adapter makes the op's output 0 the pretrained
            # output alone, from which Eq. 5 builds h_0.
            a_parts = [self.weight.new_zeros((1, self.in_features))]
            b_parts = [self.weight.new_zeros((self.out_features, 1))]
            ranks, scales = [1], [1.0]
        else:
            b0, s0 = self._scaled_b(self.lora_shared_B, self.trainable_shared_scale, None)
            a_parts, b_parts, ranks, scales = [self.lora_shared_A], [b0], [self.shared_rank], [s0]
        for t in self.tasks:
            bt, st = self._scaled_b(self.lora_tasks_B[t], self.trainable_task_scale, t)
            a_parts.append(self.lora_tasks_A[t])
            b_parts.append(bt)
            ranks.append(self.task_ranks[t])
            scales.append(st)
        out = mt_lora_linear(x, self.weight, self.bias, torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1),
                             ranks, scales, shared_in_tasks=self.shared_mode == "matrixv2", x_lora=x_lora,
                             x_tasks=stacked)
        if addition:
            shared = out[0] + self.lora_norm(out[1:].sum(0))
            out = torch.cat([shared.unsqueeze(0), out[1:]], dim=0)
        return out

    def forward(self, x: torch.Tensor, x_tasks: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
                stacked: bool = False):
        """``(h_0, {task: h_t})``, or ``(h_0, (T, ..., N) tensor)`` with ``stacked=True``
        (the keyword every fastdense multi-task module takes)."""
        out = self.forward_stacked(x, x_tasks)
        if not self.tasks:
            return out[0], None
        return out[0], task_outputs(self.tasks, out[1:], stacked)

    def to_linear(self, task: str | None = None) -> nn.Linear:
        """A new nn.Linear computing one output in eval mode without x_tasks:
        h_0 for ``task=None``, else h_task (Eqs. 2-4 with ΔW merged). The shared
        output of 'addition' mode (Eq. 5) is not linear and raises ValueError."""
        if task is not None and task not in self.lora_tasks_A:
            raise ValueError(f"unknown task {task!r}; this layer's tasks are {self.tasks}")
        if task is None and self.shared_mode == "addition":
            raise ValueError("the shared output of shared_mode='addition' (LayerNorm of the task outputs) "
                             "is not a linear function; to_linear() needs a task")
        dt = self.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dt)
        with torch.no_grad():
            w = self.weight.detach().clone()
            if task is None or self.shared_mode == "matrixv2":
                w += _delta(self.lora_shared_A, self.lora_shared_B, self.shared_scale, dt)
            if task is not None:
                w += _delta(self.lora_tasks_A[task], self.lora_tasks_B[task], self.task_scales[task], dt)
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @staticmethod
    def _adapt_foreign_keys(module, state_dict, prefix, *args) -> None:
        _remap_keys(state_dict, prefix, _FOREIGN_BASE_KEYS)
        if module.shared_mode == "addition":
            # The released 'addition' layer keeps a (trainable) shared scale that its forward
            # never reads; this layer has none, so the key is dropped rather than reported.
            state_dict.pop(prefix + "lora_shared_scale", None)

    def extra_repr(self) -> str:
        tasks = ", ".join(f"{t}(r={self.task_ranks[t]}, s={self._task_scales[t]:g})" for t in self.tasks)
        shared = ("LayerNorm of the task outputs" if self.shared_mode == "addition"
                  else f"r={self.shared_rank}, s={self._shared_scale:g}")
        trainable = [n for n, on in (("shared", self.trainable_shared_scale), ("tasks", self.trainable_task_scale))
                     if on]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, shared({shared}), tasks=[{tasks}], "
                f"shared_mode={self.shared_mode!r}, dropout={self.lora_dropout.p:g}"
                + (f", trainable scales: {'+'.join(trainable)}" if trainable else ""))
