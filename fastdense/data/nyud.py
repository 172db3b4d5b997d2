"""NYUD-v2 multi-task (the ``NYUD_MT`` folder of MTI-Net, ATRC, InvPT).

See :class:`NYUDMT`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _io
from .transforms import IGNORE_INDEX


class NYUDMT(Dataset):
    """NYUD-v2 for multi-task learning (795 train / 654 val images).

    Layout under ``root``::

        images/<id>.jpg
        gt_sets/{train,val}.txt        one id a line
        segmentation/<id>.png          8-bit, 0 unlabelled, 1..40 the 40 classes
        depth/<id>.npy                 (H, W) metres
        normals/<id>.npy               (H, W, 3)
        edge/<id>.npy                  (H, W)

    Sample::

        image    (3, H, W) float32 RGB in [0, 1]
        semseg   (H, W) int64: raw 0 -> 255 (ignored), raw v -> v - 1, so 40
                 classes 0..39 (the community ignores "unlabelled", it is not
                 a class)
        depth    (1, H, W) float32; 0 (no measurement) -> 255
        normals  (3, H, W) float32; zero vectors (no normal) -> 255 in all
                 channels
        edge     (H, W) float32
        meta     {"name": id, "size": int64 tensor (H, W)}

    The 255 markers are MTI-Net's ``AddIgnoreRegions`` applied at load time,
    so that padding and the metrics (``DepthError``, ``NormalsError``) use one
    convention. Labels must have the image's size (``CorruptFileError``
    otherwise): the released arrays all do, and a mismatch means a wrong file.
    """

    TASKS = ("semseg", "depth", "normals", "edge")
    SPLITS = ("train", "val")
    NUM_SEMSEG_CLASSES = 40

    _FILES = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
              "normals": ("normals", ".npy"), "edge": ("edge", ".npy")}

    def __init__(self, root, split: str = "train", tasks: Iterable[str] = ("semseg", "depth", "normals", "edge"),
                 transform=None) -> None:
        self.root = _io.require_dir(root, "NYUD-v2 (NYUD_MT) root")
        self.split = _io.check_split(split, self.SPLITS, "NYUD-v2")
        self.tasks = _io.check_tasks(tasks, self.TASKS, "NYUD-v2")
        self.transform = transform
        self.ids = _io.read_split_file(self.root / "gt_sets" / f"{split}.txt")
        folders = [("images", ".jpg")] + [self._FILES[t] for t in self.tasks]
        for sub, ext in folders:
            folder = _io.require_dir(self.root / sub, f"NYUD-v2 {sub} folder")
            present = _io.stems_in(folder, ext)
            _io.report_missing((folder / f"{i}{ext}" for i in self.ids if i not in present),
                               f"NYUD-v2 {sub} file(s) of split {split!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        r = self.root
        image = _io.read_rgb(r / "images" / f"{name}.jpg")
        H, W = image.shape[-2:]
        sample = {"image": image}
        for task in self.tasks:
            sub, ext = self._FILES[task]
            path = r / sub / f"{name}{ext}"
            if task == "semseg":
                raw = _io.read_png(path, "NYUD-v2 segmentation", channels=(1,), bits=8).astype(np.int64)
                if raw.max(initial=0) > self.NUM_SEMSEG_CLASSES:
                    raise _io.CorruptFileError(f"NYUD-v2 segmentation {path} holds values up to {raw.max()}; "
                                               f"expected 0 (unlabelled) .. {self.NUM_SEMSEG_CLASSES}", path)
                label = np.where(raw == 0, IGNORE_INDEX, raw - 1)
                _check_hw(label, (H, W), path)
                sample["semseg"] = torch.from_numpy(label)
            elif task == "depth":
                d = _io.read_npy(path, "NYUD-v2 depth", ndims=(2, 3)).astype(np.float32)
                d = _squeeze_channel(d, path)
                _check_hw(d, (H, W), path)
                d = np.where(d == 0, np.float32(IGNORE_INDEX), d)
                sample["depth"] = torch.from_numpy(d[None].copy())
            elif task == "normals":
                n = _io.read_npy(path, "NYUD-v2 normals", ndims=(3,)).astype(np.float32)
                if n.shape[2] != 3:
                    raise _io.CorruptFileError(f"NYUD-v2 normals {path} has shape {n.shape}; expected (H, W, 3)", path)
                _check_hw(n, (H, W), path)
                n = torch.from_numpy(n.transpose(2, 0, 1).copy())
                n[:, (n == 0).all(0)] = float(IGNORE_INDEX)
                sample["normals"] = n
            elif task == "edge":
                e = _squeeze_channel(_io.read_npy(path, "NYUD-v2 edge map", ndims=(2, 3)).astype(np.float32), path)
                _check_hw(e, (H, W), path)
                sample["edge"] = torch.from_numpy(e.copy())
        sample["meta"] = {"name": name, "size": torch.tensor([H, W], dtype=torch.int64)}
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"tasks={list(self.tasks)}, n={len(self)})")


def _squeeze_channel(a: np.ndarray, path) -> np.ndarray:
    # Some exports store single-channel maps as (H, W, 1).
    if a.ndim == 3:
        if a.shape[2] != 1:
            raise _io.CorruptFileError(f"{path} has shape {a.shape}; expected (H, W) or (H, W, 1)", path)
        a = a[:, :, 0]
    return a


def _check_hw(a: np.ndarray, hw, path) -> None:
    if tuple(a.shape[:2]) != tuple(hw):
        raise _io.CorruptFileError(f"{path} is {a.shape[0]}x{a.shape[1]}; expected the image size "
                                   f"{hw[0]}x{hw[1]}", path)


__all__ = ["NYUDMT"]
