"""TDSS's Task-Synergistic Adaptation Interaction (TSAI, §4.3) and its prediction heads.

TSAI turns each task's four lateral stage features into that task's prediction:

1. **Scale fusion** (:class:`ScaleFusion`, one per task): SegFormer's all-MLP
   decoder body (Xie et al. 2021). Each stage feature goes through a
   token-wise Linear C_s -> D, is resized bilinearly to the finest stage's
   map (H/4 x W/4), the four are concatenated and a bias-free 1x1
   convolution 4D -> D, BatchNorm and ReLU fuse them into X^t.
2. **Branch synergy** (:class:`SynergyLayer`, K of them, shared by the tasks),
   Eq. 8 with the global feature X^g = Σ_t X^t::

       X^t' = Attn(LN(X^t), LN(X^g)) + X^t
       X^t  = FFN(LN(X^t')) + X^t'

   X^g is summed afresh from the current task features at every layer (the
   interaction "is repeated for K layers").
3. **Heads**: a 1x1 convolution D -> the task's channels per task (the
   paper's "channel projection"), then a bilinear resize to the image.

Choices where the paper is brief (docs/paper-decisions.md, 'TSAI attention
and width'):

* The paper's attention is deformable ("sparse", Zhu et al. 2021) with no
  settings given. Here it is *spatial-reduction* attention: the queries are
  the H/4 x W/4 tokens of X^t, the keys and values come from LN(X^g)
  average-pooled by ``sr_ratio`` (8, PVT's and SegFormer's ratio at stride 4:
  196 keys for a 448² image), with no parameters beyond the q/kv/out
  projections, computed by ``F.scaled_dot_product_attention``. Its fused
  kernels (flash / memory-efficient on CUDA, flash on CPU) keep memory linear
  in the number of tokens; the keys and values are computed once per layer
  and shared by all tasks, whose queries are laid end to end in one call.
* Width D = 96 (Swin-T's first stage), 3 heads of 32, FFN ratio 4: with
  these the four tasks' TSAI holds 1,153,952 parameters, the "+TSAI 1.15 M"
  of Table 4(a), and the whole model 3.51 M against the paper's 3.52 M.

Scale fusion is computed in an equivalent, cheaper order: the 1x1 fuse
convolution and bilinear resizing are both linear, so each stage's slice of
the fuse weight is folded into its Linear and applied at the stage's own
resolution before the resize; the 4D-channel concatenation at H/4 x W/4 never
exists. ``ScaleFusion.forward_literal`` is the textbook order, for tests.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from fastdense.models.swin import Mlp

#: Width, heads, FFN ratio and key/value pooling of TSAI (see the module docstring).
TSAI_DIM = 96
TSAI_HEADS = 3
TSAI_MLP_RATIO = 4.0
TSAI_SR_RATIO = 8


class ScaleFusion(nn.Module):
    """One task's SegFormer MLP fusion: stage features (B, H_s, W_s, C_s), finest first ->
    X^t (B, H_0, W_0, D) at the finest stage's size.

    Parameters: ``proj[s]`` Linear(C_s, D), ``fuse`` Conv2d(S·D, D, 1, bias=False)
    whose input channels are the stages in order (finest first), ``norm`` BatchNorm2d(D).
    """

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        self.fuse = nn.Conv2d(len(in_channels) * dim, dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.ReLU()

    def _check(self, feats: Sequence[torch.Tensor]) -> None:
        if len(feats) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} stage features, got {len(feats)}")

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(feats)
        size = tuple(feats[0].shape[1:3])
        d = self.dim
        fuse = self.fuse.weight.reshape(d, len(self.proj), d)          # (D_out, stage, D_in)
        out = None
        for s, (proj, f) in enumerate(zip(self.proj, feats)):
            w = fuse[:, s]                                              # this stage's slice of the 1x1 conv
            y = F.linear(f, w @ proj.weight, w @ proj.bias).permute(0, 3, 1, 2)   # NCHW view, NHWC memory
            if tuple(y.shape[-2:]) != size:
                y = F.interpolate(y, size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return self.act(self.norm(out)).permute(0, 2, 3, 1)

    def forward_literal(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """SegFormer's order: project, resize, concatenate, fuse (same result as ``forward``)."""
        self._check(feats)
        size = tuple(feats[0].shape[1:3])
        ups = [F.interpolate(proj(f).permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False)
               for proj, f in zip(self.proj, feats)]
        return self.act(self.norm(self.fuse(torch.cat(ups, dim=1)))).permute(0, 2, 3, 1)


