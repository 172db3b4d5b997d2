"""Renders a :class:`._scene.Scene` and its dense labels with numpy.

One primary ray per pixel centre; the geometry of every pixel comes from
the analytic primitive it hits (nearest hit wins), and each label is a
closed-form function of that hit. See :class:`fastdense.data.SyntheticScenes`
for the label conventions.

Arrays are flat (``N = res * res`` pixels, row-major) until the end. The
code avoids ``np.where``, integer ``%`` and 2-D fancy indexing, each several
times slower than plain arithmetic on these sizes, in favour of
``np.copyto(..., where=)``, float arithmetic and 1-D ``take``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from . import _filters, _raycast
from ._scene import FIRST_OBJECT, FLOOR, MAT_FLOOR, MAT_WALL, MAX_LABELS, SKY, WALL, Scene

CLASSES = ("background", "floor", "wall", "sphere", "box", "cylinder")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
PARTS = ("none", "sphere_upper", "sphere_lower", "box_top", "box_side", "cylinder_top", "cylinder_side")
PART_ID = {name: i for i, name in enumerate(PARTS)}

KEYPOINT3D_SIGMA = 0.1       # metres: width of the 3-D keypoint heat blobs
CONTACT_PIXELS = 2.0         # object pixels lower than this many pixel footprints touch the floor
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@functools.lru_cache(maxsize=8)
def _pixel_offsets(res: int) -> np.ndarray:
    """Pixel-centre offsets ``k - c`` from the principal point ``c = (res - 1) / 2``."""
    a = np.arange(res, dtype=np.float32) - np.float32((res - 1) / 2)
    a.flags.writeable = False
    return a


def intrinsics(scene: Scene, res: int) -> np.ndarray:
    f, c = scene.camera.focal * res, (res - 1) / 2
    return np.array([[f, 0, c], [0, f, c], [0, 0, 1]], np.float32)


def cam_to_world(scene: Scene) -> np.ndarray:
    m = np.eye(4, dtype=np.float32)
    m[:3, :3] = scene.camera.rot
    m[:3, 3] = scene.camera.position
    return m


def _rays(scene: Scene, res: int):
    """World-frame unit ray directions ``(dx, dy, dz)``, (res, res) each, and
    ``cos``, the cosine of each ray's angle to the optical axis (= the z of
    the camera-frame unit direction). Separable: the camera-frame direction
    of pixel (i, j) is ``(a_j, a_i, 1) * cos`` with ``a = (k - c) / f``."""
    a = _pixel_offsets(res) * np.float32(1 / (scene.camera.focal * res))
    a2 = a * a
    cos = np.add((a2 + 1)[None, :], a2[:, None])
    np.sqrt(cos, out=cos)
    np.reciprocal(cos, out=cos)
    R = scene.camera.rot
    d = []
    for i in range(3):
        di = np.add((R[i, 0] * a)[None, :], (R[i, 1] * a + R[i, 2])[:, None])
        di *= cos
        d.append(di)
    return tuple(d), cos


def _rotate(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` for a 3x3 ``m`` and (3, N) ``v``, written out: numpy hands
    ``@`` to a multi-threaded BLAS, whose idle threads then spin on the
    other core, which a DataLoader worker beside this one needs."""
    out = np.empty_like(v)
    tmp = np.empty_like(v[0])
    for i in range(3):
        np.multiply(v[0], m[i, 0], out=out[i])
        for j in (1, 2):
            np.multiply(v[j], m[i, j], out=tmp)
            out[i] += tmp
    return out


def _texture_ids(scene: Scene, material: int, x, y, z):
    lab = scene.materials[material].texture.labels(x, y, z)
    lab += material * MAX_LABELS
    return lab


