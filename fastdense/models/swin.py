"""Swin Transformer backbone (Swin-T/S/B) with timm-compatible weights.

Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021) is a four-stage pyramid of transformer blocks. Each block attends
only inside non-overlapping MxM windows, with a learned bias that depends on the
relative offset of the two tokens (the paper's attention with bias B, Eq. 4:
softmax(Q K^T / sqrt(d) + B) V, B read from a (2M-1)^2 table per head). Every second
block shifts the windows by M/2, so information crosses window borders; the shift is
done as a cyclic roll plus a mask that keeps tokens brought together by the roll
apart. Between stages, patch merging halves the resolution and doubles the width.

The file reads top-down: helpers, then the blocks (PatchEmbed, WindowAttention,
SwinBlock, PatchMerging, SwinStage), then :class:`SwinTransformer` and the constructors
:func:`swin_t`, :func:`swin_s`, :func:`swin_b`. Checkpoint loading is in
``fastdense/models/swin_checkpoint.py``.

Parameter names and shapes are those of timm >= 0.9 (``swin_*_patch4_window7_224``),
where the patch merging that feeds stage i belongs to stage i, so a timm state dict
loads with ``strict=True``. The window partition/reverse, the shift mask and the
relative-position lookup are module-level functions or small methods, the projections
are plain ``nn.Linear`` attributes (``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``) and tokens stay (B, H, W, C) inside a stage, so that the PEFT models
(MTLoRA, TADFormer, TDSS) can replace those layers or subclass the blocks.

Any input size is accepted; the choices, decided per forward from the shapes alone
(plain Python ints, so ``torch.compile(fullgraph=True)`` traces them as constants):

* The image is zero-padded right/bottom to a multiple of the patch size, and a stage
  map to a multiple of the window, as timm and the Swin detection/segmentation code
  do; padded tokens are zeros after ``norm1`` and, as there, they are not masked out.
  Padding happens *before* the cyclic shift (the order of Microsoft's detection
  backbone): the shift mask is then built for the padded map and separates exactly the
  tokens that the roll wrapped around. Recent timm rolls first and pads after, which
  lets wrapped tokens attend across the image when a map needs padding; without
  padding (224 and 448 inputs for the 7x7 windows) both orders give the same result.
* Where a stage map is not larger than the window along an axis, the window shrinks
  to the map along that axis and the shift along it is dropped (timm's per-axis rule;
  a single window needs no shift). The shrunk window reads the *centre* of the bias
  table, i.e. the learned biases of the offsets that still occur, instead of resizing
  the table as timm does when it is built for such a small image.
* The shift mask adds -100 (not -inf) to pairs from different regions, as timm and
  the original code do.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from fastdense.models.registry import register_model

_IntOr2 = Union[int, Sequence[int]]

# Added to the logits of token pairs that the shifted-window roll brought into one window.
# A large finite value like the original code (exp(-100) underflows to 0 in fp32/bf16
# softmax) rather than -inf, whose rows would be NaN if ever fully masked.
MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def to_2tuple(x: _IntOr2) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is returned as a tuple of ints."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): zero the residual branch of whole samples
    with probability ``p`` during training and rescale the kept ones by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (no parameters)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh, ww, C), windows in raster order, B outermost.

    H and W must be multiples of the window (pad first)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh, ww, C) -> (B, height, width, C)."""
    wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, height // wh, width // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(win_h: int, win_w: int, table_window: Optional[tuple[int, int]] = None,
                            device: Optional[torch.device] = None) -> torch.Tensor:
    """(N, N) int64 index into a relative-position bias table, N = win_h * win_w.

    Entry (i, j) is the table row of the offset (dy, dx) = pos(i) - pos(j) of query i and
    key j in raster order: row = (dy + Th - 1) * (2 Tw - 1) + (dx + Tw - 1) for a table
    laid out as a (2 Th - 1) x (2 Tw - 1) grid of offsets (Th, Tw = ``table_window``,
    by default the window itself). A window smaller than the table's reads its centre.
    """
    th, tw = table_window if table_window is not None else (win_h, win_w)
    if win_h > th or win_w > tw:
        raise ValueError(f"window {(win_h, win_w)} is larger than the bias table's window {(th, tw)}")
    ys = torch.arange(win_h, device=device).repeat_interleave(win_w)
    xs = torch.arange(win_w, device=device).repeat(win_h)
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    return (dy + th - 1) * (2 * tw - 1) + (dx + tw - 1)


