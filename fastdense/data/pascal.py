"""PASCAL-Context multi-task (the ``PASCAL_MT`` folder of MTI-Net, ATRC, MTLoRA).

See :class:`PascalContextMT`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _io
from .transforms import IGNORE_INDEX, resize_bilinear, resize_nearest

#: Pascal-Part part names of a person -> the 6 groups of the multi-task
#: benchmark (0 is background): 1 head, 2 torso, 3 upper arms, 4 lower arms
#: and hands, 5 upper legs, 6 lower legs and feet. Hair, eyes, ears, brows,
#: nose and mouth belong to the head, the neck to the torso.
PERSON_PART_GROUPS = {
    "head": 1, "hair": 1, "leye": 1, "reye": 1, "lear": 1, "rear": 1, "lebrow": 1, "rebrow": 1,
    "nose": 1, "mouth": 1,
    "torso": 2, "neck": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
PERSON_CLASS = 15  # "person" in the 20 VOC object classes, as Pascal-Part numbers them


def _field(record, name: str, path: Path):
    """Field ``name`` of a loadmat struct record, or CorruptFileError."""
    try:
        return record[name]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _io.CorruptFileError(f"human-parts file {path}: struct has no field {name!r} "
                                   f"(expected Pascal-Part 'anno' with objects(class_ind, mask, "
                                   f"parts(part_name, mask)))",
                                   path) from None


def _records(arr) -> list:
    """The elements of a loadmat struct array (any shape; empty -> [])."""
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        # An empty field ([] in MATLAB) loads as an empty double array.
        if arr.size == 0:
            return []
        # A cell array of structs loads as an object array of record arrays.
        out = []
        for cell in arr.ravel():
            out.extend(_records(cell))
        return out
    return list(arr.ravel())


def _scalar(x) -> object:
    a = np.asarray(x).ravel()
    if a.size != 1:
        raise ValueError(f"expected a scalar, got shape {np.asarray(x).shape}")
    return a[0]


def decode_human_parts(anno, shape, path: Path = Path("<anno>")) -> np.ndarray:
    """Decode a Pascal-Part ``anno`` struct (as ``scipy.io.loadmat`` returns it)
    into a (H, W) uint8 map: 0 background, 1..6 part groups
    (:data:`PERSON_PART_GROUPS`), 255 when the image has no annotated person.

    The struct is ``anno.objects(k)`` with fields ``class_ind`` (the VOC class,
    15 = person), ``mask`` (the instance mask) and ``parts(j)`` with
    ``part_name`` and ``mask``. Only persons with a non-empty instance mask
    and at least one part count (MTI-Net's ``area_thres = 0`` and
    ``has_parts``); their part masks are painted in order, so a later part or
    person overwrites an earlier one where masks overlap, as in the
    community's loader. An image whose persons are all unannotated is all 255
    (ignored), not all background: "no person" is unknown, not a labelled
    negative (MTI-Net's ``AddIgnoreRegions``).
    """
    try:
        objects = _records(_field(_scalar(anno), "objects", path))
    except ValueError as e:
        raise _io.CorruptFileError(f"human-parts file {path}: malformed 'anno' struct ({e})", path) from e
    target = None
    for obj in objects:
        try:
            cls = int(_scalar(_field(obj, "class_ind", path)))
        except (ValueError, TypeError) as e:
            raise _io.CorruptFileError(f"human-parts file {path}: bad class_ind ({e})", path) from e
        parts = _records(_field(obj, "parts", path))
        inst = np.asarray(_field(obj, "mask", path))
        if cls != PERSON_CLASS or not parts or inst.size == 0 or not inst.any():
            continue
        if target is None:
            target = np.zeros(shape, dtype=np.uint8)
        for part in parts:
            name = str(_scalar(_field(part, "part_name", path)))
            if name not in PERSON_PART_GROUPS:
                raise _io.CorruptFileError(f"human-parts file {path}: unknown person part {name!r}; "
                                           f"expected one of {sorted(PERSON_PART_GROUPS)}", path)
            mask = np.asarray(_field(part, "mask", path)).astype(bool)
            if mask.shape != tuple(shape):
                raise _io.CorruptFileError(f"human-parts file {path}: part mask of shape {mask.shape} "
                                           f"does not match the image {tuple(shape)}", path)
            target[mask] = PERSON_PART_GROUPS[name]
    if target is None or not target.any():
        return np.full(shape, IGNORE_INDEX, dtype=np.uint8)
    return target


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundaries of a region map, float32 {0, 1}.

    A pixel is marked when its label differs from its right or its lower
    neighbour, so each boundary between two regions is drawn once, on the
    upper/left side (a 4-connected line; nothing is compared across the image
    border). The community derives PASCAL-Context edges with OpenCV's
    Laplacian (nonzero on *both* sides of a boundary) followed by
    scikit-image's morphological thinning; this gives the same 1-pixel
    boundaries up to which of the two sides carries them, without either
    dependency. Edge metrics match with a pixel tolerance, which absorbs that
    one-pixel shift.
    """
    lm = np.asarray(label_map)
    edge = np.zeros(lm.shape, dtype=bool)
    edge[:, :-1] |= lm[:, :-1] != lm[:, 1:]
    edge[:-1, :] |= lm[:-1, :] != lm[1:, :]
    return edge.astype(np.float32)


class PascalContextMT(Dataset):
    """PASCAL-Context for multi-task learning, read from the community's
    ``PASCAL_MT`` folder (4,998 train / 5,105 val images).

    Layout under ``root``::

        JPEGImages/<id>.jpg
        ImageSets/Context/{train,val}.txt          one id a line
        semseg/VOC12/<id>.png                       else semseg/pascal-context/<id>.png
        human_parts/<id>.mat                        Pascal-Part 'anno' struct
        pascal-context/trainval/<id>.mat            'LabelMap' (edges; normals masking)
        normals_distill/<id>.png                    RGB, n = 2 v / 255 - 1
        sal_distill/<id>.png                        grey, salient where v / 255 > 0.5

    Args:
        root: the ``PASCAL_MT`` folder.
        split: ``"train"`` or ``"val"``.
        tasks: any of :attr:`TASKS`.
        transform: called as ``transform(sample)`` (e.g. a
            :mod:`fastdense.data.transforms` pipeline).
        normals_valid_classes: optional LabelMap class ids on which the
            distilled normals count. MTI-Net keeps normals only on the
            PASCAL-Context classes that also exist in NYUD (the teacher's
            training set); that list comes from class-name files outside this
            layout, so by default every pixel is kept. Pixels outside the
            given classes become 255 (ignored).

    Every file of the split is checked at construction; a missing one raises
    :class:`~fastdense.data._io.DatasetNotFoundError` naming it.

    Sample (``H, W`` the image size)::

        image        (3, H, W) float32 RGB in [0, 1]
        semseg       (H, W) int64, 21 classes 0..20, 255 ignore
        human_parts  (H, W) int64, 0 background, 1..6 parts (see
                     :data:`PERSON_PART_GROUPS`); all 255 without annotated persons
        sal          (H, W) float32 in {0, 1}
        normals      (3, H, W) float32, 2 v / 255 - 1 per channel (x, y, z);
                     pixels of zero norm (only after class masking) are 255
        edge         (H, W) float32 in {0, 1} (see :func:`label_boundaries`)
        meta         {"name": id, "size": int64 tensor (H, W)}

    A label whose size differs from the image's is resized to it (nearest;
    bilinear for normals), as the community loader does.
    """

    TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
    SPLITS = ("train", "val")
    NUM_SEMSEG_CLASSES = 21
    NUM_HUMAN_PARTS = 7  # background + 6

    def __init__(self, root, split: str = "train", tasks: Iterable[str] = TASKS, transform=None,
                 normals_valid_classes: Optional[Iterable[int]] = None) -> None:
        self.root = _io.require_dir(root, "PASCAL-Context (PASCAL_MT) root")
        self.split = _io.check_split(split, self.SPLITS, "PASCAL-Context")
        self.tasks = _io.check_tasks(tasks, self.TASKS, "PASCAL-Context")
        self.transform = transform
        self.normals_valid_classes = (None if normals_valid_classes is None
                                      else np.array(sorted({int(c) for c in normals_valid_classes})))
        self.ids = _io.read_split_file(self.root / "ImageSets" / "Context" / f"{split}.txt")
        self._check_files()

    # --- paths ------------------------------------------------------------------
    def _check_files(self) -> None:
        r = self.root
        folders = {"image": (r / "JPEGImages", ".jpg", "image folder")}
        if "human_parts" in self.tasks:
            folders["human_parts"] = (r / "human_parts", ".mat", "human-parts folder")
        if "sal" in self.tasks:
            folders["sal"] = (r / "sal_distill", ".png", "saliency folder")
        if "normals" in self.tasks:
            folders["normals"] = (r / "normals_distill", ".png", "normals folder")
        if "edge" in self.tasks or ("normals" in self.tasks and self.normals_valid_classes is not None):
            folders["labelmap"] = (r / "pascal-context" / "trainval", ".mat", "PASCAL-Context LabelMap folder")
        for _key, (folder, ext, what) in folders.items():
            present = _io.stems_in(_io.require_dir(folder, what), ext)
            _io.report_missing((folder / f"{i}{ext}" for i in self.ids if i not in present),
                               f"{what[:-len(' folder')]} file(s) of split {self.split!r}")
        self._semseg_paths = None
        if "semseg" in self.tasks:
            voc, ctx = r / "semseg" / "VOC12", r / "semseg" / "pascal-context"
            if not voc.is_dir() and not ctx.is_dir():
                raise _io.DatasetNotFoundError(f"semseg folder not found: expected {voc} and/or {ctx}", voc)
            in_voc = _io.stems_in(voc, ".png") if voc.is_dir() else set()
            in_ctx = _io.stems_in(ctx, ".png") if ctx.is_dir() else set()
            paths, missing = [], []
            for i in self.ids:
                if i in in_voc:
                    paths.append(voc / f"{i}.png")
                elif i in in_ctx:
                    paths.append(ctx / f"{i}.png")
                else:
                    paths.append(None)
                    missing.append(ctx / f"{i}.png")
            _io.report_missing(missing, f"semseg file(s) of split {self.split!r} (looked in {voc} first)")
            self._semseg_paths = paths

    def __len__(self) -> int:
        return len(self.ids)

    # --- loading ----------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        r = self.root
        image = _io.read_rgb(r / "JPEGImages" / f"{name}.jpg")
        H, W = image.shape[-2:]
        sample = {"image": image}
        label_map = None

        def labelmap():
            nonlocal label_map
            if label_map is None:
                path = r / "pascal-context" / "trainval" / f"{name}.mat"
                lm = np.asarray(_io.read_mat(path, "PASCAL-Context label map", "LabelMap"))
                if lm.ndim != 2 or not np.issubdtype(lm.dtype, np.integer):
                    raise _io.CorruptFileError(f"PASCAL-Context label map {path}: LabelMap has shape "
                                               f"{lm.shape} and dtype {lm.dtype}; expected a 2-D integer map", path)
                label_map = _fit_nearest(lm, (H, W))
            return label_map

        for task in self.tasks:
            if task == "semseg":
                path = self._semseg_paths[index]
                seg = _io.read_png(path, "semseg label", channels=(1,), bits=8)
                bad = np.unique(seg[(seg >= self.NUM_SEMSEG_CLASSES) & (seg != IGNORE_INDEX)])
                if bad.size:
                    raise _io.CorruptFileError(f"semseg label {path} holds values {bad[:10].tolist()}; expected "
                                               f"0..{self.NUM_SEMSEG_CLASSES - 1} or {IGNORE_INDEX}", path)
                sample["semseg"] = torch.from_numpy(_fit_nearest(seg, (H, W)).astype(np.int64))
            elif task == "human_parts":
                path = r / "human_parts" / f"{name}.mat"
                anno = _io.read_mat(path, "human-parts file", "anno")
                shape = _first_mask_shape(anno) or (H, W)
                parts = _fit_nearest(decode_human_parts(anno, shape, path), (H, W))
                sample["human_parts"] = torch.from_numpy(parts.astype(np.int64))
            elif task == "sal":
                path = r / "sal_distill" / f"{name}.png"
                sal = _io.read_png(path, "saliency map", channels=(1,), bits=8)
                sal = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
                sample["sal"] = torch.from_numpy(_fit_nearest(sal, (H, W)))
            elif task == "normals":
                path = r / "normals_distill" / f"{name}.png"
                v = _io.read_png(path, "normals map", channels=(3,), bits=8)
                n = torch.from_numpy((2.0 * v.astype(np.float32) / 255.0 - 1.0).transpose(2, 0, 1).copy())
                if tuple(n.shape[-2:]) != (H, W):
                    n = resize_bilinear(n, (H, W))
                if self.normals_valid_classes is not None:
                    keep = torch.from_numpy(np.isin(labelmap(), self.normals_valid_classes))
                    n = n * keep
                zero = (n == 0).all(0)
                n[:, zero] = float(IGNORE_INDEX)
                sample["normals"] = n
            elif task == "edge":
                sample["edge"] = torch.from_numpy(label_boundaries(labelmap()))
        sample["meta"] = {"name": name, "size": torch.tensor([H, W], dtype=torch.int64)}
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"tasks={list(self.tasks)}, n={len(self)})")


def _first_mask_shape(anno):
    # The part masks are the image size; read it from the struct so that a
    # decode never depends on the JPEG (a later resize handles mismatches).
    try:
        for obj in _records(_scalar(anno)["objects"]):
            m = np.asarray(obj["mask"])
            if m.ndim == 2 and m.size:
                return m.shape
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return None


def _fit_nearest(arr: np.ndarray, shape) -> np.ndarray:
    if arr.shape[:2] == tuple(shape):
        return arr
    return resize_nearest(torch.from_numpy(np.ascontiguousarray(arr)), shape).numpy()


__all__ = ["PascalContextMT", "PERSON_PART_GROUPS", "decode_human_parts", "label_boundaries"]