@dataclasses.dataclass
class Surfaces:
    """What every pixel's ray hits, as flat arrays over the ``N = res * res``
    pixels (row-major) unless noted: ``d`` unit ray directions (world),
    ``cos`` (res, res) cosine of each ray to the optical axis, ``t`` (res,
    res) distance to the hit (0 on the sky), ``inst`` (res, res) uint8
    instance ids (see ._scene), ``X`` hit points (world), ``normal`` (3, N)
    world unit normals (0 on the sky), ``aid`` albedo ids; and, where asked
    for, curvatures ``k1``/``k2``, ``parts`` and ``kp3`` (keypoint heat)."""

    d: tuple
    cos: np.ndarray
    t: np.ndarray
    inst: np.ndarray
    X: tuple
    normal: np.ndarray
    aid: np.ndarray
    k1: np.ndarray | None
    k2: np.ndarray | None
    parts: np.ndarray | None
    kp3: np.ndarray | None


def surfaces(scene: Scene, res: int, need) -> Surfaces:
    """Casts the primary rays and evaluates the hit surfaces (normals,
    textures and the per-surface labels named in ``need``)."""
    n_pix = res * res
    d2d, cos = _rays(scene, res)
    t2d, inst2d = _raycast.primary(scene, d2d, res)
    d = tuple(a.ravel() for a in d2d)
    t, inst = t2d.ravel(), inst2d.ravel()
    t[inst == SKY] = 0
    o = scene.camera.position
    X = tuple(t * d[i] + o[i] for i in range(3))

    normal = np.zeros((3, n_pix), np.float32)       # world frame until the end
    aid = np.zeros(n_pix, np.intp)                   # albedo id = material * MAX_LABELS + label
    k1 = np.zeros(n_pix, np.float32) if "principal_curvature" in need else None
    k2 = np.zeros(n_pix, np.float32) if "principal_curvature" in need else None
    parts = np.zeros(n_pix, np.int64) if "parts" in need else None
    kp3 = np.zeros(n_pix, np.float32) if "keypoints3d" in need else None

    # Room: textures in world coordinates; the four walls share one wallpaper.
    idx = np.flatnonzero(inst == FLOOR)
    normal[1, idx] = 1
    aid[idx] = _texture_ids(scene, MAT_FLOOR, X[0].take(idx), X[1].take(idx), X[2].take(idx))
    idx = np.flatnonzero(inst == WALL)
    wx, wy, wz = X[0].take(idx), X[1].take(idx), X[2].take(idx)
    # Which wall: the one whose coordinate is at +-L, i.e. the larger |x| or |z|.
    on_x = np.abs(wx) > np.abs(wz)
    normal[0, idx] = -np.copysign(on_x, wx)
    normal[2, idx] = -np.copysign(~on_x, wz)
    aid[idx] = _texture_ids(scene, MAT_WALL, wx, wy, wz)

    inv2s2 = np.float32(-0.5 / KEYPOINT3D_SIGMA ** 2)
    for k, obj in enumerate(scene.objects):
        idx = np.flatnonzero(inst == FIRST_OBJECT + k)
        if idx.size == 0:
            continue
        lx, ly, lz = (X[i].take(idx) - obj.center[i] for i in range(3))
        heat = None
        if obj.kind == "sphere":
            r = obj.size[0]
            # Normalised by |X - c| rather than r: the hit point carries float32 error.
            inv = 1 / np.sqrt(lx * lx + ly * ly + lz * lz)
            nrm = (lx * inv, ly * inv, lz * inv)
            curv = (1 / r, 1 / r)
            part = PART_ID["sphere_lower"] - (ly >= 0)
        elif obj.kind == "box":
            c, s = np.float32(math.cos(obj.yaw)), np.float32(math.sin(obj.yaw))
            lx, lz = c * lx - s * lz, s * lx + c * lz          # box frame
            h = obj.size
            ax, ay, az = np.abs(lx), np.abs(ly), np.abs(lz)
            # The face hit is the one whose slab the point is on: largest |x_a| / h_a.
            sx, sy, sz = ax * np.float32(1 / h[0]), ay * np.float32(1 / h[1]), az * np.float32(1 / h[2])
            fx = (sx >= sy) & (sx >= sz)
            fy = (sy > sx) & (sy >= sz)
            fz = ~(fx | fy)
            nlx, nly, nlz = np.copysign(fx, lx), np.copysign(fy, ly), np.copysign(fz, lz)
            nrm = (c * nlx + s * nlz, nly, c * nlz - s * nlx)
            curv = None
            part = PART_ID["box_side"] - (nly > 0)
            # Distance to the nearest corner: per axis, to the corner on the point's side.
            ax -= h[0]
            ay -= h[1]
            az -= h[2]
            heat = ax * ax + ay * ay + az * az
        else:
            r, hh = obj.size
            rho = np.sqrt(lx * lx + lz * lz)
            # On the cap the height error is ~0, on the side the radius error is.
            cap = np.abs(ly - hh) < np.abs(rho - r)
            side = ~cap
            inv_rho = side / np.maximum(rho, np.float32(1e-6))
            nrm = (lx * inv_rho, cap.astype(np.float32), lz * inv_rho)
            curv = (side * np.float32(1 / r), 0.0)
            part = PART_ID["cylinder_side"] - cap
            # Distance to the nearer rim circle (top at y = h, bottom at y = 0).
            rho -= r
            dy = np.minimum(ly, hh - ly)
            heat = rho * rho + dy * dy
        for i in range(3):
            normal[i, idx] = nrm[i]
        aid[idx] = _texture_ids(scene, obj.material, lx, ly, lz)
        if k1 is not None and curv is not None:
            k1[idx], k2[idx] = curv
        if parts is not None:
            parts[idx] = part
        if kp3 is not None and heat is not None:
            heat *= inv2s2
            kp3[idx] = np.exp(heat)

    return Surfaces(d, cos, t2d, inst2d, X, normal, aid, k1, k2, parts, kp3)