def effective_window_shift(feat_size: tuple[int, int], window: tuple[int, int],
                           shift: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and shift actually used on a (H, W) map, per axis (timm's rule): where the
    map is not larger than the window, the window becomes the map and the shift 0."""
    win = tuple(s if s <= w else w for s, w in zip(feat_size, window))
    sh = tuple(0 if s <= w else k for s, w, k in zip(feat_size, window, shift))
    return win, sh  # type: ignore[return-value]


def _region_ids(size: int, window: int, shift: int, device: Optional[torch.device]) -> torch.Tensor:
    # After rolling by -shift, the last window along an axis holds two pieces of the map
    # that were not neighbours: [size - window, size - shift) and the wrapped [size - shift, size).
    ids = torch.zeros(size, dtype=torch.int64, device=device)
    if shift > 0:
        ids[size - window:size - shift] = 1
        ids[size - shift:] = 2
    return ids


def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int], *,
                        device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                        mask_value: float = MASK_VALUE) -> torch.Tensor:
    """Additive attention mask (nW, N, N) of shifted windows on a (height, width) map that
    is already padded to multiples of the window and then rolled by -shift: 0 where query
    and key come from the same region of the unrolled map, ``mask_value`` elsewhere."""
    rows = _region_ids(height, window[0], shift[0], device)
    cols = _region_ids(width, window[1], shift[1], device)
    labels = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]
    labels = window_partition(labels, window).reshape(-1, window[0] * window[1])
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill_(different, mask_value)


@functools.lru_cache(maxsize=64)
def _cached_shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Masks depend on shapes only; eager forwards reuse them (shared by all blocks of a stage).
    return shifted_window_mask(height, width, window, shift, device=device, dtype=dtype)


def resize_relative_position_bias_table(table: torch.Tensor, new_window: _IntOr2,
                                        old_window: Optional[_IntOr2] = None) -> torch.Tensor:
    """Resize a ((2h-1)(2w-1), heads) bias table to another window by bicubic interpolation
    of the (2h-1) x (2w-1) offset grid of each head (align_corners=False, which keeps the
    zero-offset centre value). ``old_window`` defaults to the square window the table fits."""
    rows, heads = table.shape
    if old_window is None:
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise ValueError(f"a bias table of {rows} rows is not a (2w-1)^2 grid; pass old_window")
        old = ((side + 1) // 2, (side + 1) // 2)
    else:
        old = to_2tuple(old_window)
    new = to_2tuple(new_window)
    if (2 * old[0] - 1) * (2 * old[1] - 1) != rows:
        raise ValueError(f"bias table of {rows} rows does not fit window {old}")
    if new == old:
        return table
    grid = table.t().reshape(1, heads, 2 * old[0] - 1, 2 * old[1] - 1).float()
    grid = F.interpolate(grid, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bicubic", align_corners=False)
    return grid.reshape(heads, -1).t().contiguous().to(table.dtype)


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution, then LayerNorm; (B, C, H, W) -> (B, H/p, W/p, D).

    Inputs whose size is not a multiple of the patch are zero-padded right/bottom."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % ph, (-x.shape[3]) % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        # Convolution output permuted to NHWC: a free view for channels_last input.
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's names: ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative-position bias (W-MSA).

    ``forward`` takes windows as (B * nW, N, C) tokens. The bias (the paper's B) comes
    from ``relative_position_bias_table``, one row per relative offset and one column per
    head, gathered through the non-persistent ``relative_position_index`` buffer. The
    bias, plus the shift mask when given, is passed to
    ``F.scaled_dot_product_attention`` as its additive ``attn_mask``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: _IntOr2 = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, head_dim: Optional[int] = None) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5  # SDPA's default; kept for subclasses that compute logits
        wh, ww = self.window_size
        # Registered before qkv so that state_dict order matches timm's.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"

    def relative_position_bias(self, window: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """(heads, N, N) bias for a window (default: the full one; a smaller one reads the
        table's centre, see :func:`relative_position_index`)."""
        if window is None or tuple(window) == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(window[0], window[1], self.window_size,
                                            device=self.relative_position_bias_table.device)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1)
        return bias.permute(2, 0, 1)

    def attention_bias(self, num_batch_windows: int, mask: Optional[torch.Tensor] = None,
                       window: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Additive attention mask for SDPA: the bias, broadcast (1, heads, N, N) without a
        shift mask, else bias + mask expanded to (B * nW, heads, N, N) (windows B-major)."""
        bias = self.relative_position_bias(window).unsqueeze(0)
        if mask is None:
            return bias
        nw, n = mask.shape[0], mask.shape[-1]
        full = bias + mask.to(bias.dtype).unsqueeze(1)  # (nW, heads, N, N)
        return full.unsqueeze(0).expand(num_batch_windows // nw, -1, -1, -1, -1).reshape(-1, self.num_heads, n, n)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + attn_bias) v with attention dropout in training."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype),
                                              dropout_p=self.attn_drop if self.training else 0.0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                window: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """x: (B * nW, N, C) window tokens; mask: (nW, N, N) additive shift mask or None;
        window: the (possibly shrunk) window the N tokens come from."""
        bn, n, _ = x.shape
        qkv = self.qkv(x).reshape(bn, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = self.attend(q, k, v, self.attention_bias(bn, mask, window))
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bn, n, -1)))


class SwinBlock(nn.Module):
    """One Swin block on (B, H, W, C) tokens:
    x + drop_path((S)W-MSA(norm1(x))), then + drop_path(mlp(norm2(x))).

    With ``shift_size > 0`` the windows are shifted (SW-MSA): the map is rolled by
    -shift before partitioning and back afterwards, and the shift mask separates tokens
    that the roll wrapped around. See the module docstring for padding and small maps.
    """

    def __init__(self, dim: int, num_heads: int, window_size: _IntOr2 = 7, shift_size: _IntOr2 = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, head_dim: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.shift_size = to_2tuple(shift_size)
        if not all(0 <= s < w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift {self.shift_size} must lie in [0, window {self.window_size})")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop, head_dim=head_dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, shift_size={self.shift_size}"

    def window_shift(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(window, shift) used on a height x width map (see :func:`effective_window_shift`)."""
        return effective_window_shift((height, width), self.window_size, self.shift_size)

    @staticmethod
    def shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                   device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """(nW, N, N) mask for a padded height x width map, or None without shift.

        Cached per shape in eager mode; under torch.compile it is built in the graph from
        the (constant) ints instead, so that tracing touches no Python cache."""
        if not any(shift):
            return None
        if torch.compiler.is_compiling():
            return shifted_window_mask(height, width, window, shift, device=device, dtype=dtype)
        return _cached_shift_mask(height, width, window, shift, device, dtype)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(S)W-MSA on normalised (B, H, W, C) tokens: pad, roll, partition, attend, and undo."""
        b, h, w, c = x.shape
        window, shift = self.window_shift(h, w)
        pad_h, pad_w = (-h) % window[0], (-w) % window[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = window_partition(x, window).reshape(-1, window[0] * window[1], c)
        mask = self.shift_mask(hp, wp, window, shift, x.device, self.attn.relative_position_bias_table.dtype)
        out = self.attn(windows, mask=mask, window=window)
        out = window_reverse(out.reshape(-1, window[0], window[1], c), window, hp, wp)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        if pad_h or pad_w:
            out = out[:, :h, :w, :]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve H and W, concatenating each 2x2 neighbourhood (4C), then LayerNorm and a
    bias-free linear to ``out_dim`` (2C by default). Odd sizes are zero-padded first."""

    def __init__(self, dim: int, out_dim: Optional[int] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Channel order of the pretrained reduction weight: (top-left, bottom-left,
        # top-right, bottom-right), i.e. the row offset varies fastest.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging (``downsample``, stages 1..3) followed by ``depth`` blocks
    that alternate regular and shifted windows; (B, H, W, C) in and out."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: _IntOr2 = 7,
                 downsample: bool = True, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Union[float, Sequence[float]] = 0.0,
                 head_dim: Optional[int] = None, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim, self.out_dim, self.depth = dim, out_dim, depth
        if downsample:
            self.downsample: nn.Module = PatchMerging(dim, out_dim, norm_layer=norm_layer)
        elif dim != out_dim:
            raise ValueError(f"a stage without downsample keeps its width, got {dim} -> {out_dim}")
        else:
            self.downsample = nn.Identity()
        window = to_2tuple(window_size)
        shift = (window[0] // 2, window[1] // 2)
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * depth
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, window, shift_size=shift if i % 2 else 0, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=rates[i],
                      head_dim=head_dim, norm_layer=norm_layer)
            for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pool of (B, H, W, C) tokens, dropout, linear ``fc`` (Identity
    without classes); timm's ``head.fc`` names."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------

def _init_weights(module: nn.Module) -> None:
    # timm's default ViT/Swin init: truncated normal linears, zero biases; LayerNorm and
    # the patch convolution keep PyTorch's defaults.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class SwinTransformer(nn.Module):
    """Swin backbone: ``patch_embed`` -> ``layers`` (4 :class:`SwinStage`) -> ``norm`` -> ``head``.

    ``forward(x)`` returns the stage outputs selected by ``out_indices`` (default all
    four) as NCHW tensors (B, C_i, H / (4 * 2^i), W / (4 * 2^i)), rounded up for sizes
    that are not multiples, in channels_last memory layout (no copy). They are the raw
    stage outputs, like timm's ``forward_intermediates``/``features_only``; the final
    ``norm`` applies to the classification path only: ``forward_head(forward_features(x))``
    gives the ImageNet logits. ``num_classes=0`` builds no classifier (no ``head.fc`` keys).
    """

    def __init__(self, *, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[int, Sequence[int]] = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, head_dim: Optional[int] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        windows = [int(window_size)] * n if isinstance(window_size, int) else [int(w) for w in window_size]
        if len(windows) != n:
            raise ValueError(f"window_size {window_size!r} needs one int or one per stage ({n})")
        self.out_indices = tuple(sorted({i % n for i in out_indices}))
        if not self.out_indices:
            raise ValueError("out_indices selects no stage")
        self.num_classes = num_classes
        self.depths, self.num_heads_per_stage, self.window_sizes = depths, num_heads, tuple(windows)
        self.dims = tuple(int(embed_dim * 2 ** i) for i in range(n))
        self.num_features = self.dims[-1]
        self.feature_channels = tuple(self.dims[i] for i in self.out_indices)
        self.feature_strides = tuple(patch_size * 2 ** i for i in self.out_indices)

        self.patch_embed = PatchEmbed(patch_size, in_chans, self.dims[0])
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks (in Python,
        # so that the model can be built on the meta device).
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start = [], 0
        for i in range(n):
            stages.append(SwinStage(
                self.dims[max(i - 1, 0)], self.dims[i], depths[i], num_heads[i], windows[i], downsample=i > 0,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[start:start + depths[i]], head_dim=head_dim))
            start += depths[i]
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs selected by ``out_indices`` as (B, H_i, W_i, C_i) tokens; stops
        after the last selected stage."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            if i > self.out_indices[-1]:
                break
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, H, W) image -> list of NCHW stage features (see the class docstring)."""
        return [t.permute(0, 3, 1, 2) for t in self.forward_stages(x)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All stages, then the final norm: (B, H/32, W/32, C) tokens, as timm's."""
        x = self.patch_embed(x)
        return self.norm(self.layers(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier on :meth:`forward_features` output: pooled features or logits."""
        return self.head(x, pre_logits=pre_logits)


def _build(defaults: dict[str, Any], kwargs: dict[str, Any]) -> SwinTransformer:
    return SwinTransformer(**{**defaults, **kwargs})


@register_model
def swin_t(**kwargs: Any) -> SwinTransformer:
    """Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, patch 4 (28M params
    with the ImageNet head); keyword arguments override :class:`SwinTransformer`'s."""
    return _build(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), kwargs)


@register_model
def swin_s(**kwargs: Any) -> SwinTransformer:
    """Swin-S: embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7, patch 4."""
    return _build(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), kwargs)


@register_model
def swin_b(**kwargs: Any) -> SwinTransformer:
    """Swin-B: embed 128, depths 2-2-18-2, heads 4-8-16-32, window 7, patch 4."""
    return _build(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), kwargs)


__all__ = [
    "ClassifierHead", "DropPath", "MASK_VALUE", "Mlp", "PatchEmbed", "PatchMerging", "SwinBlock",
    "SwinStage", "SwinTransformer", "WindowAttention", "drop_path",
    "effective_window_shift", "relative_position_index",
    "resize_relative_position_bias_table", "shifted_window_mask", "swin_b", "swin_s", "swin_t", "to_2tuple",
    "window_partition", "window_reverse",
]
