"""Vectorised ray casting against the primitives of :mod:`._scene`.

Rays are given as structure-of-arrays: origin ``(ox, oy, oz)`` and unit
direction ``(dx, dy, dz)``, each a float32 array (or a scalar, broadcast), so
one call intersects a whole image, or a block of it, with one primitive.
Every function returns the ray parameter ``t`` of the nearest hit in front
of the origin (``t > EPS``), ``inf`` where the ray misses. With unit
directions ``t`` is the Euclidean distance from the origin to the hit.
"""
from __future__ import annotations

import math

import numpy as np

from ._scene import FIRST_OBJECT, FLOOR, SKY, WALL, Object, Scene, cross

EPS = 1e-4
INF = np.float32(np.inf)


def sphere(o, d, center, r):
    """Nearest hit with the sphere ``|X - center| = r``: the smaller root of
    ``t^2 + 2 b t + c = 0`` with ``b = d . (o - center)``, ``c = |o - center|^2 - r^2``."""
    wx, wy, wz = o[0] - center[0], o[1] - center[1], o[2] - center[2]
    b = wx * d[0] + wy * d[1] + wz * d[2]
    c = wx * wx + wy * wy + wz * wz - np.float32(r * r)
    disc = b * b - c
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
        t[~(t > EPS)] = INF          # also where disc < 0: t is NaN there
    return t


def _to_local(obj: Object, o, d):
    """Ray in the box's own frame (rotation about +y by -yaw, centre at 0)."""
    c, s = np.float32(math.cos(obj.yaw)), np.float32(math.sin(obj.yaw))
    wx, wy, wz = o[0] - obj.center[0], o[1] - obj.center[1], o[2] - obj.center[2]
    ol = (c * wx - s * wz, wy, s * wx + c * wz)
    dl = (c * d[0] - s * d[2], d[1], s * d[0] + c * d[2])
    return ol, dl


def box(o, d, obj: Object):
    """Nearest hit with a box turned by ``yaw`` about +y (slab method in the
    box's frame: the ray is inside all three slabs ``|x_a| <= h_a`` for
    ``t`` in ``[max_a near_a, min_a far_a]``)."""
    ol, dl = _to_local(obj, o, d)
    near = far = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            inv = np.float32(1.0) / dl[a]
            t1 = (-obj.size[a] - ol[a]) * inv
            t2 = (obj.size[a] - ol[a]) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            near = lo if near is None else np.maximum(near, lo)
            far = hi if far is None else np.minimum(far, hi)
        near[~((near <= far) & (near > EPS))] = INF
    return near


def cylinder(o, d, obj: Object, caps: bool = True):
    """Nearest hit with a vertical cylinder of radius ``r`` standing on its
    base centre, ``0 <= y - base_y <= height``: its side and, if ``caps``,
    its top disc. The bottom disc lies on the floor and is never hit by a
    ray from above it; the top disc is hit only by rays going down."""
    r, h = obj.size
    wx, wy, wz = o[0] - obj.center[0], o[1] - obj.center[1], o[2] - obj.center[2]
    a = d[0] * d[0] + d[2] * d[2]
    b = wx * d[0] + wz * d[2]
    c = wx * wx + wz * wz - np.float32(r * r)
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / a
        ys = wy + ts * d[1]
        side = (disc >= 0) & (ts > EPS) & (ys >= 0) & (ys <= h)
        ts[~side] = INF
        if not caps:
            return ts
        tc = (np.float32(h) - wy) / d[1]
        px, pz = wx + tc * d[0], wz + tc * d[2]
        cap = (px * px + pz * pz <= np.float32(r * r)) & (tc > EPS)
        tc[~cap] = INF
    return np.minimum(ts, tc)


def intersect(obj: Object, o, d, caps: bool = True):
    """Nearest hit with ``obj`` (see :func:`sphere`, :func:`box`, :func:`cylinder`)."""
    if obj.kind == "sphere":
        return sphere(o, d, obj.center, obj.size[0])
    if obj.kind == "box":
        return box(o, d, obj)
    return cylinder(o, d, obj, caps)


