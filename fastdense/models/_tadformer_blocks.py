"""TADFormer's blocks, written as functions over fastdense's Swin modules.

The Swin modules (``fastdense.models.swin``) keep their timm layout; TADFormer
changes what a block *computes*, not what it holds, so the two block forwards
live here as functions of a :class:`~fastdense.models.swin.SwinBlock` whose
linears were replaced (see ``fastdense/models/tadformer.py``):

* :func:`prompt_window_attention` — (S)W-MSA with the task prompts prepended to
  every window, the relative-position bias and the shift mask on patch–patch
  pairs only (zeros elsewhere), and optionally the raw prompt–patch logits the
  TPC operator reads.
* :func:`ts_block` — a block with TS-modules only (Eq. 1): the shared stream
  and the prompts.
* :func:`ta_block` — the task-adapting block (the last of a stage): TPC
  operator (Eq. 2), TA-modules on proj, fc1, fc2 (Eq. 3–4), the stage gate
  (Eq. 5).

The prompts follow the released code (docs/paper-decisions.md, section 'Task
prompts'): inside each block they are attended to and attend like patch tokens,
their output rows are averaged over the windows, and their new value is
p + drop_path(MLP(norm2(averaged attention output))) — the attention output
replaces, it is not added to, the prompts before the MLP's residual.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdense.models.swin import SwinBlock, window_partition, window_reverse
from fastdense.nn.dtf import TaskAwareLoRALinear
from fastdense.ops import lora_linear

#: What the stage gate mixes with the block's task output (Eq. 5's f_i): the TPC reweighting
#: term as the released code lays it out ("released", see :func:`released_skip_layout`), the
#: same term in its own layout ("reweighting"), or the task-adapted feature ("adapted").
GATE_SKIPS = ("released", "reweighting", "adapted")


class TAModule(TaskAwareLoRALinear):
    """A :class:`~fastdense.nn.TaskAwareLoRALinear` that can also run its TS path alone.

    ``forward_shared(x)`` = Φ(x) + s · dropout(x) Aᵀ Bᵀ (Eq. 1), the layer's shared
    output, for tokens that have no task outputs: the prompt rows of the attention
    projection and the prompts passing through the task-adapting block's MLP.
    """

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else None
        return lora_linear(x, self.weight, self.bias, self.lora_shared_A, self.lora_shared_B, self.scale,
                           x_lora=x_lora)


class WindowGeometry(NamedTuple):
    """How a (B, H, W, C) map was cut into windows: padded size, window, cyclic shift."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    window: tuple[int, int]
    shift: tuple[int, int]


def to_windows(block: SwinBlock, x: torch.Tensor) -> tuple[torch.Tensor, WindowGeometry, Optional[torch.Tensor]]:
    """Pad, roll and partition as :meth:`SwinBlock.window_attention` does: (B, H, W, C) ->
    windows (B·nW, n, C), their geometry, and the (nW, n, n) shift mask or None."""
    b, h, w, c = x.shape
    window, shift = block.window_shift(h, w)
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(x, window).reshape(-1, window[0] * window[1], c)
    mask = block.shift_mask(hp, wp, window, shift, x.device, block.attn.relative_position_bias_table.dtype)
    return windows, WindowGeometry(h, w, hp, wp, window, shift), mask


