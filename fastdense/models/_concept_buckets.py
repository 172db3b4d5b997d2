"""Label buckets of the concept-codebook model: continuous labels -> N class ids and N bucket values.

Concept-codebook paper §3.2 and §4.1 (docs/papers.md, 'Concept embeddings and
codebook'; the choices: docs/paper-decisions.md, section 'Buckets'). Every
dense task becomes N-way per-pixel classification; a bucket has an id (the
class target of L_cls) and a value (its row of the value codebook at
initialisation, see section 'Codebook initialisation').

* :class:`LogBuckets` — 1-D values. Edges uniform in log(v − lo + δ) over
  the support range [lo, hi], δ = (hi − lo)/N: fine buckets near the low end,
  coarse near the top, and defined at v = lo (labels that are 0, e.g. edges,
  keypoints, Taskonomy's encodings in [0, 1]).
* :class:`KMeansBuckets` — D-dimensional values (normals, curvature): k-means
  over the support labels, seeded; a value's bucket is its nearest centre.
  ``delaunay=True`` adds the triangulation step of Wang et al. 2015 as soft
  targets (barycentric weights of the simplex holding the value).
* :class:`ClassBuckets` — labels that already are class ids (segmentation).

Every bucket set maps labels (B, D, H, W) with a validity mask (B, 1, H, W)
to ``ids`` (B, H, W) int64 and, for soft targets, ``soft`` (B, N, H, W).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

#: Pixels k-means sees at most (drawn with the k-means seed): the centres of
#: 10 shots at 512² would otherwise cost millions of distances per iteration.
KMEANS_MAX_POINTS = 20000
KMEANS_ITERS = 50


def _valid_values(labels: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(P, D) float64 label vectors of the valid pixels."""
    if labels.dim() != 4:
        raise ValueError(f"labels must be (B, D, H, W), got shape {tuple(labels.shape)}")
    values = labels.detach().double().movedim(1, -1).reshape(-1, labels.shape[1])
    if mask is not None:
        values = values[_pixel_mask(mask, labels).reshape(-1)]
    values = values[torch.isfinite(values).all(dim=1)]
    if values.shape[0] == 0:
        raise ValueError("no valid label pixel to fit buckets on (the mask excludes every pixel)")
    return values


def _pixel_mask(mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mask as (B, H, W) bool; a (B, 1, H, W) or (B, H, W) mask of labels' batch and size."""
    m = mask.squeeze(1) if mask.dim() == 4 else mask
    if m.shape != (labels.shape[0], *labels.shape[-2:]):
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W) matching labels {tuple(labels.shape)}, "
                         f"got {tuple(mask.shape)}")
    return m.to(device=labels.device, dtype=torch.bool)


