"""Timestep Feature Consolidation (TFC), Eq. 3 of the TTS/TFC paper (§3.3).

For every support token the k diffusion-timestep features of that token are
merged into one key vector for the token-matching module (Eq. 1) by a cross
attention whose *query* is the support **label** feature of the token and
whose keys and values are the token's k **timestep** features:

    k' = Softmax( g(y) w_Q (f(x) w_K)ᵀ / √d ) · f(x) w_V = O_TS · f(x) w_V      (3)

The softmax runs over the timestep axis only (each token attends over its own
k timestep features, never over other tokens), so O_TS holds, per token and
head, one weight per timestep: it shows which timesteps the task draws on.

Multi-head form: ``dim`` is split into ``heads`` heads of ``d = dim / heads``
channels (the √d of Eq. 3 is the per-head width, as in the general cross
attention the paper follows); the heads' outputs are concatenated.

Parameters and what trains (paper §3.4 and Fig. 2):

* ``q_proj`` (w_Q) and ``v_proj`` (w_V) are :class:`fastdense.nn.LoRALinear`
  layers: "adapters ... [in] our TFC module ... each at query and value",
  r = 8, α = 16, dropout 0.2 by default (Eq. 4, A Kaiming-uniform, B zero).
* ``k_proj`` (w_K) is a plain ``nn.Linear`` without an adapter.
* Eq. 3 has no output projection (w_Q, w_K, w_V are the only matrices it
  names), so none is created unless ``out_proj=True``; then it is a plain
  ``nn.Linear`` without an adapter.

TFC is a new module, trained from scratch during episodic meta-training, so
its base weights are created trainable. For the few-shot fine-tuning stage the
paper trains only the adapters ("fine-tuned independently of the frozen weight
matrices"): call :meth:`TimestepFeatureConsolidation.freeze_base`, after which
only ``lora_A``/``lora_B`` of ``q_proj`` and ``v_proj`` receive gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastdense.nn.lora import LoRALinear

__all__ = ["TimestepFeatureConsolidation"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TimestepFeatureConsolidation(nn.Module):
    """Cross attention over the timestep axis (Eq. 3) with LoRA on query and value.

    Args:
        dim: channel width d_model of label and timestep features.
        heads: attention heads; must divide ``dim``.
        lora_r, lora_alpha, lora_dropout: the LoRA adapters of ``q_proj`` and
            ``v_proj`` (scale α / r; dropout on the adapter input in training).
        bias: biases on the projections.
        out_proj: add a plain output projection after the heads are merged
            (not part of Eq. 3; off by default).

    ``forward(label_features, timestep_features)`` accepts

    * ``label_features``: tokens ``(B, N, dim)`` or a map ``(B, dim, h, w)``
      (then N = h·w in row-major order);
    * ``timestep_features``: tokens ``(B, k, N, dim)`` or maps
      ``(B, k, dim, h, w)`` — the layout of a ``MultiTimestepFeatures`` layer
      after the projection to ``dim`` channels.

    and always returns the tuple ``(key, attention)``:

    * ``key``: the consolidated key k', tokens ``(B, N, dim)`` (row-major over
      (h, w) for map inputs; ``key.transpose(1, 2).reshape(B, dim, h, w)``
      gives the map back);
    * ``attention``: O_TS, ``(B, heads, N, k)``, softmax-normalised over k.

    k may differ from call to call (TTS evaluates subsets of k − 1 timesteps).
    """

    def __init__(self, dim: int, heads: int, lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.2, *, bias: bool = True, out_proj: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.heads = _positive_int(heads, "heads")
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        self.head_dim = dim // heads
        factory = dict(device=device, dtype=dtype)
        self.q_proj = LoRALinear(dim, dim, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, bias=bias, **factory)
        self.k_proj = nn.Linear(dim, dim, bias=bias, **factory)
        self.v_proj = LoRALinear(dim, dim, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, bias=bias, **factory)
        self.out_proj = nn.Linear(dim, dim, bias=bias, **factory) if out_proj else None
        # LoRALinear creates its base frozen (its use is adapting a pretrained
        # layer); TFC's base is trained from scratch, so it starts trainable.
        self.set_base_trainable(True)

    # ------------------------------------------------------------------ trainability
    def base_parameters(self):
        """w_Q, w_K, w_V (and the output projection): everything but the adapters."""
        for name, p in self.named_parameters():
            if ".lora_" not in name:
                yield p

    def set_base_trainable(self, trainable: bool) -> None:
        for p in self.base_parameters():
            p.requires_grad_(trainable)

    def freeze_base(self) -> None:
        """Fine-tuning mode (§3.4): only the query/value LoRA adapters train."""
        self.set_base_trainable(False)

    # ------------------------------------------------------------------ forward
    def _tokens(self, label: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(label, torch.Tensor) or not isinstance(feats, torch.Tensor):
            raise TypeError("label_features and timestep_features must be tensors, got "
                            f"{type(label).__name__} and {type(feats).__name__}")
        d = self.dim
        if feats.dim() == 5:  # (B, k, dim, h, w) maps -> (B, k, h·w, dim) tokens
            if feats.shape[2] != d:
                raise ValueError(f"timestep_features map must have shape (B, k, {d}, h, w), got {tuple(feats.shape)}")
            feats = feats.flatten(3).transpose(2, 3)
        elif feats.dim() != 4 or feats.shape[3] != d:
            raise ValueError(f"timestep_features must have shape (B, k, N, {d}) or (B, k, {d}, h, w), "
                             f"got {tuple(feats.shape)}")
        if label.dim() == 4:  # (B, dim, h, w) map -> (B, h·w, dim)
            if label.shape[1] != d:
                raise ValueError(f"label_features map must have shape (B, {d}, h, w), got {tuple(label.shape)}")
            label = label.flatten(2).transpose(1, 2)
        elif label.dim() != 3 or label.shape[2] != d:
            raise ValueError(f"label_features must have shape (B, N, {d}) or (B, {d}, h, w), got {tuple(label.shape)}")
        b, k, n, _ = feats.shape
        if label.shape[0] != b or label.shape[1] != n:
            raise ValueError(f"label_features has {label.shape[0]} samples of {label.shape[1]} tokens but "
                             f"timestep_features has {b} samples of {n} tokens; they must match")
        if k < 1:
            raise ValueError("timestep_features has no timesteps (k = 0)")
        if label.device != feats.device or label.dtype != feats.dtype:
            raise ValueError(f"label_features ({label.dtype}, {label.device}) and timestep_features "
                             f"({feats.dtype}, {feats.device}) must share dtype and device")
        return label, feats

    def forward(self, label_features: torch.Tensor,
                timestep_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label, feats = self._tokens(label_features, timestep_features)
        b, k, n, _ = feats.shape
        h, dh = self.heads, self.head_dim
        q = self.q_proj(label).view(b, n, h, dh)                 # g(y) w_Q
        key = self.k_proj(feats).view(b, k, n, h, dh)            # f(x) w_K
        value = self.v_proj(feats).view(b, k, n, h, dh)          # f(x) w_V
        # One query per token against that token's k keys: the score tensor is
        # only (B, heads, N, k), so a fused attention kernel would buy nothing.
        scores = torch.einsum("bnhd,bknhd->bhnk", q, key) * (1.0 / math.sqrt(dh))
        attn = scores.softmax(dim=-1)                            # O_TS, Eq. 3
        out = torch.einsum("bhnk,bknhd->bnhd", attn, value).reshape(b, n, self.dim)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out, attn

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, out_proj={self.out_proj is not None}"