def from_windows(t: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Inverse of :func:`to_windows` for any number of stacked maps: (S·B·nW, n, C) -> (S·B, H, W, C)."""
    wh, ww = geom.window
    out = window_reverse(t.reshape(-1, wh, ww, t.shape[-1]), geom.window, geom.padded_height, geom.padded_width)
    if any(geom.shift):
        out = torch.roll(out, shifts=geom.shift, dims=(1, 2))
    if geom.padded_height != geom.height or geom.padded_width != geom.width:
        out = out[:, :geom.height, :geom.width, :]
    return out


def prompt_window_attention(block: SwinBlock, x: torch.Tensor, prompts: torch.Tensor, *, task_map: bool):
    """(S)W-MSA over [prompts, window tokens] in every window, before the projection.

    x: normalised (B, H, W, C) tokens; prompts: normalised (B, P, C). Returns the
    attention output (B·nW, P + n, C) (prompt rows first), the raw logits q·kᵀ of
    prompt rows against patch columns (B·nW, heads, P, n) when ``task_map`` (no
    1/√d, no bias: what the released TPC operator reads), and the window geometry.
    """
    attn = block.attn
    windows, geom, mask = to_windows(block, x)
    bn, n, c = windows.shape
    b, p = prompts.shape[:2]
    copies = prompts.unsqueeze(1).expand(b, bn // b, p, c).reshape(bn, p, c)
    tokens = torch.cat([copies, windows], dim=1)
    m = p + n
    qkv = attn.qkv(tokens).reshape(bn, m, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    # Bias and shift mask act on patch-patch pairs; prompt rows and columns get 0.
    bias = F.pad(attn.attention_bias(bn, mask, geom.window), (p, 0, p, 0))
    out = attn.attend(q, k, v, bias).transpose(1, 2).reshape(bn, m, -1)
    logits = q[:, :, :p] @ k[:, :, p:].transpose(-2, -1) if task_map else None
    return out, logits, geom


def _windows_mean(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(B·nW, P, C) prompt rows -> (B, P, C), averaged over each sample's windows."""
    return rows.unflatten(0, (batch, -1)).mean(1)


def shared_mlp(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP on the TS path only (prompts in the task-adapting block)."""
    mlp = block.mlp
    fc1 = mlp.fc1.forward_shared if isinstance(mlp.fc1, TAModule) else mlp.fc1
    fc2 = mlp.fc2.forward_shared if isinstance(mlp.fc2, TAModule) else mlp.fc2
    return mlp.drop2(fc2(mlp.drop1(mlp.act(fc1(x)))))


def _next_prompts(block: SwinBlock, prompts: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    return prompts + block.drop_path2(shared_mlp(block, block.norm2(attended)))


def ts_block(block: SwinBlock, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block with TS-modules only: (B, H, W, C) tokens and (B, P, C) prompts -> both updated."""
    b, p = prompts.shape[:2]
    out, _, geom = prompt_window_attention(block, block.norm1(x), block.norm1(prompts), task_map=False)
    out = block.attn.proj_drop(block.attn.proj(out))
    x = x + block.drop_path1(from_windows(out[:, p:], geom))
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x, _next_prompts(block, prompts, _windows_mean(out[:, :p], b))


def task_prompt_conditioning(logits: torch.Tensor, u: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """The TPC operator's reweighting term S_inv(a_t ⊗ Ŝ(f)) of Eq. 2, for every task.

    logits: (S, heads, P, n) raw prompt–patch logits, P = num_tasks · prompt_len;
    u: (S, n, C) the attention output. a_t = GELU(logits) of task t's prompt row
    (the mean over its rows when a task has several), one weight per head and
    token, multiplies that head's C / heads channels. Returns (T, S, n, C).
    """
    s, heads, p, n = logits.shape
    a = F.gelu(logits).unflatten(2, (num_tasks, p // num_tasks)).mean(3)     # (S, heads, T, n)
    a = a.permute(2, 0, 3, 1).unsqueeze(-1)                                   # (T, S, n, heads, 1)
    return (a * u.unflatten(-1, (heads, -1)).unsqueeze(0)).flatten(-2)


def released_skip_layout(skip: torch.Tensor) -> torch.Tensor:
    """The released code's reading of the gate's skip term: (..., n, C) per window -> the
    same memory read as (..., C, n) channels-first and viewed back as (..., n, C).

    The released TA-module stores the reweighting term per window as (channels, tokens)
    and the block views that memory as (window, window, channels) before un-windowing, so
    token and channel indices are interleaved (docs/paper-decisions.md, 'Stage gate skip
    feature'). Released checkpoints were trained with it, so loading them with equal
    outputs needs it too.
    """
    return skip.transpose(-2, -1).reshape(skip.shape)


def ta_block(block: SwinBlock, prompt_norm: nn.Module, x: torch.Tensor, prompts: torch.Tensor,
             gate: torch.Tensor, update_prompts: bool = True, gate_skip: str = "released"):
    """The task-adapting block (last of a stage): (B, H, W, C) tokens, (B, P, C) prompts,
    the stage's gate scalar g -> (shared tokens, (T, B, H, W, C) task features, prompts).

    Attention (computed once): TPC on the projection input f = dropout(attention output)
    of the patch rows, f_t = prompt_norm(f + S_inv(a_t ⊗ Ŝ(f))) (Eq. 2 with the released
    LayerNorm); the proj TA-module maps the shared f to the shared stream and every f_t to
    task t's output, its filter running on each window. Residuals start from the shared
    shortcut; fc1 reads norm2 of each branch, fc2 fc1's activated outputs (the released
    wiring, docs/paper-decisions.md 'TA-module inputs'). Eq. 5 then mixes the block's task
    output, by σ(g), with the reweighting term as the released code lays it out
    (``gate_skip="released"``), the same term in its own layout (``"reweighting"``) or
    with f_t (``"adapted"``).
    """
    attn, mlp = block.attn, block.mlp
    proj: TAModule = attn.proj
    b, h, w, c = x.shape
    p = prompts.shape[1]
    tasks = proj.num_tasks
    out, logits, geom = prompt_window_attention(block, block.norm1(x), block.norm1(prompts), task_map=True)
    patches = out[:, p:]
    u = proj.dropout(patches)
    reweighted = task_prompt_conditioning(logits, u, tasks)                    # (T, B·nW, n, C)
    adapted = prompt_norm(u + reweighted)
    shared, task_out = proj(patches, adapted, hw=geom.window, stacked=True)
    shared, task_out = attn.proj_drop(shared), attn.proj_drop(task_out)
    if gate_skip == "released":
        skip = released_skip_layout(reweighted)
    else:
        skip = reweighted if gate_skip == "reweighting" else adapted
    maps = from_windows(torch.cat([shared.unsqueeze(0), task_out, skip]).flatten(0, 1), geom)
    maps = maps.unflatten(0, (1 + 2 * tasks, b))                                # shared, T task outputs, T skips
    a0 = x + block.drop_path1(maps[0])
    at = x + block.drop_path1(maps[1:1 + tasks].flatten(0, 1)).unflatten(0, (tasks, b))

    hw = (h, w)
    h0, ht = mlp.fc1(block.norm2(a0).reshape(b, h * w, c), block.norm2(at).reshape(tasks, b, h * w, c), hw=hw,
                     stacked=True)
    h0, ht = mlp.drop1(mlp.act(h0)), mlp.drop1(mlp.act(ht))
    m0, mt = mlp.fc2(h0, ht, hw=hw, stacked=True)
    x_out = a0 + block.drop_path2(mlp.drop2(m0).reshape(b, h, w, c))
    feats = at + block.drop_path2(mlp.drop2(mt).reshape(tasks * b, h, w, c)).unflatten(0, (tasks, b))
    g = torch.sigmoid(gate)
    feats = g * maps[1 + tasks:] + (1 - g) * feats                              # Eq. 5

    if update_prompts:
        attended = _windows_mean(attn.proj_drop(proj.forward_shared(out[:, :p])), b)
        prompts = _next_prompts(block, prompts, attended)
    return x_out, feats, prompts


__all__ = ["GATE_SKIPS", "TAModule", "WindowGeometry", "from_windows", "prompt_window_attention", "shared_mlp",
           "released_skip_layout", "ta_block", "task_prompt_conditioning", "to_windows", "ts_block"]