class SynergyLayer(nn.Module):
    """One branch-synergy layer (Eq. 8), shared by the tasks; (B, T, H, W, D) -> same.

    Queries from LN(X^t) of every task; keys and values from LN(X^g), X^g = Σ_t X^t,
    average-pooled to ceil(H / sr) x ceil(W / sr) tokens (see the module docstring).
    Tasks sit in dim 1 so that the T query sets of an image are one contiguous sequence:
    the attention reads the q projection's output and its output feeds the out projection
    as views, without copies.
    """

    def __init__(self, dim: int, num_heads: int = TSAI_HEADS, mlp_ratio: float = TSAI_MLP_RATIO,
                 sr_ratio: int = TSAI_SR_RATIO) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TSAI width {dim} is not a multiple of its {num_heads} heads")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, int(sr_ratio)
        self.norm_task = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, n_kv, head_dim) keys and values from the global feature of ``x``."""
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        g = self.norm_global(x.sum(1))
        pooled = (math.ceil(h / self.sr_ratio), math.ceil(w / self.sr_ratio))
        if pooled != (h, w):
            g = F.adaptive_avg_pool2d(g.permute(0, 3, 1, 2), pooled).permute(0, 2, 3, 1)
        n = pooled[0] * pooled[1]
        kv = self.kv(g).reshape(b, n, 2, self.num_heads, self.dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, d = x.shape
        heads, hd = self.num_heads, d // self.num_heads
        k, v = self.keys_values(x)
        # Every task's queries attend to the same keys: one call with the T query sets end to end.
        q = self.q(self.norm_task(x)).reshape(b, t * h * w, heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h, w, d)
        x = x + self.proj(o)
        return x + self.mlp(self.norm_mlp(x))


class TSAI(nn.Module):
    """Scale fusion per task, K shared synergy layers, a 1x1 conv head per task.

    ``forward(feats, out_size)``: ``feats`` the S stage features, each stacked over the
    tasks (T, B, H_s, W_s, C_s), finest first; returns ``{task: (B, C_t, *out_size)}``.
    With ``grad_checkpointing`` the synergy layers are recomputed in the backward pass
    instead of keeping their activations (about 15 D numbers per token, task and layer).
    """

    def __init__(self, tasks: Sequence[str], in_channels: Sequence[int], num_outputs: Mapping[str, int], *,
                 dim: int = TSAI_DIM, depth: int = 4, num_heads: int = TSAI_HEADS,
                 mlp_ratio: float = TSAI_MLP_RATIO, sr_ratio: int = TSAI_SR_RATIO) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"the number of synergy layers must be >= 0, got {depth}")
        self.tasks = list(tasks)
        self.fusion = nn.ModuleDict({t: ScaleFusion(in_channels, dim) for t in self.tasks})
        self.synergy = nn.ModuleList(SynergyLayer(dim, num_heads, mlp_ratio, sr_ratio) for _ in range(depth))
        self.heads = nn.ModuleDict({t: nn.Conv2d(dim, int(num_outputs[t]), 1) for t in self.tasks})
        self.grad_checkpointing = False

    def forward(self, feats: Sequence[torch.Tensor], out_size: Sequence[int]) -> Dict[str, torch.Tensor]:
        x = torch.stack([self.fusion[t]([f[i] for f in feats]) for i, t in enumerate(self.tasks)], dim=1)
        for layer in self.synergy:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        size = tuple(out_size)
        return {t: F.interpolate(self.heads[t](x[:, i].permute(0, 3, 1, 2)), size, mode="bilinear",
                                 align_corners=False)
                for i, t in enumerate(self.tasks)}


__all__ = ["ScaleFusion", "SynergyLayer", "TSAI", "TSAI_DIM", "TSAI_HEADS", "TSAI_MLP_RATIO", "TSAI_SR_RATIO"]
