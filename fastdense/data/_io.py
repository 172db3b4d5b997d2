"""File readers shared by the on-disk dataset loaders.

Every reader raises an error that names the file and says what was expected,
because the community data sets are assembled from several archives and the
usual failure is one missing or truncated folder: ``np.load`` or PIL alone
would report only a bare "cannot identify image file" deep inside a
DataLoader worker.

* :class:`DatasetNotFoundError` (a ``FileNotFoundError``): a root, split
  file, task folder or per-sample file is missing.
* :class:`CorruptFileError` (a ``ValueError``): a file exists but cannot be
  decoded, or decodes to the wrong shape, type or value range.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """A file or folder a dataset needs is missing; ``path`` names it."""

    def __init__(self, message: str, path) -> None:
        # Only the message goes to OSError: with a single argument its str()
        # is the message itself (setting ``filename`` would turn it into
        # "[Errno None] None: ...").
        super().__init__(message)
        self.path = str(path)


class CorruptFileError(ValueError):
    """A file exists but does not hold what the dataset expects; ``path`` names it."""

    def __init__(self, message: str, path) -> None:
        super().__init__(message)
        self.path = str(path)


def _lazy_pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a dependency of the data loaders
        raise ImportError("the on-disk dataset loaders need Pillow: pip install pillow") from e
    return Image


def _lazy_loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy is a dependency of the PASCAL loader
        raise ImportError("reading PASCAL-Context .mat files needs scipy: pip install scipy") from e
    return loadmat


def require_dir(path, what: str) -> Path:
    """``path`` as a Path, or DatasetNotFoundError saying which folder is missing."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what} not found: {path} (expected a folder)", path)
    return path


def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path} (expected a file)", path)
    return path


def check_tasks(tasks, valid: Sequence[str], dataset: str) -> tuple:
    """``tasks`` as a tuple, or ValueError naming the unknown ones and listing the valid ones."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"unknown {dataset} task(s) {unknown}; valid tasks: {list(valid)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate {dataset} task in {list(tasks)}")
    return tasks


def check_split(split: str, valid: Sequence[str], dataset: str) -> str:
    if split not in valid:
        raise ValueError(f"unknown {dataset} split {split!r}; valid splits: {list(valid)}")
    return split


def read_split_file(path) -> list:
    """Sample ids of a split file, one a line; blank lines are skipped."""
    path = require_file(path, "split file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read split file {path}: {e}", path) from e
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise CorruptFileError(f"split file {path} is empty (expected one sample id a line)", path)
    return ids


def stems_in(folder: Path, suffix: str) -> set:
    """Names (without ``suffix``) of the files in ``folder`` ending in ``suffix``.

    One directory listing instead of one ``stat`` per sample: the loaders
    check at construction that every file of the split exists, and PASCAL has
    5 tasks x 10k images.
    """
    n = len(suffix)
    return {name[:-n] for name in os.listdir(folder) if name.endswith(suffix)}


def report_missing(missing: Iterable[Path], what: str) -> None:
    """Raise DatasetNotFoundError naming the first missing files, if any."""
    missing = list(missing)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetNotFoundError(f"{len(missing)} {what} missing: {shown}{more}", missing[0])


def _open_image(path: Path, what: str):
    Image = _lazy_pil()
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path} (expected a file)", path)
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for non-images,
        # OSError/SyntaxError for truncated ones, and DecompressionBombError
        # (a bare Exception) for a header claiming more than twice
        # Image.MAX_IMAGE_PIXELS pixels: a damaged or hostile file all the same.
        raise CorruptFileError(f"cannot decode {what} {path}: {e}", path) from e
    return img


def read_rgb(path, what: str = "image") -> torch.Tensor:
    """An image file as a (3, H, W) float32 tensor in [0, 1] (grey and palette images converted to RGB)."""
    path = Path(path)
    img = _open_image(path, what)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)


def read_png(path, what: str, channels: Sequence[int] = (1,), bits: int | None = 8) -> np.ndarray:
    """The raw pixel values of a label image, ``(H, W)`` or ``(H, W, C)``.

    ``channels``: accepted channel counts (1 is returned as ``(H, W)``).
    ``bits``: 8 requires 8-bit samples (``uint8``), 16 requires more than 8
    (16-bit PNGs come back as ``uint16``, or ``int32`` for Pillow's "I" mode);
    None accepts either. Palette ("P") images give their indices, which is how
    VOC-style segmentation PNGs store class ids.
    """
    path = Path(path)
    img = _open_image(path, what)
    if img.mode in ("RGBA", "LA", "PA"):
        raise CorruptFileError(f"{what} {path} has an alpha channel (mode {img.mode}); expected "
                               f"{' or '.join(map(str, channels))} channel(s)", path)
    arr = np.asarray(img)
    c = 1 if arr.ndim == 2 else arr.shape[2]
    if c not in channels:
        raise CorruptFileError(f"{what} {path} has {c} channel(s) (mode {img.mode}); expected "
                               f"{' or '.join(map(str, channels))}", path)
    if bits == 8 and arr.dtype != np.uint8:
        raise CorruptFileError(f"{what} {path} has {arr.dtype} samples (mode {img.mode}); expected 8-bit", path)
    if bits == 16 and arr.dtype == np.uint8:
        raise CorruptFileError(f"{what} {path} has 8-bit samples (mode {img.mode}); expected 16-bit", path)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return np.array(arr)  # writable copy, independent of PIL's buffer


def read_npy(path, what: str, ndims: Sequence[int]) -> np.ndarray:
    """A ``.npy`` array (no pickles) with one of the given numbers of dimensions."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path} (expected a file)", path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CorruptFileError(f"cannot read {what} {path} as a .npy array: {e}", path) from e
    if arr.ndim not in ndims:
        raise CorruptFileError(f"{what} {path} has shape {arr.shape}; expected "
                               f"{' or '.join(f'{d}-D' for d in ndims)}", path)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise CorruptFileError(f"{what} {path} holds {arr.dtype}; expected numbers", path)
    return arr


def read_mat(path, what: str, key: str):
    """Variable ``key`` of a MATLAB ``.mat`` file, loaded as scipy does by default
    (structs as record arrays, nothing squeezed: the layout the community's
    indexing ``anno[0][0][1][0]`` assumes)."""
    loadmat = _lazy_loadmat()
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path} (expected a file)", path)
    try:
        data = loadmat(str(path))
    except (OSError, ValueError, TypeError, EOFError, NotImplementedError) as e:
        raise CorruptFileError(f"cannot read {what} {path} as a MATLAB file: {e}", path) from e
    if key not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise CorruptFileError(f"{what} {path} has no variable {key!r} (found {found})", path)
    return data[key]
