"""Procedural ray-cast scenes with Taskonomy- and PASCAL-style dense labels.

See :class:`SyntheticScenes`.
"""
from __future__ import annotations

import operator
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _render
from ._scene import Scene, sample_scene

# Bump whenever a change to the generator changes any output: it names the
# cache folder, so stale caches are never read back.
GENERATOR_VERSION = 1
MIN_RESOLUTION, MAX_RESOLUTION = 64, 448
META_KEYS = ("intrinsics", "cam_to_world")


class SyntheticScenes(Dataset):
    """A dataset of ray-cast 3-D scenes, generated on the fly (no downloads).

    Each scene is a room (floor ``y = 0``, four walls, open sky above) with
    3 to 6 objects (spheres, boxes that are axis-aligned or turned about the
    vertical, vertical cylinders), solid textures (stripes, checkers,
    thresholded wave "blobs", plain) on every surface, one point or
    directional light with Lambertian shading, ambient light and cast shadows
    from the objects, seen by a pinhole camera looking at the objects.

    Sample ``i`` depends only on ``(seed, i)`` and the resolution: the same
    in any access order and in any DataLoader worker. (Across machines,
    numpy's float32 ``sin`` and ``sqrt`` may round differently, which can
    move a texture or silhouette border by a pixel.)

    Args:
        num_samples: length of the dataset.
        resolution: image side ``H = W``, an int in [64, 448]. The scene and
            camera (pose and field of view) do not depend on it.
        seed: non-negative int; different seeds give different scenes.
        tasks: label names to produce (a subset of :attr:`TASKS`), or None
            for all. ``image`` and ``meta`` are always returned.
        cache_dir: if given, each sample is stored there as ``.npz`` (all
            tasks, written atomically) on first access and read back after.

    Every item is a dict of tensors, ``H = W = resolution``. Geometry is in
    metres. The camera frame is OpenCV's: x right, y down, z forward (into
    the scene). Pixel ``(i, j)`` (row, column) samples the ray through the
    pixel centre ``u = j, v = i`` of ``meta["intrinsics"]`` ``K``, i.e.
    direction ``K^-1 (j, i, 1)``; ``cx = cy = (resolution - 1) / 2``.
    *Background* pixels (semseg 0: rays over the walls into the sky) have
    depth 0, normal 0, curvature 0 and reshading 0.

    - ``image`` (3, H, W) float32 RGB in [0, 1].
    - ``semseg`` (H, W) int64 class ids, :attr:`CLASSES`: 0 background (sky),
      1 floor, 2 wall, 3 sphere, 4 box, 5 cylinder.
    - ``normal`` (3, H, W) unit surface normals in the camera frame, facing
      the camera (every visible surface has ``n . ray <= 0``, so ``n_z`` is
      mostly negative); background 0.
    - ``depth_euclidean`` (1, H, W) distance from the camera centre to the
      surface along the pixel's ray.
    - ``depth_zbuffer`` (1, H, W) the camera-frame z of the same point:
      ``depth_euclidean * cos(angle between ray and optical axis)``.
    - ``edge_texture`` (1, H, W) {0, 1}: pixels whose albedo id (material
      and texture label; the four walls share one material) differs from a
      4-neighbour's: texture edges inside a surface and every border
      between different materials (so most silhouettes too), but not
      shading or shadow edges. 2 pixels wide (both sides marked).
    - ``edge_occlusion`` (1, H, W) {0, 1}: both pixels of every 4-neighbour
      pair across a depth discontinuity: an object's silhouette against
      anything behind it, and any surface against the sky. Creases where
      surfaces meet (wall-wall, floor-wall, the contact of an object resting
      on the floor, within 2 pixel footprints of the floor) are not edges.
    - ``keypoints2d`` (1, H, W) Harris corner response of the image's
      luminance (central-difference gradients, 5x5 binomial window,
      ``k = 0.05``), clipped at 0 and divided by the image's maximum; 0
      within 3 pixels of the image border.
    - ``keypoints3d`` (1, H, W) 3-D keypoint heat on visible surfaces:
      ``exp(-d^2 / (2 * 0.1^2))`` with ``d`` the distance in metres from the
      pixel's 3-D point to the nearest corner of its box or the nearest rim
      circle (top or bottom) of its cylinder; 0 on spheres and the room.
      Corners hidden from the camera leave no heat (only visible points are
      scored).
    - ``reshading`` (1, H, W) shading without texture by a point light at the
      camera centre: ``max(0, -n . ray)``.
    - ``principal_curvature`` (2, H, W) ``(k1, k2)``, ``k1 >= k2``, in 1/m,
      positive where the surface bends away from its normal (convex):
      spheres ``(1/r, 1/r)``, cylinder sides ``(1/r, 0)``, planes (floor,
      walls, box faces, cylinder tops) ``(0, 0)``.
    - ``saliency`` (1, H, W) {0, 1}: object pixels (spheres, boxes,
      cylinders), not floor, walls or sky.
    - ``parts`` (H, W) int64 part ids, :attr:`PARTS`: 0 none (sky, floor,
      walls), 1 sphere upper half (above its centre), 2 sphere lower half,
      3 box top face, 4 box side faces, 5 cylinder top disc, 6 cylinder
      side. Box and cylinder bottoms rest on the floor and are never seen.
    - ``meta``: ``intrinsics`` (3, 3) float32 ``K``; ``cam_to_world`` (4, 4)
      float32, columns the camera axes and centre in the world frame (world:
      +y up, floor at y = 0); ``index`` int64.
    """

    TASKS = ("semseg", "normal", "depth_euclidean", "depth_zbuffer", "edge_texture", "edge_occlusion",
             "keypoints2d", "keypoints3d", "reshading", "principal_curvature", "saliency", "parts")
    CLASSES = _render.CLASSES
    PARTS = _render.PARTS

    def __init__(self, num_samples: int, resolution: int = 128, seed: int = 0, tasks=None, cache_dir=None):
        self.num_samples = _int_arg("num_samples", num_samples, lo=0)
        self.resolution = _int_arg("resolution", resolution, lo=MIN_RESOLUTION, hi=MAX_RESOLUTION)
        self.seed = _int_arg("seed", seed, lo=0)
        self.tasks = _tasks_arg(tasks, self.TASKS)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        """The scene description of sample ``index``: room, objects (kind,
        centre, size, yaw), materials, camera and light, in world coordinates
        (metres, +y up, floor at y = 0); see ``fastdense.data._scene``."""
        return sample_scene(self.seed, self._index(index))

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        arrays = self._cached(index) if self.cache_dir is not None else None
        if arrays is None:
            arrays = _render.render(sample_scene(self.seed, index), self.resolution,
                                    self.TASKS if self.cache_dir is not None else self.tasks)
            if self.cache_dir is not None:
                self._store(index, arrays)
        sample = {"image": torch.from_numpy(arrays["image"])}
        for name in self.tasks:
            sample[name] = torch.from_numpy(arrays[name])
        sample["meta"] = {k: torch.from_numpy(arrays[k]) for k in META_KEYS}
        sample["meta"]["index"] = torch.tensor(index, dtype=torch.int64)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_samples={self.num_samples}, resolution={self.resolution}, "
                f"seed={self.seed}, tasks={list(self.tasks)}, cache_dir={self.cache_dir})")

    # --- internals ----------------------------------------------------------------
    def _index(self, index) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return i

    def _path(self, index: int) -> Path:
        folder = f"synthetic-v{GENERATOR_VERSION}-res{self.resolution}-seed{self.seed}"
        return self.cache_dir / folder / f"{index:07d}.npz"

    def _cached(self, index: int):
        path = self._path(index)
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("image", *self.tasks, *META_KEYS)}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            # Unreadable or incomplete (e.g. from another version): regenerate over it.
            return None
        return arrays

    def _store(self, index: int, arrays: dict) -> None:
        path = self._path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a private temporary file in the same folder, then rename it over
        # the target: readers (other workers, other processes) see either no
        # file or a complete one, never a partial write.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def _int_arg(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _tasks_arg(tasks, valid):
    if tasks is None:
        return tuple(valid)
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, not a string; e.g. tasks=[{tasks!r}]")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks are: {', '.join(valid)}")
    return tuple(dict.fromkeys(tasks))     # drop repeats, keep order