def render(scene: Scene, res: int, tasks) -> dict:
    """The image, meta data and the labels named in ``tasks`` as numpy
    arrays (channel-first, float32; ``semseg`` and ``parts`` int64)."""
    need = set(tasks)
    g = surfaces(scene, res, need)
    d, cos, t2d, inst2d, X, normal, aid = g.d, g.cos, g.t, g.inst, g.X, g.normal, g.aid
    inst = inst2d.ravel()
    rgb = _shade(scene, X, normal, aid, inst, d[1])
    out = {"image": rgb.reshape(3, res, res),
           "intrinsics": intrinsics(scene, res),
           "cam_to_world": cam_to_world(scene)}

    if "semseg" in need:
        table = np.zeros(FIRST_OBJECT + len(scene.objects), np.int64)
        table[FLOOR], table[WALL] = CLASS_ID["floor"], CLASS_ID["wall"]
        table[FIRST_OBJECT:] = [CLASS_ID[ob.kind] for ob in scene.objects]
        out["semseg"] = table.take(inst2d)
    if "normal" in need:
        out["normal"] = _rotate(scene.camera.rot.T, normal).reshape(3, res, res)
    if "depth_euclidean" in need:
        out["depth_euclidean"] = t2d[None]
    if "depth_zbuffer" in need:
        out["depth_zbuffer"] = (t2d * cos)[None]
    if "edge_texture" in need:
        out["edge_texture"] = _filters.label_edges(aid.reshape(res, res))[None].astype(np.float32)
    if "edge_occlusion" in need:
        edges = _occlusion(scene, inst2d, t2d, X[1].reshape(res, res), scene.camera.focal * res)
        out["edge_occlusion"] = edges[None].astype(np.float32)
    if "keypoints2d" in need:
        gray = rgb[0] * LUMA[0]
        gray += rgb[1] * LUMA[1]
        gray += rgb[2] * LUMA[2]
        out["keypoints2d"] = _filters.harris(gray.reshape(res, res))[None]
    if "keypoints3d" in need:
        out["keypoints3d"] = g.kp3.reshape(1, res, res)
    if "reshading" in need:
        # A point light at the camera centre: cos between normal and the reversed ray.
        nd = normal[0] * d[0]
        nd += normal[1] * d[1]
        nd += normal[2] * d[2]
        np.negative(nd, out=nd)
        nd *= nd > 0
        out["reshading"] = nd.reshape(1, res, res)
    if "principal_curvature" in need:
        out["principal_curvature"] = np.stack([g.k1, g.k2]).reshape(2, res, res)
    if "saliency" in need:
        out["saliency"] = (inst2d >= FIRST_OBJECT)[None].astype(np.float32)
    if "parts" in need:
        out["parts"] = g.parts.reshape(res, res)
    return out