class LogBuckets:
    """N buckets of a 1-D value, uniform in log(v − lo + δ), δ = (hi − lo)/N."""

    kind = "log"
    soft = False

    def __init__(self, lo: float, hi: float, num: int) -> None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"bucket range must be finite, got [{lo}, {hi}]")
        if hi <= lo:  # one value in the whole support: any positive width keeps the map defined
            hi = lo + max(abs(lo), 1.0) * 1e-3
        self.lo, self.hi, self.num = lo, hi, int(num)
        self.offset = (hi - lo) / num
        self._log_lo = math.log(self.offset)
        self._log_span = math.log(hi - lo + self.offset) - self._log_lo

    @classmethod
    def fit(cls, labels: torch.Tensor, mask: Optional[torch.Tensor], num: int) -> "LogBuckets":
        """Range [lo, hi] of the valid support labels (B, 1, H, W)."""
        if labels.shape[1] != 1:
            raise ValueError(f"LogBuckets are for 1-D values; labels have {labels.shape[1]} channels")
        v = _valid_values(labels, mask)
        return cls(float(v.min()), float(v.max()), num)

    @property
    def value_dim(self) -> int:
        return 1

    def _from_position(self, pos: torch.Tensor) -> torch.Tensor:
        # Position in [0, N] along the log axis -> value.
        return self.lo - self.offset + torch.exp(self._log_lo + pos / self.num * self._log_span)

    @property
    def edges(self) -> torch.Tensor:
        """(N + 1,) float64 bucket edges, lo ... hi."""
        return self._from_position(torch.arange(self.num + 1, dtype=torch.float64))

    @property
    def centers(self) -> torch.Tensor:
        """(N, 1) float32: each bucket's midpoint on the log axis."""
        return self._from_position(torch.arange(self.num, dtype=torch.float64) + 0.5).float().unsqueeze(1)

    def assign(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, H, W) values -> (B, H, W) int64 ids; values outside [lo, hi] go to the end buckets."""
        v = labels[:, 0].double()
        shifted = (v - self.lo + self.offset).clamp_min(self.offset)
        pos = (torch.log(shifted) - self._log_lo) / self._log_span * self.num
        ids = torch.nan_to_num(pos, nan=0.0).floor().clamp_(0, self.num - 1).long()
        return ids

    def state(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi, "num": self.num}

    def __repr__(self) -> str:
        return f"LogBuckets(num={self.num}, lo={self.lo:.4g}, hi={self.hi:.4g})"


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """(k, D) centres of ``points`` (P, D): k-means++ seeding from ``seed``, then Lloyd iterations.

    A cluster that empties is moved to the point farthest from its centre, so
    there are always k centres (duplicates only when there are fewer than k
    distinct points).
    """
    g = torch.Generator().manual_seed(int(seed))
    pts = points.double().cpu()
    n = pts.shape[0]
    first = int(torch.randint(n, (), generator=g))
    centres = [pts[first]]
    d2 = (pts - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k
            idx = int(torch.randint(n, (), generator=g))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=g))
        centres.append(pts[idx])
        d2 = torch.minimum(d2, (pts - pts[idx]).pow(2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(pts, c).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, pts)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            far = (pts - new[assign]).pow(2).sum(1)
            for j, idx in zip(empty, far.argsort(descending=True).tolist()):
                new[j] = pts[idx]
        if torch.equal(new, c):
            break
        c = new
    return c


class KMeansBuckets:
    """N buckets of a D-dimensional value: k-means centres of the support labels, nearest centre wins.

    With ``delaunay=True`` the centres are triangulated (scipy's Delaunay, in
    the value space) and :meth:`soft_assign` gives each value the barycentric
    weights of the simplex that holds it, spread over that simplex's centres;
    values outside the centres' hull keep the one-hot nearest centre.
    """

    kind = "kmeans"

    def __init__(self, centers: torch.Tensor, delaunay: bool = False) -> None:
        if centers.dim() != 2 or centers.shape[0] < 1:
            raise ValueError(f"centers must be (N, D), got shape {tuple(centers.shape)}")
        self._centers = centers.detach().double().cpu()
        self.num = centers.shape[0]
        self.soft = bool(delaunay)
        self._tri = None
        if self.soft:
            self._tri = _triangulation(self._centers)

    @classmethod
    def fit(cls, labels: torch.Tensor, mask: Optional[torch.Tensor], num: int, seed: int = 0,
            delaunay: bool = False, max_points: int = KMEANS_MAX_POINTS) -> "KMeansBuckets":
        v = _valid_values(labels, mask)
        if v.shape[0] > max_points:
            g = torch.Generator().manual_seed(int(seed))
            v = v[torch.randperm(v.shape[0], generator=g)[:max_points]]
        return cls(kmeans(v, num, seed), delaunay=delaunay)

    @property
    def value_dim(self) -> int:
        return self._centers.shape[1]

    @property
    def centers(self) -> torch.Tensor:
        """(N, D) float32."""
        return self._centers.float()

    def assign(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, d, h, w = labels.shape
        if d != self.value_dim:
            raise ValueError(f"labels have {d} channels, the buckets {self.value_dim}")
        flat = labels.detach().movedim(1, -1).reshape(-1, d).double()
        flat = torch.nan_to_num(flat)
        ids = torch.cdist(flat, self._centers.to(flat.device)).argmin(1)
        return ids.view(b, h, w)

    def soft_assign(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) values -> (B, N, H, W) float32 targets that sum to 1 at every pixel
        (N floats per label pixel: 40 MiB per 512² image at N = 40)."""
        b, d, h, w = labels.shape
        ids = self.assign(labels)
        target = torch.zeros(b * h * w, self.num, dtype=torch.float32)
        target[torch.arange(b * h * w), ids.reshape(-1).cpu()] = 1.0
        if self._tri is not None:
            flat = torch.nan_to_num(labels.detach().movedim(1, -1).reshape(-1, d).double().cpu()).numpy()
            simplex = self._tri.find_simplex(flat)
            inside = simplex >= 0
            if inside.any():
                import numpy as np

                t = self._tri.transform[simplex[inside]]                 # (P, D+1, D)
                bary = np.einsum("pij,pj->pi", t[:, :d, :], flat[inside] - t[:, d, :])
                bary = np.concatenate([bary, 1.0 - bary.sum(1, keepdims=True)], axis=1).clip(0.0, 1.0)
                bary /= bary.sum(1, keepdims=True)
                rows = torch.from_numpy(np.nonzero(inside)[0])
                target[rows] = 0.0
                verts = torch.from_numpy(self._tri.simplices[simplex[inside]].astype("int64"))
                target.index_put_((rows[:, None].expand_as(verts), verts), torch.from_numpy(bary).float(),
                                  accumulate=True)
        return target.view(b, h, w, self.num).permute(0, 3, 1, 2).to(labels.device)

    def state(self) -> dict:
        return {"kind": self.kind, "centers": self._centers.tolist(), "delaunay": self.soft}

    def __repr__(self) -> str:
        return f"KMeansBuckets(num={self.num}, dim={self.value_dim}, delaunay={self.soft})"


