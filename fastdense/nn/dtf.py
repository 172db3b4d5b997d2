"""TADFormer's Dynamic Task Filter and TA-module as drop-in modules (paper §3.4).

* :class:`FilterNorm` — DDF's 'channel' FilterNorm (Zhou et al., CVPR 2021),
  which TADFormer applies to the generated filters "for securing training
  stability": each (sample, channel) filter of k² taps is made zero-mean and
  unit-std, then scaled by a learnable std and shifted by a learnable mean.
* :class:`DynamicTaskFilter` — Eq. 3: θ = FilterNorm(φ(GAP(h))), φ a 1×1 conv
  r → r·k²; output θ ⊛ h, a per-sample, per-channel k×k depthwise conv (same
  padding) on the whole map or on non-overlapping windows.
* :class:`StaticTaskFilter` — the released code's ``NaiveConvFilter``: one
  learned depthwise k×k conv (+ bias) for every sample.
* :class:`TaskAwareLoRALinear` — the TA-module: a frozen Linear Φ with a shared
  LoRA down/up pair (W_down = A, W_up = B) and the task filter between them,
  Eq. 4: F̃_t = Φ(f_t) + s · (θ_t ⊛ (f_t Aᵀ)) Bᵀ for every task t, all tasks
  in one fused op (:func:`fastdense.ops.ta_lora_dtf`).

Parameter names differ from the released code (punpunzaz10/TADFormer,
models/lora.py); its checkpoints load through a key converter, not directly:

=====================================  ======================================
released ``TAModuleLinear``            fastdense ``TaskAwareLoRALinear``
=====================================  ======================================
``linear.weight`` / ``linear.bias``    ``weight`` / ``bias`` (nn.Linear's place)
``lora_shared_A`` / ``lora_shared_B``  the same
``lora_filter.<task>.conv2d.*``        ``lora_filter.<task>.conv2d.*`` (static)
``DTF.conv``                           ``lora_filter.phi`` (dynamic)
``DTF.chan_FilterNorm.{std,mean}``     ``lora_filter.filter_norm.{std,mean}``
=====================================  ======================================

Task arguments and outputs follow every fastdense multi-task module:
``tasks`` names (or counts) the tasks, outputs are ``{task: tensor}`` or the
stacked tensor with ``stacked=True``.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.nn._tasks import stack_task_inputs, task_names, task_outputs
from fastdense.nn.lora import _check_dropout, _check_rank, _FrozenBase, _init_lora_pair
from fastdense.ops import _dtf_phases
from fastdense.ops._validate import check_window
from fastdense.ops.dtf import dynamic_task_filter, ta_lora_dtf

__all__ = ["FilterNorm", "DynamicTaskFilter", "StaticTaskFilter", "TaskAwareLoRALinear"]

FILTERS = ("dynamic", "static")
TASK_BASES = ("task", "shared")


def _check_kernel(k, what="kernel_size", minimum=1) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum or k % 2 == 0:
        raise ValueError(f"{what} must be an odd int >= {minimum}, got {k!r}")
    return k


def _tokens(x: torch.Tensor, hw, rank: int):
    """(S, N, r) tokens with hw, or (S, r, H, W) maps -> (tokens, hw, was_map)."""
    if x.dim() == 4:
        if x.shape[1] != rank:
            raise ValueError(f"a map input must have shape (S, r={rank}, H, W), got {tuple(x.shape)}")
        s, _, height, width = x.shape
        if hw is not None and tuple(hw) != (height, width):
            raise ValueError(f"hw={tuple(hw)} does not match the map's (H, W) = {(height, width)}")
        return x.permute(0, 2, 3, 1).reshape(s, height * width, rank), (height, width), True
    if x.dim() == 3:
        if x.shape[2] != rank:
            raise ValueError(f"a token input must have shape (S, N, r={rank}), got {tuple(x.shape)}")
        if hw is None:
            raise ValueError("hw=(H, W) is required for token inputs (S, N, r)")
        return x, tuple(hw), False
    raise ValueError(f"input must be tokens (S, N, r) with hw or maps (S, r, H, W), got {tuple(x.shape)}")


def _untokens(y: torch.Tensor, hw, was_map: bool) -> torch.Tensor:
    if not was_map:
        return y
    s, _, r = y.shape
    return y.reshape(s, hw[0], hw[1], r).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- FilterNorm
class FilterNorm(nn.Module):
    """DDF's 'channel' FilterNorm with learnable std and mean (the setting TADFormer uses).

    For filters θ of shape (S, c·k²) (or (S, c·k², 1, 1), a 1×1 conv's output)::

        θ̂ = (θ − mean_taps(θ)) / (std_taps(θ) + 1e-10) · std + mean

    per (sample, channel) over its k² taps (unbiased std). ``std`` starts at
    randn · gain / k (gain of ``nonlinearity``, 'relu' in TADFormer) and ``mean``
    at randn, both (c·k²,), as in DDF's and TADFormer's code.
    """

    def __init__(self, channels: int, kernel_size: int = 3, nonlinearity: str = "relu",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.channels = _check_rank(channels, "channels")
        self.kernel_size = _check_kernel(kernel_size, minimum=3)
        self.nonlinearity = nonlinearity
        factory = dict(device=device, dtype=dtype)
        n = channels * kernel_size ** 2
        self.std = nn.Parameter(torch.empty(n, **factory))
        self.mean = nn.Parameter(torch.empty(n, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = nn.init.calculate_gain(self.nonlinearity)
        with torch.no_grad():
            self.std.normal_().mul_(gain / self.kernel_size)
            self.mean.normal_()

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        n = self.channels * self.kernel_size ** 2
        if theta.dim() < 2 or theta.shape[1] != n or any(s != 1 for s in theta.shape[2:]):
            raise ValueError(f"FilterNorm expects filters (S, c·k² = {n}) or (S, c·k², 1, 1), got {tuple(theta.shape)}")
        s = theta.shape[0]
        kk = self.kernel_size ** 2
        raw = theta.reshape(s, self.channels, kk)
        centred = raw - raw.mean(dim=-1, keepdim=True)
        normed = centred / (raw.std(dim=-1, keepdim=True) + _dtf_phases.FN_EPS)
        out = normed * self.std.view(self.channels, kk) + self.mean.view(self.channels, kk)
        return out.reshape(theta.shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, nonlinearity={self.nonlinearity!r}"


# ----------------------------------------------------------------------------- the filters
class DynamicTaskFilter(nn.Module):
    """TADFormer's Dynamic Task Filter (Eq. 3), on the fused ``dynamic_task_filter`` op.

    ``forward(x, hw)`` takes tokens (S, N, r) of an H × W map (raster order)
    or maps (S, r, H, W) and returns the filtered tensor in the same layout;
    ``return_theta=True`` also returns θ (S, n_windows, r, k, k).
    ``window = w`` runs the filter per w × w window (its own GAP and filter,
    zero padding at the window border): Swin's attention-proj layer.
    """

    def __init__(self, rank: int, kernel_size: int = 3, window: int = 0, nonlinearity: str = "relu",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.rank = _check_rank(rank, "rank")
        self.kernel_size = _check_kernel(kernel_size, minimum=3)
        self.window = check_window(window)
        factory = dict(device=device, dtype=dtype)
        self.phi = nn.Conv2d(rank, rank * kernel_size ** 2, 1, **factory)  # φ, default Conv2d init as TADFormer
        self.filter_norm = FilterNorm(rank, kernel_size, nonlinearity, **factory)

    @property
    def phi_weight(self) -> torch.Tensor:
        return self.phi.weight.reshape(self.phi.out_channels, self.rank)

    def forward(self, x: torch.Tensor, hw: Sequence[int] | None = None, return_theta: bool = False):
        tokens, hw, was_map = _tokens(x, hw, self.rank)
        out, theta = dynamic_task_filter(tokens, hw, self.phi_weight, self.phi.bias, self.filter_norm.std,
                                         self.filter_norm.mean, self.window, return_theta=True)
        out = _untokens(out, hw, was_map)
        return (out, theta) if return_theta else out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, kernel_size={self.kernel_size}, window={self.window}"


class StaticTaskFilter(nn.Module):
    """The released code's ``NaiveConvFilter``: a learned depthwise k×k conv, the same for every sample.

    Tokens (S, N, r) with hw, or maps (S, r, H, W); ``window`` as in
    :class:`DynamicTaskFilter`.
    """

    def __init__(self, rank: int, kernel_size: int = 3, window: int = 0, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.rank = _check_rank(rank, "rank")
        self.kernel_size = _check_kernel(kernel_size)
        self.window = check_window(window)
        self.conv2d = nn.Conv2d(rank, rank, kernel_size, padding=kernel_size // 2, groups=rank, bias=bias,
                                device=device, dtype=dtype)

    @property
    def filter_weight(self) -> torch.Tensor:
        return self.conv2d.weight.reshape(self.rank, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor, hw: Sequence[int] | None = None) -> torch.Tensor:
        tokens, hw, was_map = _tokens(x, hw, self.rank)
        out = _dtf_phases.static_filter_forward(tokens, hw, self.window, self.filter_weight, self.conv2d.bias)
        return _untokens(out, hw, was_map)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, kernel_size={self.kernel_size}, window={self.window}"


# ----------------------------------------------------------------------------- TA-module
class TaskAwareLoRALinear(_FrozenBase):
    """TADFormer's TA-module (§3.4, Eq. 1 and Eq. 3–4) around a frozen ``nn.Linear`` Φ.

    ``forward(x, x_tasks=None, hw, stacked=False)`` returns ``(shared, tasks)``:

    * ``shared`` (…, N, C_out) = Φ(x) + s · u Aᵀ Bᵀ, u = dropout(x): the shared
      LoRA without filter, i.e. the TS-module path (Eq. 1) of the task-agnostic
      stream. This is what the released ``TAModuleLinear`` returns as its first
      output (``pretrained + lora``).
    * ``tasks`` ``{task: (…, N, C_out)}``, or (T, …, N, C_out) with ``stacked``:
      F̃_t = Φ_t + s · (θ_t ⊛ (f_t Aᵀ)) Bᵀ with the same A, B, θ_t from the
      Dynamic Task Filter (shared by the tasks, one filter per sample and
      window) or the task's static filter. f_t = ``x_tasks[t]`` (a dict by
      task, a list of T tensors or a (T, …, N, C) tensor), or u for every task
      when ``x_tasks`` is None. Φ_t is Φ(f_t) with
      ``task_base="task"`` (the paper's Eq. 4, T frozen GEMMs) or Φ(x) with
      ``task_base="shared"`` (the released code, which adds the frozen output
      of the shared input to every task: one frozen GEMM).

    ``scale`` is the LoRA scale s (the released code's ``lora_shared_scale``);
    ``alpha`` gives s = alpha / rank instead. ``window`` > 0: the filter runs on
    window × window windows (7 in Swin's attention proj); 0: on the whole map
    (fc1, fc2). ``tasks``: the task names, or their number T. A starts
    Kaiming-uniform(a=√5), B at zero.
    """

    def __init__(self, base: nn.Linear, rank: int, tasks=None, scale: float | None = None,
                 alpha: float | None = None, window: int = 0, filter: str = "dynamic", kernel_size: int = 3,
                 task_base: str = "task", dropout: float = 0.0, freeze_base: bool = True, *,
                 num_tasks: int | None = None) -> None:
        super().__init__()
        if num_tasks is not None:  # the keyword of fastdense <= 0.1
            if tasks is not None:
                raise ValueError("give tasks (names or a count), not num_tasks as well")
            warnings.warn("TaskAwareLoRALinear(num_tasks=T) is deprecated: pass tasks=T or the task names",
                          DeprecationWarning, stacklevel=2)
            tasks = num_tasks
        if tasks is None:
            raise TypeError("TaskAwareLoRALinear needs tasks: the task names or their number")
        weight, bias = self._take_linear(base, freeze_base)
        self._bind_base(weight, bias)
        self.rank = _check_rank(rank, "rank")
        self.tasks = task_names(tasks)
        if scale is not None and alpha is not None:
            raise ValueError("give scale or alpha (scale = alpha / rank), not both")
        if alpha is not None:
            scale = float(alpha) / rank
        self.scale = 1.0 if scale is None else float(scale)
        self.window = check_window(window)
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        if task_base not in TASK_BASES:
            raise ValueError(f"task_base must be one of {TASK_BASES}, got {task_base!r}")
        self.filter, self.task_base = filter, task_base
        self.kernel_size = _check_kernel(kernel_size, minimum=3 if filter == "dynamic" else 1)
        self.dropout = nn.Dropout(_check_dropout(dropout)) if dropout > 0 else nn.Identity()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lora_shared_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_shared_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        _init_lora_pair(self.lora_shared_A, self.lora_shared_B)
        if filter == "dynamic":
            self.lora_filter = DynamicTaskFilter(rank, kernel_size, window, **factory)
        else:
            # Keyed by task name like the released code's lora_filter.<task>.
            self.lora_filter = nn.ModuleDict({str(t): StaticTaskFilter(rank, kernel_size, window, **factory)
                                              for t in self.tasks})

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def forward(self, x: torch.Tensor, x_tasks=None, hw: Sequence[int] | None = None, stacked: bool = False):
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., N, C={self.in_features}), got {tuple(x.shape)}")
        if hw is None:
            raise ValueError("hw=(H, W) of the token map is required")
        lead = tuple(x.shape[:-1])
        n = x.shape[-2]
        batch = math.prod(lead[:-1])
        x3 = x.reshape(batch, n, self.in_features)
        u = self.dropout(x3)
        base_x = F.linear(x3, self.weight, self.bias)
        shared = base_x + self.scale * ((u @ self.lora_shared_A.t()) @ self.lora_shared_B.t())

        if x_tasks is None:
            f, base_out = u, base_x
        else:
            f = stack_task_inputs(self.tasks, x_tasks, (*lead, self.in_features))
            f = f.reshape(self.num_tasks, batch, n, self.in_features)
            base_out = F.linear(f, self.weight, self.bias) if self.task_base == "task" else base_x
        if self.filter == "dynamic":
            dtf = self.lora_filter
            tasks = ta_lora_dtf(f, base_out, self.lora_shared_A, self.lora_shared_B, self.scale, hw,
                                dtf.phi_weight, dtf.phi.bias, dtf.filter_norm.std, dtf.filter_norm.mean,
                                self.window, num_tasks=self.num_tasks)
        else:
            filters = [self.lora_filter[str(t)] for t in self.tasks]
            weights = torch.stack([m.filter_weight for m in filters])
            biases = None
            if filters[0].conv2d.bias is not None:
                biases = torch.stack([m.conv2d.bias for m in filters])
            tasks = ta_lora_dtf(f, base_out, self.lora_shared_A, self.lora_shared_B, self.scale, hw,
                                window=self.window, filter="static", static_weight=weights, static_bias=biases,
                                num_tasks=self.num_tasks)
        return (shared.reshape(*lead, self.out_features),
                task_outputs(self.tasks, tasks.reshape(self.num_tasks, *lead, self.out_features), stacked))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"tasks={self.tasks}, scale={self.scale}, window={self.window}, filter={self.filter!r}, "
                f"task_base={self.task_base!r}")
