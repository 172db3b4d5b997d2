"""Joint augmentations for dense-prediction samples (pure torch, no torchvision).

A *sample* is a dict as the loaders return it: ``"image"`` (3, H, W) float,
label tensors (H, W) or (C, H, W) under their task names, optionally a nested
dict of per-task masks (``"mask"``), and ``"meta"`` (passed through
untouched). Every transform maps a sample to a new sample, applying the same
geometry to the image and every label, so that they stay pixel-aligned.

How each tensor is resampled (``Resize``, ``RandomScale``):

* the image: bilinear (``align_corners=False``);
* discrete labels -- integer or bool tensors, and float tensors whose key is
  in ``nearest_keys`` (``semseg``, ``human_parts``, ``sal``, ``edge``, ...:
  binary maps stored as float for BCE losses) -- nearest neighbour with
  pixel-centre alignment (PIL's and ``nearest-exact``'s rule), done by
  indexing so that every dtype is kept bit-exact;
* continuous labels (normals, depth, ...): bilinear, *ignore-aware*: pixels
  holding the ignore value (in any channel) take no part; an output pixel is
  the weighted mean of its valid neighbours and is itself ignored when less
  than half of its interpolation weight is valid. Plain bilinear would blend
  255 into real normals or depths at the border of every ignored region.

Padding (``RandomCrop`` on a smaller image, ``PadTo``) fills labels with their
ignore value (255 by default, the value every community metric skips; bool
masks with False) and the image with the ImageNet mean, which ``Normalize``
maps to 0.

Randomness: every random transform takes ``generator=`` (a
``torch.Generator``) and draws from it alone, in a fixed order, so a seeded
generator gives the same augmentation on every machine; ``None`` uses
torch's global generator.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

#: Keys resampled with nearest neighbour even when stored as float: binary or
#: class maps whose in-between values would be meaningless (MTI-Net resizes
#: edges and saliency with nearest too).
NEAREST_KEYS = frozenset({"semseg", "segment_semantic", "human_parts", "parts", "sal", "saliency", "edge"})

#: How surface normals are stored, per key, which decides what a horizontal
#: flip does to their x component: ``"signed"`` vectors in [-1, 1] (PASCAL,
#: NYUD, the synthetic scenes) are negated, ``"unit01"`` vectors encoded as
#: ``(n + 1) / 2`` (Taskonomy) become ``1 - x``.
NORMAL_KEYS = {"normals": "signed", "normal": "signed"}

_PASSTHROUGH = ("meta",)


def _size2(size) -> tuple:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _spatial(sample: Mapping) -> tuple:
    if "image" in sample:
        return tuple(sample["image"].shape[-2:])
    for _k, v in sample.items():
        if isinstance(v, Tensor) and v.dim() >= 2:
            return tuple(v.shape[-2:])
    raise ValueError("sample has no image or label tensor to take the size from")


def _map(sample: Mapping, fn) -> dict:
    """Apply ``fn(key, tensor)`` to every tensor except those under ``meta``;
    nested dicts (per-task masks) are mapped with their inner keys."""
    out = {}
    for k, v in sample.items():
        if k in _PASSTHROUGH:
            out[k] = v
        elif isinstance(v, Tensor):
            out[k] = fn(k, v) if v.dim() >= 2 else v
        elif isinstance(v, Mapping):
            out[k] = _map(v, fn)
        else:
            out[k] = v
    return out


def _as4d(t: Tensor) -> tuple:
    """(H, W) or (C, H, W) -> (1, C, H, W), and the function undoing it."""
    if t.dim() == 2:
        return t[None, None], lambda x: x[0, 0]
    if t.dim() == 3:
        return t[None], lambda x: x[0]
    raise ValueError(f"expected a (H, W) or (C, H, W) tensor, got shape {tuple(t.shape)}")


def _nearest_index(n_in: int, n_out: int, device) -> Tensor:
    # Pixel-centre alignment: output pixel j covers input coordinate
    # (j + 0.5) * n_in / n_out - 0.5; its nearest input pixel is the floor of
    # (j + 0.5) * n_in / n_out. Integer arithmetic keeps this exact.
    j = torch.arange(n_out, device=device, dtype=torch.int64)
    return ((2 * j + 1) * n_in // (2 * n_out)).clamp_(max=n_in - 1)


def resize_nearest(t: Tensor, size) -> Tensor:
    """Nearest-neighbour resize of a (..., H, W) tensor of any dtype (values copied, never mixed)."""
    h, w = _size2(size)
    iy = _nearest_index(t.shape[-2], h, t.device)
    ix = _nearest_index(t.shape[-1], w, t.device)
    return t.index_select(-2, iy).index_select(-1, ix)


def resize_bilinear(t: Tensor, size, ignore_value: Optional[float] = None) -> Tensor:
    """Bilinear resize of a float (H, W) or (C, H, W) tensor; ignore-aware when
    ``ignore_value`` is given (see the module docstring)."""
    h, w = _size2(size)
    x, undo = _as4d(t)
    if tuple(x.shape[-2:]) == (h, w):
        return t.clone()
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    if ignore_value is None:
        return undo(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    invalid = (x == ignore_value).any(1, keepdim=True)
    if not bool(invalid.any()):
        return undo(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    valid = (~invalid).to(dtype)
    num = F.interpolate(x * valid, size=(h, w), mode="bilinear", align_corners=False)
    den = F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)
    keep = den >= 0.5
    out = torch.where(keep, num / den.clamp(min=1e-12), torch.full_like(num, float(ignore_value)))
    return undo(out)


class JointTransform:
    """Base class: ``transform(sample, generator=None) -> sample``."""

    def __call__(self, sample: Mapping, generator: Optional[torch.Generator] = None) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _Resampling(JointTransform):
    """Shared rules for which tensors are resampled how and padded with what."""

    def __init__(self, nearest_keys=NEAREST_KEYS, ignore: Optional[Mapping[str, float]] = None,
                 default_ignore: float = IGNORE_INDEX, image_fill: Sequence[float] = IMAGENET_MEAN) -> None:
        self.nearest_keys = frozenset(nearest_keys)
        self.ignore = dict(ignore or {})
        self.default_ignore = default_ignore
        self.image_fill = tuple(float(v) for v in image_fill)

    def _is_nearest(self, key: str, t: Tensor) -> bool:
        return not t.is_floating_point() or key in self.nearest_keys

    def _ignore_for(self, key: str) -> float:
        return self.ignore.get(key, self.default_ignore)

    def _resize(self, key: str, t: Tensor, size) -> Tensor:
        if key == "image":
            return resize_bilinear(t, size)
        if self._is_nearest(key, t):
            return resize_nearest(t, size)
        return resize_bilinear(t, size, self._ignore_for(key))

    def _pad(self, key: str, t: Tensor, h: int, w: int) -> Tensor:
        """Pad (..., H, W) at the bottom and right to (h, w)."""
        H, W = t.shape[-2:]
        if H >= h and W >= w:
            return t
        shape = (*t.shape[:-2], max(h, H), max(w, W))
        if key == "image":
            fill = torch.tensor(self.image_fill, dtype=t.dtype, device=t.device)
            if t.dim() != 3 or t.shape[0] != fill.numel():
                raise ValueError(f"image must be ({fill.numel()}, H, W) to pad, got {tuple(t.shape)}")
            out = fill.view(-1, 1, 1).expand(shape).clone()
        elif t.dtype == torch.bool:
            out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        else:
            out = torch.full(shape, self._ignore_for(key), dtype=t.dtype, device=t.device)
        out[..., :H, :W] = t
        return out


class Compose(JointTransform):
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample, generator=None):
        for t in self.transforms:
            sample = t(sample, generator=generator)
        return sample


class RandomHorizontalFlip(JointTransform):
    """Mirror the image and every label left-right with probability ``p``.

    Mirroring reverses the image x axis, so the x component of every surface
    normal changes sign (see :data:`NORMAL_KEYS` for the encodings); pixels
    holding the ignore value are left as they are.
    """

    def __init__(self, p: float = 0.5, normals: Optional[Mapping[str, str]] = None,
                 ignore_value: float = IGNORE_INDEX) -> None:
        self.p = float(p)
        self.normals = dict(NORMAL_KEYS if normals is None else normals)
        for k, enc in self.normals.items():
            if enc not in ("signed", "unit01"):
                raise ValueError(f"normal encoding of {k!r} must be 'signed' or 'unit01', got {enc!r}")
        self.ignore_value = ignore_value

    def __call__(self, sample, generator=None):
        # Always draw, so that the number of draws (and every later transform's
        # randomness) does not depend on p.
        flip = bool(torch.rand((), generator=generator) < self.p)
        if not flip:
            return dict(sample)
        return _map(sample, self._flip)

    def _flip(self, key: str, t: Tensor) -> Tensor:
        out = t.flip(-1)
        enc = self.normals.get(key)
        if enc is not None and t.dim() == 3 and t.shape[0] == 3:
            out = out.clone()
            valid = ~(out == self.ignore_value).any(0)
            x = out[0]
            out[0] = torch.where(valid, -x if enc == "signed" else 1 - x, x)
        return out


class Resize(_Resampling):
    """Resize every tensor to ``size`` (int or (H, W))."""

    def __init__(self, size, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = _size2(size)

    def __call__(self, sample, generator=None):
        return _map(sample, lambda k, t: self._resize(k, t, self.size))


class RandomScale(_Resampling):
    """Rescale by a factor drawn uniformly from ``scales = (lo, hi)``; the new
    size is ``round(H * s), round(W * s)``."""

    def __init__(self, scales=(0.75, 1.25), **kwargs) -> None:
        super().__init__(**kwargs)
        lo, hi = (float(s) for s in scales)
        if not 0 < lo <= hi:
            raise ValueError(f"scales must be (lo, hi) with 0 < lo <= hi, got {scales}")
        self.scales = (lo, hi)

    def __call__(self, sample, generator=None):
        lo, hi = self.scales
        s = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
        H, W = _spatial(sample)
        size = (max(1, int(round(H * s))), max(1, int(round(W * s))))
        return _map(sample, lambda k, t: self._resize(k, t, size))


class PadTo(_Resampling):
    """Pad at the bottom and right to at least ``size`` (labels with their
    ignore value), as the community evaluates PASCAL at a fixed padded size."""

    def __init__(self, size, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = _size2(size)

    def __call__(self, sample, generator=None):
        h, w = self.size
        return _map(sample, lambda k, t: self._pad(k, t, h, w))


class _Crop(_Resampling):
    """Crop ``size`` at the offset ``_offset`` picks; a smaller sample is first
    padded at the bottom and right (labels with their ignore value)."""

    def __init__(self, size, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = _size2(size)

    def _offset(self, H, W, generator):
        raise NotImplementedError

    def __call__(self, sample, generator=None):
        h, w = self.size
        sample = _map(sample, lambda k, t: self._pad(k, t, h, w))
        top, left = self._offset(*_spatial(sample), generator)
        return _map(sample, lambda k, t: t[..., top:top + h, left:left + w])


class RandomCrop(_Crop):
    """Crop ``size``, padding first if smaller. The offset is uniform over all
    crops that fit: rows in ``[0, H - h]``, columns in ``[0, W - w]``."""

    def _offset(self, H, W, generator):
        h, w = self.size
        top = int(torch.randint(0, H - h + 1, (), generator=generator))
        left = int(torch.randint(0, W - w + 1, (), generator=generator))
        return top, left


class CenterCrop(_Crop):
    """Crop ``size`` from the centre, offset ``(H - h) // 2`` (VTM's test-time crop)."""

    def _offset(self, H, W, generator):
        h, w = self.size
        return (H - h) // 2, (W - w) // 2


