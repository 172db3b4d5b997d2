"""Attention-mask label maps from a Stable Diffusion U-Net (concept-codebook paper, §3.3).

The concept-embedding few-shot learner reads, from chosen transformer blocks
of a ``diffusers.UNet2DConditionModel``, the self-attention probabilities
M_sa = softmax(Q Kᵀ·scale) (L × L per head) and the cross-attention map M_ca
(L × N over the N concept tokens, normalised over N), and forms per block

    M_attn = M_saᵀ M_ca                     (L × N, §3.3, "M_attn = M_sa^T M_ca")

Each block's M_attn is upsampled to H × W, the maps are averaged over the
blocks and normalised over N, giving M_label (B, N, H, W): a distribution over
the N concepts for every pixel.

How it is computed here
-----------------------
:class:`AttentionMaskRecorder` installs two attention processors on every
chosen ``BasicTransformerBlock``:

* ``attn1`` (self-attention) gets :class:`SelfAttentionTapProcessor`: it runs
  attention exactly as diffusers' ``AttnProcessor2_0`` (same projections, same
  ``F.scaled_dot_product_attention`` call) and keeps the block's query/key
  (B, H, L, d) until the cross-attention of the same block runs (attn1 runs
  before attn2 inside a block).
* ``attn2`` (cross-attention) gets :class:`CrossAttentionTapProcessor`: again
  ``AttnProcessor2_0``'s computation, plus M_ca = softmax_N(q kᵀ·scale) averaged
  over heads and normalised over N, and the block's map
  ``fastdense.ops.attn_mask_aggregate(q_self, k_self, M_ca, scale_self)``
  (B, L, N) — the fused op never materialises the L × L matrix M_sa (at 64 × 64
  latents L = 4096: SD 1.x's 8 heads × 4096² values per sample and layer). The
  kept query/key are released right after. No ``lse`` is passed: SDPA does not
  return its log-sum-exp, so the op computes it in its first pass.

The U-Net's output is unchanged: the processors compute the same tensors with
the same calls as ``AttnProcessor2_0`` (the default processor of diffusers'
``Attention`` under PyTorch 2), so the output is bit-for-bit equal to the
default one. When the replaced processor was something else (xformers,
``AttnProcessor``) the recorded forward uses SDPA instead, equal up to floating
point rounding. Everything is differentiable: gradients reach the concept
embeddings (``encoder_hidden_states``) through M_label and through the U-Net
output.

Layer selection
---------------
Transformer blocks are counted in forward order — down blocks, mid block, up
blocks — see :func:`transformer_block_names`. The paper extracts "from the 8th
to the 12th layers, and the last three layers of the UNet" (SD 2.1). We read a
layer as one transformer block (one self-attention + cross-attention pair, as
both maps are needed) and the ordinals as 1-based, so the default is the 0-based
indices 7–11 and the last three. On SD 1.x/2.x (16 blocks: 6 down, 1 mid, 9 up)
that is

    7–11   up_blocks.1.attentions.{0,1,2}, up_blocks.2.attentions.{0,1}
    13–15  up_blocks.3.attentions.{0,1,2}

(at 64 × 64 latents: 16 × 16, 16 × 16, 16 × 16, 32 × 32, 32 × 32, then three
64 × 64 grids). On a U-Net with fewer blocks, the default takes those of
these indices that exist (always at least the last three, or all when there
are fewer than three). ``layers`` may also name blocks by index (negative
counts from the end) or by module-name prefix, e.g.
``"up_blocks.1.attentions.0.transformer_blocks.0"`` or just ``"up_blocks.3"``.

Example (real weights from a local directory; ``c`` are N learnable concept
embeddings replacing the text tokens)::

    from diffusers import UNet2DConditionModel
    from fastdense.diffusion import AttentionMaskRecorder

    unet = UNet2DConditionModel.from_pretrained("/data/sd-2-1", subfolder="unet")
    unet.requires_grad_(False)
    c = torch.nn.Parameter(torch.randn(1, 40, unet.config.cross_attention_dim) * 0.02)
    with AttentionMaskRecorder(unet) as rec:        # the paper's default layers
        unet(z_t, t, encoder_hidden_states=c.expand(len(z_t), -1, -1))
        m_label = rec.label_map(size=(512, 512))  # (B, 40, 512, 512), sums to 1 over N
    loss = F.nll_loss(m_label.clamp_min(1e-8).log(), bucket_ids)
    loss.backward()                                # gradients reach c

Maps are recorded once per U-Net forward call (a forward pre-hook on the
U-Net counts them): with gradient checkpointing, the blocks' recomputation
during the backward computes the map again (checkpoint needs the same saved
tensors) but the forward's recorded map stays. Masked self-attention (an
``attention_mask`` reaching attn1) is not supported by the aggregation and
raises; an encoder attention mask is applied to M_ca.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastdense.ops import attn_mask_aggregate

__all__ = [
    "AttentionMaskRecorder",
    "CrossAttentionTapProcessor",
    "DEFAULT_LAST_LAYERS",
    "DEFAULT_LAYER_ORDINALS",
    "SelfAttentionTapProcessor",
    "default_layer_indices",
    "transformer_block_names",
]

#: The paper's "8th to the 12th layers" (1-based ordinals of transformer blocks).
DEFAULT_LAYER_ORDINALS = (8, 9, 10, 11, 12)
#: ... "and the last three layers of the UNet".
DEFAULT_LAST_LAYERS = 3

_SECTION_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ----------------------------------------------------------------------------- block discovery
def _is_transformer_block(module: torch.nn.Module) -> bool:
    # Imported here so that fastdense.diffusion imports without diffusers.
    from diffusers.models.attention import BasicTransformerBlock

    return isinstance(module, BasicTransformerBlock)


def _blocks_in_forward_order(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    blocks = [(n, m) for n, m in unet.named_modules() if _is_transformer_block(m)]
    # UNet2DConditionModel registers down_blocks, up_blocks, then mid_block;
    # the forward runs down, mid, up. Registration order is kept inside a section.
    return sorted(blocks, key=lambda nm: _SECTION_RANK.get(nm[0].split(".", 1)[0], len(_SECTION_RANK)))


def transformer_block_names(unet: torch.nn.Module) -> list[str]:
    """Module names of the U-Net's transformer blocks in forward order (down, mid, up).

    Index i of this list is what ``AttentionMaskRecorder(unet, layers=[i])`` selects.
    """
    return [n for n, _ in _blocks_in_forward_order(unet)]


def default_layer_indices(num_blocks: int) -> list[int]:
    """0-based indices of the paper's layers among ``num_blocks`` transformer blocks.

    1-based ordinals 8–12 and the last three (SD 2.1: 7, 8, 9, 10, 11, 13, 14, 15);
    indices that do not exist in a smaller U-Net are dropped.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    chosen = {o - 1 for o in DEFAULT_LAYER_ORDINALS if o <= num_blocks}
    chosen |= set(range(max(num_blocks - DEFAULT_LAST_LAYERS, 0), num_blocks))
    return sorted(chosen)