def _triangulation(centers: torch.Tensor):
    try:
        from scipy.spatial import Delaunay
    except ImportError as exc:  # pragma: no cover - scipy ships with the test environment
        raise ImportError("KMeansBuckets(delaunay=True) needs scipy (pip install scipy)") from exc
    if centers.shape[0] <= centers.shape[1]:
        raise ValueError(f"a Delaunay triangulation of {centers.shape[1]}-D values needs more than "
                         f"{centers.shape[1]} centres, got {centers.shape[0]}")
    # "QJ" joggles co-planar centres (e.g. normals of flat scenes) instead of failing.
    return Delaunay(centers.numpy(), qhull_options="QJ")


class ClassBuckets:
    """Labels that are class ids already (segmentation): N classes, no values."""

    kind = "classes"
    soft = False

    def __init__(self, num: int) -> None:
        if num < 2:
            raise ValueError(f"segmentation needs at least 2 classes, got {num}")
        self.num = int(num)

    @property
    def value_dim(self) -> int:
        return 0

    @property
    def centers(self) -> torch.Tensor:
        return torch.zeros(self.num, 0)

    def assign(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, H, W) or (B, H, W) class ids (binary float masks: > 0.5 is class 1)."""
        lab = labels[:, 0] if labels.dim() == 4 else labels
        ids = (lab > 0.5).long() if lab.is_floating_point() and self.num == 2 else lab.long()
        return ids.clamp(0, self.num - 1)

    def state(self) -> dict:
        return {"kind": self.kind, "num": self.num}

    def __repr__(self) -> str:
        return f"ClassBuckets(num={self.num})"


def buckets_from_state(state: dict):
    """Rebuild a bucket set from its :meth:`state` (checkpoints store it as primitives)."""
    kind = state.get("kind")
    if kind == "log":
        return LogBuckets(state["lo"], state["hi"], state["num"])
    if kind == "kmeans":
        return KMeansBuckets(torch.tensor(state["centers"], dtype=torch.float64), delaunay=state.get("delaunay", False))
    if kind == "classes":
        return ClassBuckets(state["num"])
    raise ValueError(f"unknown bucket kind {kind!r}; expected 'log', 'kmeans' or 'classes'")


__all__ = ["ClassBuckets", "KMeansBuckets", "LogBuckets", "buckets_from_state", "kmeans"]