def room(scene: Scene, o, d):
    """Hits with the room seen from inside: returns ``(t, instance)``.

    The room is convex, so a ray from inside leaves it exactly once: through
    the floor, a wall (the nearer of the x- and z-wall it heads for), or over
    the walls into the sky (instance ``SKY``, ``t = inf``). With the camera
    above the floor the ray meets the floor first exactly when it is below
    the floor where it would leave through the walls."""
    L = np.float32(scene.room_half)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Of the two parallel walls the ray heads for the one at positive t;
        # a direction component of (-)0 gives +inf for both: never hit.
        tw = np.minimum(np.maximum((L - o[0]) / d[0], (-L - o[0]) / d[0]),
                        np.maximum((L - o[2]) / d[2], (-L - o[2]) / d[2]))
        y_exit = o[1] + tw * d[1]
        floor = y_exit < 0
        np.copyto(tw, -o[1] / d[1], where=floor)
    sky = y_exit > np.float32(scene.wall_height)
    tw[sky] = INF
    inst = np.full(tw.shape, WALL, np.uint8)     # (uint8: compared often, read fast)
    inst[floor] = FLOOR
    inst[sky] = SKY
    return tw, inst


def screen_rects(scene: Scene, res: int):
    """Per object, the pixel block ``(r0, r1, c0, c1)`` that contains its
    image: the bounding box of its bounding sphere's image, a pixel wider
    on each side. Along each image axis the extremes are the two planes
    through the camera centre (and the other image axis) tangent to the
    sphere: at angles ``atan2(p_x, p_z) +- asin(R / |(p_x, p_z)|)`` for a
    centre ``p`` in the camera frame. The whole image where such a plane
    would be behind the camera (the sphere reaches around it)."""
    cam = scene.camera
    rot = cam.rot.tolist()
    ox, oy, oz = cam.position.tolist()
    f, c = cam.focal * res, (res - 1) / 2
    rects = []
    for obj in scene.objects:
        bx, by, bz = obj.bound_center.tolist()
        w = (bx - ox, by - oy, bz - oz)
        px, py, pz = (rot[0][k] * w[0] + rot[1][k] * w[1] + rot[2][k] * w[2] for k in range(3))
        R = obj.bound * 1.01 + 1e-3
        ext = []
        for a in (px, py):
            dist = math.hypot(a, pz)
            if dist <= R:
                break
            mid, half = math.atan2(a, pz), math.asin(R / dist)
            if abs(mid) + half >= math.pi / 2 - 1e-3:
                break
            ext.append((f * math.tan(mid - half) + c, f * math.tan(mid + half) + c))
        if len(ext) < 2:
            rects.append((0, res, 0, res))
            continue
        (u0, u1), (v0, v1) = ext
        rects.append((max(math.floor(v0) - 1, 0), min(math.ceil(v1) + 2, res),
                      max(math.floor(u0) - 1, 0), min(math.ceil(u1) + 2, res)))
    return rects


def primary(scene: Scene, d, res: int):
    """Nearest hit of every pixel's ray: ``(t, instance)`` as (res, res)
    arrays; objects are cast only inside their :func:`screen_rects`."""
    o = scene.camera.position
    t, inst = room(scene, o, d)
    for k, (obj, (r0, r1, c0, c1)) in enumerate(zip(scene.objects, screen_rects(scene, res))):
        if r0 >= r1 or c0 >= c1:
            continue
        # A camera below a cylinder's top cannot see its top disc.
        caps = obj.kind != "cylinder" or o[1] > obj.center[1] + obj.size[1]
        tk = intersect(obj, o, tuple(a[r0:r1, c0:c1] for a in d), caps)
        closer = tk < t[r0:r1, c0:c1]
        np.copyto(t[r0:r1, c0:c1], tk, where=closer)
        inst[r0:r1, c0:c1][closer] = FIRST_OBJECT + k
    return t, inst


