"""Image-space label operators on (H, W) numpy arrays."""
from __future__ import annotations

import threading

import numpy as np


def neighbour_edges(pair_h: np.ndarray, pair_v: np.ndarray) -> np.ndarray:
    """Marks both pixels of every flagged 4-neighbour pair.

    ``pair_h[i, j]`` flags pixels ``(i, j)``-``(i, j+1)``, shape (H, W-1);
    ``pair_v[i, j]`` flags ``(i, j)``-``(i+1, j)``, shape (H-1, W). Marking
    both sides gives 2-pixel-wide edges that do not depend on which side of
    the boundary is scanned first."""
    h, w = pair_h.shape[0], pair_v.shape[1]
    e = np.zeros((h, w), bool)
    e[:, 1:] |= pair_h
    e[:, :-1] |= pair_h
    e[1:] |= pair_v
    e[:-1] |= pair_v
    return e


def label_edges(ids: np.ndarray) -> np.ndarray:
    """Pixels whose integer id differs from a 4-neighbour's."""
    return neighbour_edges(ids[:, 1:] != ids[:, :-1], ids[1:] != ids[:-1])


# Scratch buffers per thread and image size. Harris needs a few (3, H, W)
# float32 temporaries, at 128^2 above glibc's mmap threshold: allocated anew
# for every image they cost more in page faults than in arithmetic.
_scratch = threading.local()


def _buffers(n: int):
    bufs = getattr(_scratch, "harris", None)
    if bufs is None or bufs[0].size != n:
        bufs = tuple(np.empty(n, np.float32) for _ in range(3))
        _scratch.harris = bufs
    return bufs


def _binomial5(x: np.ndarray, step: int, t1: np.ndarray, t2: np.ndarray) -> None:
    """(1 4 6 4 1) smoothing (unnormalised: x16), in place, of a flat array
    along a stride of ``step`` elements: 1 smooths along rows of a flattened
    image, its width along columns. The kernel is (1 1) applied four times,
    i.e. four shifted additions (through the scratch arrays ``t1``, ``t2``)
    and no multiplications. Shifting the flat array keeps every operand
    contiguous (slicing the last axis of a 2-D array does not, and is several
    times slower); the price is that values wrap from one row, or one image
    of a stack, into the next within 2 steps of an edge, which the caller
    discards. Element ``i`` ends centred on its old value; the first and
    last ``2 * step`` elements are set to 0."""
    n, s = x.size, step
    np.add(x[:n - s], x[s:], out=t1[:n - s])
    np.add(t1[:n - 2 * s], t1[s:n - s], out=t2[:n - 2 * s])
    np.add(t2[:n - 3 * s], t2[s:n - 2 * s], out=t1[:n - 3 * s])
    np.add(t1[:n - 4 * s], t1[s:n - 3 * s], out=x[2 * s:n - 2 * s])
    x[:2 * s] = 0
    x[n - 2 * s:] = 0


def harris(gray: np.ndarray, k: float = 0.05) -> np.ndarray:
    """Harris corner response ``det(M) - k trace(M)^2``, clipped at 0 and
    divided by its maximum (so in [0, 1], 1 at the image's strongest corner).

    ``M`` is the structure tensor of central-difference gradients, smoothed
    with a separable 5x5 binomial window (std 1 pixel). The response is 0
    within 3 pixels of the image border, where the window does not fit.
    Constant factors of ``M`` (the window's 1/256) scale the response
    uniformly and cancel in the normalisation."""
    h, w = gray.shape
    n = h * w
    g = gray.ravel()
    flat, t1, t2 = _buffers(3 * n)
    m = flat.reshape(3, n)
    # Flat shifts: the x-gradient wraps at the first and last column, which
    # only reaches pixels within 3 columns of the border after smoothing.
    ix, iy = m[0], m[1]
    np.subtract(g[2:], g[:-2], out=ix[1:-1])
    ix[0] = ix[-1] = 0
    np.subtract(g[2 * w:], g[:-2 * w], out=iy[w:-w])
    iy[:w] = 0
    iy[-w:] = 0
    np.multiply(ix, iy, out=m[2])
    ix *= ix
    iy *= iy
    _binomial5(flat, 1, t1, t2)
    _binomial5(flat, w, t1, t2)
    sxx, syy, sxy = (a.reshape(h, w) for a in m)
    r = sxx * syy
    np.multiply(sxy, sxy, out=t1[:n].reshape(h, w))
    r -= t1[:n].reshape(h, w)
    tr = np.add(sxx, syy, out=t2[:n].reshape(h, w))
    tr *= tr
    tr *= np.float32(k)
    r -= tr
    r[:3] = 0                     # wrapped or partial windows: see above
    r[-3:] = 0
    r[:, :3] = 0
    r[:, -3:] = 0
    r *= r > 0
    peak = r.max()
    if peak <= 0:
        return r
    r /= peak                     # (not * 1/peak: the maximum must come out exactly 1)
    return r