def _eligibility_problem(block: torch.nn.Module) -> str | None:
    attn1, attn2 = getattr(block, "attn1", None), getattr(block, "attn2", None)
    if attn1 is None or getattr(attn1, "is_cross_attention", False):
        return "its attn1 is not a self-attention layer (only_cross_attention?)"
    if attn2 is None or not getattr(attn2, "is_cross_attention", False):
        return "it has no cross-attention attn2 (cross_attention_dim unset or double_self_attention?)"
    return None


# ----------------------------------------------------------------------------- processors
def _sdpa_attention(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    tap: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None],
) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` step by step, calling ``tap(q, k, mask)`` before SDPA.

    Every tensor operation is the one AttnProcessor2_0 performs, in the same
    order, so the result is bit-for-bit the same; ``tap`` only reads q, k
    (B, heads, L, head_dim) and the SDPA-shaped mask.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    tap(query, key, attention_mask)

    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    hidden_states = hidden_states / attn.rescale_output_factor
    return hidden_states


def _sdpa_scale(query: torch.Tensor) -> float:
    # AttnProcessor2_0 leaves SDPA's scale at its default, 1/sqrt(head_dim),
    # whatever attn.scale says; the maps must use the scale the U-Net used.
    return 1.0 / math.sqrt(query.shape[-1])


class _BlockTap:
    """State shared by the two processors of one transformer block."""

    def __init__(self, recorder: "AttentionMaskRecorder", name: str, grid_key: str | None):
        self.recorder = recorder
        self.name = name
        self.grid_key = grid_key
        # (q, k, scale) of attn1, alive only between attn1 and attn2 of one forward.
        self.stash: tuple[torch.Tensor, torch.Tensor, float] | None = None
        # The U-Net forward whose map this block recorded last (see _aggregate).
        self.recorded_in: int | None = None


class SelfAttentionTapProcessor:
    """``AttnProcessor2_0`` for a block's attn1 that also keeps its query/key for attn2."""

    def __init__(self, tap: _BlockTap):
        self._tap = tap

    def _keep(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            raise NotImplementedError(
                f"AttentionMaskRecorder: block {self._tap.name!r} got an attention_mask for its "
                "self-attention; attn_mask_aggregate has no mask argument, so masked self-attention "
                "maps are not supported"
            )
        self._tap.stash = (query, key, _sdpa_scale(query))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self._keep)


class CrossAttentionTapProcessor:
    """``AttnProcessor2_0`` for a block's attn2 that also forms the block's M_attn = M_saᵀ M_ca."""

    def __init__(self, tap: _BlockTap):
        self._tap = tap

    def _aggregate(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        tap = self._tap
        stash, tap.stash = tap.stash, None  # free the self-attention q/k whatever happens below
        if stash is None:
            raise RuntimeError(
                f"AttentionMaskRecorder: the cross-attention of block {tap.name!r} ran before its "
                "self-attention; the block does not call attn1 then attn2"
            )
        q_self, k_self, scale_self = stash
        # M_ca: per-head softmax over the N concept tokens (B, H, L, N), in fp32
        # because it is a probability map; then mean over heads and, as in
        # §3.3 ("we first normalize M_ca"), normalised over N.
        dtype = torch.promote_types(query.dtype, torch.float32)
        scores = (query.to(dtype) @ key.to(dtype).transpose(-1, -2)) * _sdpa_scale(query)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.to(dtype)
        m_ca = scores.softmax(dim=-1).mean(dim=1)
        m_ca = m_ca / m_ca.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(m_ca.dtype).tiny)
        aggregate = getattr(tap.recorder, "aggregate", None) or attn_mask_aggregate
        m_attn = aggregate(q_self, k_self, m_ca.to(q_self.dtype), scale_self)  # (B, L, N)
        if tap.recorded_in == tap.recorder._forward_id:
            # A second run of the block inside one U-Net forward: gradient
            # checkpointing recomputing it during the backward. The recomputation
            # must still compute the map (checkpoint checks that the same tensors
            # are saved again, and they feed the backward of the recorded map),
            # but the recorded map of this forward stays.
            return
        tap.recorder._record(tap, m_attn)
        tap.recorded_in = tap.recorder._forward_id

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return _sdpa_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               self._aggregate)


# ----------------------------------------------------------------------------- recorder
class AttentionMaskRecorder:
    """Records M_attn = M_saᵀ M_ca from chosen U-Net blocks and combines them into M_label.

    Args:
        unet: a ``diffusers.UNet2DConditionModel`` (any config; e.g. SD 1.x/2.x
            from ``UNet2DConditionModel.from_pretrained(local_dir, subfolder="unet")``).
        layers: transformer blocks to read, as 0-based indices into
            :func:`transformer_block_names` (negative counts from the end) and/or
            module-name prefixes (``"up_blocks.1.attentions.0.transformer_blocks.0"``,
            ``"up_blocks.3"``). Default: the paper's layers, see
            :func:`default_layer_indices` and the module docstring.
        aggregate: the function computing M_saᵀ M_ca from ``(q, k, m_ca, scale)``;
            default (None) the fused ``fastdense.ops.attn_mask_aggregate``. Pass
            ``fastdense.ops.reference.attn_mask_aggregate`` for the materialised
            reference (fidelity tests and memory baselines).

    The processors are installed on construction; ``remove()`` (or leaving a
    ``with`` block) puts the original processor objects back. After each
    U-Net forward, :meth:`label_map` gives M_label (B, N, H, W) and
    :attr:`maps` the per-block M_attn (B, N, h_l, w_l). A new forward replaces
    the maps; :meth:`reset` frees them (and their autograd graphs).
    """

    def __init__(self, unet: torch.nn.Module, layers: int | str | Sequence[int | str] | None = None,
                 aggregate: Callable | None = None):
        self.aggregate = aggregate
        blocks = _blocks_in_forward_order(unet)
        if not blocks:
            raise ValueError("unet has no transformer blocks (BasicTransformerBlock) to record from")
        self.unet = unet
        self.layers: list[str] = self._select(blocks, layers)
        self._blocks = dict(blocks)
        self._maps: dict[str, torch.Tensor] = {}
        self._grids: dict[str, tuple[int, int]] = {}
        self._taps: dict[str, _BlockTap] = {}
        self._originals: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_id = 0  # counts U-Net forward calls
        self.install()

    # ------------------------------------------------------------------ selection
    @staticmethod
    def _select(blocks, layers) -> list[str]:
        names = [n for n, _ in blocks]
        available = "; available (index: name): " + ", ".join(f"{i}: {n}" for i, n in enumerate(names))
        if layers is None:
            chosen = [names[i] for i in default_layer_indices(len(names))]
            chosen = [n for n in chosen if _eligibility_problem(dict(blocks)[n]) is None]
            if not chosen:
                raise ValueError("none of the default layers has a self- and a cross-attention" + available)
            return chosen
        if isinstance(layers, (int, str)):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty" + available)
        picked: set[str] = set()
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, str)):
                raise TypeError(f"layers entries must be int indices or str module names, got {layer!r}")
            if isinstance(layer, int):
                if not -len(names) <= layer < len(names):
                    raise ValueError(f"layer index {layer} out of range for {len(names)} transformer blocks"
                                     + available)
                picked.add(names[layer])
            else:
                prefix = layer.rstrip(".")
                hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
                if not hits:
                    raise ValueError(f"layer name {layer!r} matches no transformer block" + available)
                picked.update(hits)
        by_name = dict(blocks)
        for n in picked:
            problem = _eligibility_problem(by_name[n])
            if problem is not None:
                raise ValueError(f"layer {n!r} cannot be recorded: {problem}")
        return [n for n in names if n in picked]  # forward order, no duplicates

    # ------------------------------------------------------------------ install / remove
    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> "AttentionMaskRecorder":
        """Put the recording processors on the chosen blocks (done by the constructor)."""
        if self.installed:
            return self
        self._hooks.append(self.unet.register_forward_pre_hook(self._count_forward))
        parents: set[str] = set()
        for name in self.layers:
            block = self._blocks[name]
            # The block sees (B, L, C); its Transformer2DModel sees (B, C, h, w).
            parent = name.rsplit(".transformer_blocks.", 1)[0] if ".transformer_blocks." in name else None
            tap = _BlockTap(self, name, parent)
            self._taps[name] = tap
            for attn, proc in ((block.attn1, SelfAttentionTapProcessor(tap)),
                               (block.attn2, CrossAttentionTapProcessor(tap))):
                self._originals.append((attn, attn.processor))
                attn.set_processor(proc)
            if parent is not None and parent not in parents:
                parents.add(parent)
                self._hooks.append(self.unet.get_submodule(parent).register_forward_pre_hook(
                    self._grid_hook(parent), with_kwargs=True))
        return self

    def _count_forward(self, module, args) -> None:
        self._forward_id += 1
        # A recomputation that stopped between attn1 and attn2 (checkpoint's
        # early stop) can leave a stash behind; a new forward never needs it.
        for tap in self._taps.values():
            tap.stash = None

    def _grid_hook(self, key: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                self._grids[key] = (int(x.shape[-2]), int(x.shape[-1]))
        return hook

    def remove(self) -> None:
        """Restore the original processor objects; the recorded maps stay readable."""
        for attn, original in reversed(self._originals):
            attn.set_processor(original)
        self._originals.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for tap in self._taps.values():
            tap.stash = None
        self._taps.clear()

    def __enter__(self) -> "AttentionMaskRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ maps
    def _record(self, tap: _BlockTap, m_attn: torch.Tensor) -> None:
        b, length, n = m_attn.shape
        grid = self._grids.get(tap.grid_key) if tap.grid_key is not None else None
        if grid is None:
            side = math.isqrt(length)
            if side * side != length:
                raise RuntimeError(f"AttentionMaskRecorder: cannot tell the spatial grid of block "
                                   f"{tap.name!r} (L = {length} tokens)")
            grid = (side, side)
        h, w = grid
        if h * w != length:
            raise RuntimeError(f"AttentionMaskRecorder: block {tap.name!r} has L = {length} tokens but its "
                               f"input grid is {h}x{w}")
        # (B, L, N) -> (B, N, h, w); tokens are the row-major flattening of the grid.
        self._maps[tap.name] = m_attn.transpose(1, 2).reshape(b, n, h, w)

    def reset(self) -> None:
        """Drop the recorded maps (and the autograd graphs they hold)."""
        self._maps.clear()
        self._grids.clear()

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """Per-block M_attn = M_saᵀ M_ca as (B, N, h_l, w_l), keyed by block name, in forward order."""
        return {n: self._maps[n] for n in self.layers if n in self._maps}

    def label_map(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """M_label (B, N, H, W): the blocks' maps upsampled (bilinear) to ``size``, averaged, normalised over N.

        ``size`` defaults to the largest recorded grid. Raises RuntimeError when
        no forward has been recorded since construction or :meth:`reset`.
        """
        if not self._maps:
            raise RuntimeError("AttentionMaskRecorder.label_map: no maps recorded; run the U-Net forward "
                               "with the recorder installed first (after reset(), run it again)")
        missing = [n for n in self.layers if n not in self._maps]
        if missing:
            raise RuntimeError(f"AttentionMaskRecorder.label_map: no map recorded for {missing}; the last "
                               "forward did not run these blocks")
        maps = list(self.maps.values())
        b, n = maps[0].shape[:2]
        if any(m.shape[:2] != (b, n) for m in maps):
            shapes = {k: tuple(v.shape) for k, v in self.maps.items()}
            raise RuntimeError(f"AttentionMaskRecorder.label_map: maps come from different forwards "
                               f"(shapes {shapes}); call reset() between forwards")
        if size is None:
            size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
        size = _check_size(size)
        total = None
        for m in maps:
            m = m.to(torch.promote_types(m.dtype, torch.float32))
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            total = m if total is None else total + m
        mean = total / len(maps)
        return mean / mean.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)


def _check_size(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])