class Normalize(JointTransform):
    """``(image - mean) / std`` per channel (ImageNet statistics by default); labels untouched."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def __call__(self, sample, generator=None):
        out = dict(sample)
        img = sample["image"]
        mean = torch.tensor(self.mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        out["image"] = (img - mean) / std
        return out


def train_transforms(size=448, scales=(0.75, 1.25), flip_p: float = 0.5,
                     normals: Optional[Mapping[str, str]] = None, **kwargs) -> Compose:
    """Flip, random scale, random crop (padded) to ``size``, ImageNet normalisation.

    ``size`` 448 for Swin-T at 448 (MTLoRA/TADFormer PASCAL), 224 for VTM-style
    few-shot training; ``kwargs`` (``nearest_keys``, ``ignore``, ...) go to the
    resampling transforms.
    """
    return Compose([RandomHorizontalFlip(flip_p, normals=normals), RandomScale(scales, **kwargs),
                    RandomCrop(size, **kwargs), Normalize()])


def eval_transforms(size=448, mode: str = "resize", **kwargs) -> Compose:
    """Deterministic evaluation preprocessing: ``mode="resize"`` to ``size`` or
    ``mode="pad"`` (bottom/right, labels with their ignore value), then
    ImageNet normalisation."""
    if mode == "resize":
        first = Resize(size, **kwargs)
    elif mode == "pad":
        first = PadTo(size, **kwargs)
    else:
        raise ValueError(f"mode must be 'resize' or 'pad', got {mode!r}")
    return Compose([first, Normalize()])


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IGNORE_INDEX", "NEAREST_KEYS", "NORMAL_KEYS",
    "JointTransform", "Compose", "RandomHorizontalFlip", "Resize", "RandomScale", "PadTo",
    "RandomCrop", "CenterCrop", "Normalize", "train_transforms", "eval_transforms",
    "resize_nearest", "resize_bilinear",
]
