"""Taskonomy-tiny as Visual Token Matching (VTM) prepares it for few-shot
dense prediction. See :class:`TaskonomyTiny`.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _io
from .transforms import resize_bilinear, resize_nearest

#: VTM's ten Taskonomy tasks (its "task groups"), in VTM's order. They are
#: also the folder names under the root.
TASKONOMY_TASKS = ("segment_semantic", "normal", "depth_euclidean", "depth_zbuffer", "edge_texture",
                   "edge_occlusion", "keypoints2d", "keypoints3d", "reshading", "principal_curvature")

#: VTM's 5 folds, given by their *test* task pairs: fold i meta-trains on the
#: other 8 tasks and tests on ``TASKONOMY_FOLDS[i]``. (VTM cuts its task list
#: into consecutive pairs from the end, so fold 0 is the last pair.)
TASKONOMY_FOLDS = (
    ("reshading", "principal_curvature"),
    ("keypoints2d", "keypoints3d"),
    ("edge_texture", "edge_occlusion"),
    ("depth_euclidean", "depth_zbuffer"),
    ("segment_semantic", "normal"),
)

#: VTM's building splits of Taskonomy-tiny.
BUILDINGS_TRAIN = ("allensville", "beechwood", "benevolence", "coffeen", "cosmos", "forkland", "hanson",
                   "hiteman", "klickitat", "lakeville", "leonardo", "lindenwood", "marstons", "merom",
                   "mifflinburg", "newfields", "onaga", "pinesdale", "pomaria", "ranchester", "shelbyville",
                   "stockman", "tolstoy", "wainscott", "woodbine")
BUILDINGS_VAL = ("collierville", "corozal", "darden", "markleeville", "wiconisco")
BUILDINGS_TEST = ("ihlen", "mcdade", "muleshoe", "noxapater", "uvalda")
BUILDING_SPLITS = {"train": BUILDINGS_TRAIN, "val": BUILDINGS_VAL, "test": BUILDINGS_TEST}

#: Semantic classes (after the loader's relabelling) that VTM turns into
#: binary segmentation tasks, one per class; the others count as background.
SEMSEG_CLASSES = (2, 3, 4, 5, 6, 8, 9, 10, 12, 13, 15, 16)
NUM_SEMSEG_LABELS = 17  # 0 background/unlabelled, 1..16

DEPTH_VALID_BELOW = 64500  # raw depth_euclidean >= this is "no depth" (sky, holes)
_U16 = 2.0 ** 16

# Tasks stored as 16-bit PNGs (raw values) and their accepted channel counts.
_SIXTEEN_BIT = frozenset({"depth_euclidean", "depth_zbuffer", "edge_texture", "edge_occlusion",
                          "keypoints2d", "keypoints3d"})
_CHANNELS = {"segment_semantic": (1,), "normal": (3,), "reshading": (1, 3), "principal_curvature": (3,)}
# Tasks whose label is masked where depth is missing (VTM's choice).
_DEPTH_MASKED = frozenset({"depth_euclidean", "depth_zbuffer", "edge_occlusion", "keypoints3d",
                           "principal_curvature"})
_FILE_TAG = {"segment_semantic": "segmentsemantic"}


def label_name(task: str, rgb_name: str) -> str:
    """The label file name of ``task`` for the image ``rgb_name``: the last
    ``rgb`` in the name replaced by the task's tag (``segmentsemantic`` for
    ``segment_semantic``, else the task name), e.g.
    ``allensville_point_0_view_1_domain_rgb.png`` ->
    ``allensville_point_0_view_1_domain_normal.png``."""
    tag = _FILE_TAG.get(task, task)
    i = rgb_name.rfind("rgb")
    if i < 0:
        raise ValueError(f"image file name {rgb_name!r} has no 'rgb' to replace")
    return rgb_name[:i] + tag + rgb_name[i + 3:]


def decode_label(task: str, raw: np.ndarray, depth_raw: Optional[np.ndarray] = None):
    """VTM's label encoding of one task, from the raw PNG values.

    Returns ``(label, mask)``: ``label`` a (C, H, W) float32 array (int64
    (H, W) for segment_semantic), ``mask`` a (1, H, W) bool array.

    * segment_semantic: raw ``v`` -> ``max(v, 1) - 1``: 0 and 1 (unlabelled,
      background) merge into 0, classes 2..17 become 1..16.
    * normal: ``v / 255`` clipped to [0, 1] (vectors stay ``(n + 1) / 2``
      encoded), 3 channels.
    * depth_euclidean, depth_zbuffer: ``log(1 + d) / log(2^16)`` of the raw
      16-bit depth.
    * edge_texture, edge_occlusion, keypoints3d: ``v / 2^16``.
    * keypoints2d: ``v / 2^16``, then, as VTM does, clipped to [0, 0.005] and
      divided by 0.005 (the raw responses are tiny; without this the label is
      nearly all 0).
    * reshading: first channel, ``v / 255``.
    * principal_curvature: first 2 channels, ``v / 255``.

    The mask is ``depth_euclidean < 64500`` (raw) for depth_euclidean,
    depth_zbuffer, edge_occlusion, keypoints3d and principal_curvature, all
    true otherwise. Every continuous label is finally clipped to [0, 1] (VTM
    does this for every task).
    """
    if raw.ndim == 2:
        raw = raw[:, :, None]
    H, W = raw.shape[:2]
    if task == "segment_semantic":
        v = raw[:, :, 0].astype(np.int64)
        return np.maximum(v, 1) - 1, np.ones((1, H, W), dtype=bool)
    x = raw.astype(np.float64)
    if task in _SIXTEEN_BIT:
        if task.startswith("depth"):
            x = np.log1p(x) / np.log(_U16)
        else:
            x = x / _U16
            if task == "keypoints2d":
                x = np.clip(x, 0.0, 0.005) / 0.005
    else:
        x = x / 255.0
        if task == "reshading":
            x = x[:, :, :1]
        elif task == "principal_curvature":
            x = x[:, :, :2]
    label = np.clip(x, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1)
    if task in _DEPTH_MASKED:
        if depth_raw is None:
            raise ValueError(f"{task} needs the raw depth_euclidean map for its mask")
        mask = (np.asarray(depth_raw).reshape(H, W) < DEPTH_VALID_BELOW)[None]
    else:
        mask = np.ones((1, H, W), dtype=bool)
    return np.ascontiguousarray(label), mask


class TaskonomyTiny(Dataset):
    """Taskonomy-tiny in VTM's merged layout, with VTM's label encodings.

    Layout: ``<root>/<task>/<building>_<file>``, one folder per task plus
    ``rgb`` for the images, all files 256 x 256 after VTM's
    ``resize_buildings.py``; the label of ``rgb/<name>`` is
    ``<task>/<label_name(task, name)>`` (``...domain_rgb.png`` ->
    ``...domain_<task>.png``, ``segmentsemantic`` for segment_semantic).
    Depth, edges and keypoints are 16-bit PNGs, the rest 8-bit.

    Tasks (:data:`TASKONOMY_TASKS`, VTM's names): segment_semantic, normal,
    depth_euclidean, depth_zbuffer, edge_texture, edge_occlusion,
    keypoints2d, keypoints3d, reshading, principal_curvature. Encodings:
    :func:`decode_label`. Folds for few-shot evaluation:
    :data:`TASKONOMY_FOLDS` (test pairs reshading + curvature, keypoints 2D +
    3D, texture + occlusion edges, euclidean + z-buffer depth, semseg +
    normal), usable with :class:`~fastdense.data.EpisodeSampler`.

    Differences from VTM, by choice: VTM computes edge_texture labels from the
    image with Sobel filters whose parameters ship with its code; here they
    are read from ``edge_texture/`` like every other task. VTM further splits
    tasks into channels (semseg per class in :data:`SEMSEG_CLASSES`, depth
    into quantile bands): that belongs to the episode construction of a
    model, not to the loader, which returns whole labels.

    Args:
        root: the merged folder (VTM's ``tiny_256_merged``).
        tasks: task names (default all ten).
        split: ``"train"``/``"val"``/``"test"``: VTM's building lists
            (:data:`BUILDING_SPLITS`); buildings of the list that are absent
            are skipped with a warning (listed in ``missing_buildings``),
            none present is an error. Or
        buildings: explicit building names, each must be present. Neither:
            every building present.
        base_size: images and labels are resized to this first (bilinear;
            nearest for semseg and masks) when not already that size.
        crop_size: then cropped to this, ``"center"`` (offset
            ``(256 - 224) // 2``, VTM at test time) or ``"random"``.
        crop: ``"center"`` or ``"random"``.
        seed: with ``crop="random"``, makes the crop of sample i a function of
            ``(seed, i, epoch)`` (see :meth:`set_epoch`); None draws from
            torch's global generator.
        transform: applied to the finished sample.

    Sample::

        image    (3, 224, 224) float32 RGB in [0, 1]
        <task>   (C, 224, 224) float32 in [0, 1] (C = 3 normal, 2 curvature,
                 1 otherwise); segment_semantic (224, 224) int64 in 0..16
        mask     {task: (1, 224, 224) bool}, true where the label counts
        meta     {"name": rgb file name, "building": str, "size": int64 (H, W) on disk}
    """

    TASKS = TASKONOMY_TASKS

    def __init__(self, root, tasks: Optional[Iterable[str]] = None, split: Optional[str] = None,
                 buildings: Optional[Sequence[str]] = None, base_size: int = 256, crop_size: int = 224,
                 crop: str = "center", seed: Optional[int] = None, transform=None) -> None:
        self.root = _io.require_dir(root, "Taskonomy-tiny root")
        self.tasks = _io.check_tasks(self.TASKS if tasks is None else tasks, self.TASKS, "Taskonomy")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if crop_size > base_size:
            raise ValueError(f"crop_size {crop_size} is larger than base_size {base_size}")
        self.base_size, self.crop_size, self.crop = int(base_size), int(crop_size), crop
        self.seed, self.epoch, self.transform = seed, 0, transform

        rgb = _io.require_dir(self.root / "rgb", "Taskonomy image folder")
        names = sorted(_io.stems_in(rgb, ".png"))
        names = [n + ".png" for n in names]
        present = sorted({n.split("_", 1)[0] for n in names})
        if split is not None and buildings is not None:
            raise ValueError("give split or buildings, not both")
        if split is not None:
            _io.check_split(split, tuple(BUILDING_SPLITS), "Taskonomy")
            wanted = BUILDING_SPLITS[split]
        elif buildings is not None:
            wanted = (buildings,) if isinstance(buildings, str) else tuple(buildings)
        else:
            wanted = present
        absent = [b for b in wanted if b not in present]
        self.missing_buildings = tuple(absent)
        if absent and (buildings is not None or len(absent) == len(wanted)):
            raise _io.DatasetNotFoundError(f"no images of building(s) {absent} in {rgb} "
                                           f"(found buildings {present})", rgb / f"{absent[0]}_*")
        if absent:
            # A split on a partial download still loads, but the numbers it
            # gives are not comparable with the full split's: say so.
            warnings.warn(f"Taskonomy split {split!r}: no images of building(s) {absent} in {rgb}; "
                          f"using the {len(wanted) - len(absent)} present", stacklevel=2)
        keep = set(wanted)
        self.files = [n for n in names if n.split("_", 1)[0] in keep]
        if not self.files:
            raise _io.DatasetNotFoundError(f"no images in {rgb} (expected <building>_<file>_rgb.png)", rgb)

        needed = set(self.tasks)
        if needed & _DEPTH_MASKED:
            needed.add("depth_euclidean")  # the validity mask comes from it
        for task in sorted(needed):
            folder = _io.require_dir(self.root / task, f"Taskonomy {task} folder")
            on_disk = set(_io.stems_in(folder, ".png"))
            _io.report_missing((folder / label_name(task, n) for n in self.files
                                if label_name(task, n)[:-4] not in on_disk), f"Taskonomy {task} label(s)")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops of a seeded dataset from one epoch to the next."""
        self.epoch = int(epoch)

    def _offsets(self, index: int) -> tuple:
        span = self.base_size - self.crop_size
        if self.crop == "center":
            return span // 2, span // 2
        g = None
        if self.seed is not None:
            key = f"{self.seed}:{index}:{self.epoch}".encode()
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        top = int(torch.randint(0, span + 1, (), generator=g))
        left = int(torch.randint(0, span + 1, (), generator=g))
        return top, left

    def _fit(self, t: torch.Tensor, nearest: bool) -> torch.Tensor:
        size = (self.base_size, self.base_size)
        if tuple(t.shape[-2:]) != size:
            t = resize_nearest(t, size) if nearest else resize_bilinear(t, size)
        return t

    def __getitem__(self, index: int) -> dict:
        name = self.files[index]
        image = _io.read_rgb(self.root / "rgb" / name, "Taskonomy image")
        hw = tuple(image.shape[-2:])
        sample = {"image": self._fit(image, nearest=False)}
        masks = {}
        depth_raw = None
        if set(self.tasks) & _DEPTH_MASKED:
            depth_raw = self._read("depth_euclidean", name, hw)
        for task in self.tasks:
            raw = depth_raw if task == "depth_euclidean" else self._read(task, name, hw)
            label, mask = decode_label(task, raw, depth_raw)
            sample[task] = self._fit(torch.from_numpy(label), nearest=task == "segment_semantic")
            masks[task] = self._fit(torch.from_numpy(mask), nearest=True)
        top, left = self._offsets(index)
        c = self.crop_size
        sample = {k: v[..., top:top + c, left:left + c] for k, v in sample.items()}
        sample["mask"] = {k: v[..., top:top + c, left:left + c] for k, v in masks.items()}
        sample["meta"] = {"name": name, "building": name.split("_", 1)[0],
                          "size": torch.tensor(hw, dtype=torch.int64)}
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _read(self, task: str, name: str, hw) -> np.ndarray:
        path = self.root / task / label_name(task, name)
        if task in _SIXTEEN_BIT:
            raw = _io.read_png(path, f"Taskonomy {task} label", channels=(1,), bits=16)
        else:
            raw = _io.read_png(path, f"Taskonomy {task} label", channels=_CHANNELS[task], bits=8)
        if tuple(raw.shape[:2]) != tuple(hw):
            raise _io.CorruptFileError(f"Taskonomy {task} label {path} is {raw.shape[0]}x{raw.shape[1]}; "
                                       f"expected the image size {hw[0]}x{hw[1]}", path)
        return raw

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, tasks={list(self.tasks)}, n={len(self)}, "
                f"crop={self.crop!r})")


__all__ = ["TaskonomyTiny", "TASKONOMY_TASKS", "TASKONOMY_FOLDS", "BUILDING_SPLITS", "SEMSEG_CLASSES",
           "decode_label", "label_name"]