def light_terms(scene: Scene, X, normal):
    """``(l, dist, n.l)``: unit directions to the light (a constant vector for
    a directional light, flat arrays for a point light), the distance to a
    point light (None otherwise), and the cosine of incidence, not clipped."""
    light = scene.light
    if light.kind == "point":
        lv = [light.position[i] - X[i] for i in range(3)]
        dist = lv[0] * lv[0]
        dist += lv[1] * lv[1]
        dist += lv[2] * lv[2]
        np.sqrt(dist, out=dist)
        inv = 1 / dist
        for a in lv:
            a *= inv
    else:
        lv, dist = light.direction, None
    ndotl = normal[0] * lv[0]
    ndotl += normal[1] * lv[1]
    ndotl += normal[2] * lv[2]
    return lv, dist, ndotl


def _shade(scene: Scene, X, normal, aid, inst, dy):
    """RGB (3, N): ``albedo * color * (ambient + (1 - ambient) * max(0, n.l)
    * unshadowed)`` on surfaces; a vertical gradient on the sky. (Every
    factor is in [0, 1], so the image is too.)"""
    light = scene.light
    lv, dist, ndotl = light_terms(scene, X, normal)
    lit = ndotl > 0                                  # sky pixels have normal 0: never lit
    ndotl *= lit
    ndotl[_raycast.shadowed(scene, X, lit, inst, lv, dist)] = 0
    ndotl *= np.float32(1 - light.ambient)
    ndotl += np.float32(light.ambient)
    table = scene.albedo_table() * light.color
    rgb = np.empty((3, aid.size), np.float32)
    for c in range(3):
        np.multiply(table[:, c].take(aid), ndotl, out=rgb[c])
    sky = np.flatnonzero(inst == SKY)
    if sky.size:
        m = dy.take(sky)
        np.maximum(m, 0, out=m)
        np.sqrt(m, out=m)
        for c in range(3):
            h, z = scene.sky_horizon[c], scene.sky_zenith[c]
            rgb[c, sky] = m * (z - h) + h
    return rgb


def _occlusion(scene: Scene, inst, t, y, f):
    """Occlusion boundaries between 4-neighbour pixels ``a``, ``b``.

    The room is convex and seen from inside, and each object is convex and
    seen from outside, so nothing occludes itself: a boundary is an
    occlusion only between different instances. It is one when exactly one
    side is sky (infinitely far), or at least one side is an object, unless
    the pair is a *contact* crease: a floor pixel next to a pixel of an
    object resting on the floor whose hit point is within ``CONTACT_PIXELS``
    pixel footprints (``t / f`` metres) of the floor. Objects touch neither
    each other nor the walls, and room surfaces only meet in creases."""
    sky = inst == SKY
    obj = inst >= FIRST_OBJECT
    floor = inst == FLOOR
    # Object pixels low enough to touch the floor (at y = 0), of resting objects.
    low = y * np.float32(f) < np.float32(CONTACT_PIXELS) * t
    low &= obj
    for k, o in enumerate(scene.objects):
        if not o.resting:
            low &= inst != FIRST_OBJECT + k

    def pairs(a, b):
        occ = inst[a] != inst[b]
        occ &= obj[a] | obj[b]
        occ &= ~(sky[a] | sky[b])
        occ &= ~((floor[a] | floor[b]) & (low[a] | low[b]))
        occ |= sky[a] != sky[b]
        return occ

    s = slice(None)
    return _filters.neighbour_edges(pairs((s, slice(1, None)), (s, slice(None, -1))),
                                    pairs((slice(1, None), s), (slice(None, -1), s)))