def shadowed(scene: Scene, X, lit, inst, ldir, dist):
    """Indices of the pixels whose segment from the surface point ``X`` (a
    tuple of three flat arrays) towards the light hits an object. ``lit``
    (bool) marks the pixels to test; ``ldir`` are unit directions to the
    light (constants for a directional light; for a point light flat arrays,
    and ``dist`` its distance). The room casts no shadows: the light is inside
    it, above the floor.

    Each object is intersected only with the rays that pass within its
    bounding sphere, tested in the light's frame: for a directional light
    by the distance of ``X`` from the sphere's axis along the light; for a
    point light by the angle at the light between ``X`` and the centre. Only
    that test runs on every pixel; the rest narrow the few candidates: an
    unlit or already shadowed point, a point beyond the sphere seen from the
    light, or a point on the object itself (a convex object never shadows
    its own lit side). Rays start on the surface itself: with the object it
    starts on excluded, no other surface passes through the start."""
    hit = np.zeros(X[0].shape, bool)
    light = scene.light
    directional = light.kind == "directional"
    if directional:
        lx = np.asarray(ldir, np.float64)
        e1 = cross(lx, (0.0, 1.0, 0.0) if abs(lx[1]) < 0.9 else (1.0, 0.0, 0.0))
        e1 /= math.sqrt(e1 @ e1)
        e2 = cross(lx, e1)
        q = []
        for e in (e1, e2):
            a = X[0] * np.float32(e[0])
            a += X[1] * np.float32(e[1])
            a += X[2] * np.float32(e[2])
            q.append(a)
    found = []
    for k, obj in enumerate(scene.objects):
        bc, R = obj.bound_center.astype(np.float64), obj.bound
        if directional:
            a1, a2 = q[0] - np.float32(e1 @ bc), q[1] - np.float32(e2 @ bc)
            a1 *= a1
            a2 *= a2
            a1 += a2
            idx = np.flatnonzero(a1 < np.float32(R * R))
        else:
            v = bc - light.position
            D = math.sqrt(v @ v)
            v /= D
            # cos of the angle at the light between the point and the centre.
            cosang = ldir[0] * np.float32(-v[0])
            cosang += ldir[1] * np.float32(-v[1])
            cosang += ldir[2] * np.float32(-v[2])
            idx = np.flatnonzero(cosang > np.float32(math.sqrt(max(0.0, 1 - (R / D) ** 2)) if D > R else -1.0))
        if idx.size == 0:
            continue
        keep = lit.take(idx)
        keep &= inst.take(idx) != FIRST_OBJECT + k
        keep &= ~hit.take(idx)
        idx = idx[keep]
        oi = tuple(a.take(idx) for a in X)
        if directional:
            # Distance along the light from the centre's plane (negative: below it).
            along = oi[0] * np.float32(lx[0])
            along += oi[1] * np.float32(lx[1])
            along += oi[2] * np.float32(lx[2])
            along -= np.float32(lx @ bc)
        else:
            dk = dist.take(idx)
        if obj.kind == "sphere":
            # The bounding sphere is the object: the prefilter found the rays
            # whose line meets it; the segment does if the sphere lies ahead
            # (directional) or before the light (point: the entry point,
            # ``D cos - sqrt(R^2 - D^2 sin^2)`` from the light, is nearer to
            # it than the surface point, which lies outside the sphere).
            if directional:
                idx = idx[along < 0]
            else:
                c = cosang.take(idx).astype(np.float64)
                entry = D * c - np.sqrt(np.maximum(R * R - D * D * (1 - c * c), 0))
                idx = idx[dk > entry]
        else:
            keep = along < np.float32(R) if directional else dk > np.float32(D - R)
            if not keep.all():
                idx = idx[keep]
                oi = tuple(a[keep] for a in oi)
            if idx.size == 0:
                continue
            di = tuple(ldir) if directional else tuple(a.take(idx) for a in ldir)
            # Rays to the light go up (it is above every object), so they can
            # only enter a cylinder through its side.
            ti = intersect(obj, oi, di, caps=False)
            idx = idx[ti < (INF if directional else dist.take(idx))]
        hit[idx] = True
        found.append(idx)
    return np.concatenate(found) if found else np.zeros(0, np.intp)
