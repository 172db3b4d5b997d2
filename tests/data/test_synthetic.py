"""SyntheticScenes: labels against the scene geometry, determinism, cache, arguments.

The oracles rebuild every pixel's 3-D point from the sample's own depth and
camera (``meta``) with float64 numpy, and compare it with the analytic scene
that ``SyntheticScenes.scene(i)`` describes: the generator's labels must be
consistent with geometry computed independently of the renderer.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastdense.data import SyntheticScenes
from fastdense.data import _raycast, _render, _scene

RES = 96
N = 8
CLS = {name: i for i, name in enumerate(SyntheticScenes.CLASSES)}
PART = {name: i for i, name in enumerate(SyntheticScenes.PARTS)}


@pytest.fixture(scope="module")
def ds():
    return SyntheticScenes(N, resolution=RES, seed=3)


@pytest.fixture(scope="module")
def samples(ds):
    return [ds[i] for i in range(N)]


def np_sample(s):
    return {k: v.numpy().astype(np.float64) if k != "meta" else {m: t.numpy() for m, t in v.items()}
            for k, v in s.items()}


def rays_cam(meta, res):
    """Unit camera-frame ray of every pixel, (H, W, 3): K^-1 (j, i, 1), normalised."""
    K = meta["intrinsics"].astype(np.float64)
    i, j = np.mgrid[:res, :res].astype(np.float64)
    d = np.stack([(j - K[0, 2]) / K[0, 0], (i - K[1, 2]) / K[1, 1], np.ones_like(i)], -1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def world_points(s, res):
    """(H, W, 3) world points from depth_euclidean, K and cam_to_world; and the pose."""
    m = s["meta"]
    T = m["cam_to_world"].astype(np.float64)
    d = rays_cam(m, res) * s["depth_euclidean"][0][..., None]
    return d @ T[:3, :3].T + T[:3, 3], T


def surface_distance(obj, X):
    """Distance of points X (n, 3) from the surface of ``obj`` (float64, analytic)."""
    c = obj.center.astype(np.float64)
    if obj.kind == "sphere":
        return np.abs(np.linalg.norm(X - c, axis=1) - obj.size[0])
    if obj.kind == "box":
        ca, sa = math.cos(obj.yaw), math.sin(obj.yaw)
        w = X - c
        local = np.stack([ca * w[:, 0] - sa * w[:, 2], w[:, 1], sa * w[:, 0] + ca * w[:, 2]], 1)
        q = np.abs(local) - obj.size.astype(np.float64)
        # Signed distance of a box: outside part + inside part.
        outside = np.linalg.norm(np.maximum(q, 0), axis=1)
        return np.abs(outside + np.minimum(q.max(1), 0))
    r, h = obj.size.astype(np.float64)
    w = X - c
    rho = np.hypot(w[:, 0], w[:, 2])
    side = np.where((w[:, 1] >= 0) & (w[:, 1] <= h), np.abs(rho - r), np.inf)
    cap = np.where(rho <= r, np.abs(w[:, 1] - h), np.inf)
    return np.minimum(side, cap)


def owner(scene, X, kind):
    """Index (into scene.objects) of the ``kind`` object whose surface is nearest each point."""
    ks = [k for k, o in enumerate(scene.objects) if o.kind == kind]
    dist = np.stack([surface_distance(scene.objects[k], X) for k in ks], 1)
    return np.array(ks)[dist.argmin(1)], dist.min(1)


# --- structure ---------------------------------------------------------------------


def test_keys_shapes_dtypes(samples):
    s = samples[0]
    assert set(s) == {"image", "meta", *SyntheticScenes.TASKS}
    H = RES
    expect = {"image": (3, H, H), "semseg": (H, H), "normal": (3, H, H), "depth_euclidean": (1, H, H),
              "depth_zbuffer": (1, H, H), "edge_texture": (1, H, H), "edge_occlusion": (1, H, H),
              "keypoints2d": (1, H, H), "keypoints3d": (1, H, H), "reshading": (1, H, H),
              "principal_curvature": (2, H, H), "saliency": (1, H, H), "parts": (H, H)}
    assert {k: tuple(v.shape) for k, v in s.items() if k != "meta"} == expect
    for k, v in s.items():
        if k != "meta":
            assert v.dtype == (torch.int64 if k in ("semseg", "parts") else torch.float32), k
            assert v.is_contiguous(), k
    assert s["meta"]["intrinsics"].shape == (3, 3) and s["meta"]["cam_to_world"].shape == (4, 4)
    assert int(s["meta"]["index"]) == 0
    for s in samples:
        img = s["image"]
        assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.02
        for k in ("edge_texture", "edge_occlusion", "saliency"):
            assert set(s[k].unique().tolist()) <= {0.0, 1.0}
        assert 0 <= s["semseg"].min() and s["semseg"].max() < len(SyntheticScenes.CLASSES)
        assert 0 <= s["parts"].min() and s["parts"].max() < len(SyntheticScenes.PARTS)


def test_intrinsics_follow_the_resolution():
    scene_a = SyntheticScenes(2, resolution=64, seed=1)
    scene_b = SyntheticScenes(2, resolution=200, seed=1)
    Ka, Kb = scene_a[1]["meta"]["intrinsics"], scene_b[1]["meta"]["intrinsics"]
    # fx scales with the width; the principal point is the image centre in pixel-centre coordinates.
    assert Ka[0, 0] / 64 == pytest.approx(float(Kb[0, 0]) / 200, rel=1e-5)
    assert float(Ka[0, 2]) == pytest.approx(31.5) and float(Kb[1, 2]) == pytest.approx(99.5)
    assert torch.equal(scene_a[1]["meta"]["cam_to_world"], scene_b[1]["meta"]["cam_to_world"])


# --- geometry ------------------------------------------------------------------------


def test_normals_unit_and_facing_the_camera(samples):
    for s in map(np_sample, samples):
        n = s["normal"].transpose(1, 2, 0)
        valid = s["semseg"] > 0
        assert np.allclose(np.linalg.norm(n[valid], axis=1), 1, atol=1e-5)
        assert np.all(n[~valid] == 0)
        # Seen from the camera, every visible surface faces it.
        facing = (n * rays_cam(s["meta"], RES)).sum(-1)
        assert facing[valid].max() < 1e-3


def test_depths(samples):
    for s in map(np_sample, samples):
        e, z = s["depth_euclidean"][0], s["depth_zbuffer"][0]
        valid = s["semseg"] > 0
        assert np.all(e[valid] > 0) and np.all(e[~valid] == 0) and np.all(z[~valid] == 0)
        assert np.all(z <= e + 1e-6)
        cos = rays_cam(s["meta"], RES)[..., 2]
        assert np.allclose(z, e * cos, rtol=1e-5, atol=1e-6)
        # The camera frame's z axis is the third column of cam_to_world: z = (X - C) . axis.
        X, T = world_points(s, RES)
        assert np.allclose(((X - T[:3, 3]) @ T[:3, 2])[valid], z[valid], rtol=1e-5, atol=1e-5)


def test_semseg_and_normals_match_the_scene_geometry(ds, samples):
    seen = set()
    for i, s in enumerate(map(np_sample, samples)):
        scene = ds.scene(i)
        X, T = world_points(s, RES)
        R = T[:3, :3]
        seg = s["semseg"]
        n_world = s["normal"].transpose(1, 2, 0) @ R.T
        L = scene.room_half
        floor, wall = seg == CLS["floor"], seg == CLS["wall"]
        assert np.allclose(X[floor][:, 1], 0, atol=2e-3)
        assert np.allclose(n_world[floor], [0, 1, 0], atol=1e-5)
        on_wall = np.maximum(np.abs(X[wall][:, 0]), np.abs(X[wall][:, 2]))
        assert np.allclose(on_wall, L, atol=2e-3)
        assert np.all(X[wall][:, 1] <= scene.wall_height + 1e-3)
        # Wall normals point into the room, along the axis of the wall.
        assert np.allclose((n_world[wall] * X[wall]).sum(1), -on_wall, atol=3e-3)
        # Sky: rays that leave the room over the walls.
        sky = seg == 0
        if sky.any():
            d = (rays_cam(s["meta"], RES) @ R.T)[sky]
            C = T[:3, 3]
            with np.errstate(divide="ignore"):
                tx = np.maximum((L - C[0]) / d[:, 0], (-L - C[0]) / d[:, 0])
                tz = np.maximum((L - C[2]) / d[:, 2], (-L - C[2]) / d[:, 2])
            assert np.all(C[1] + np.minimum(tx, tz) * d[:, 1] > scene.wall_height - 1e-3)
        for kind in ("sphere", "box", "cylinder"):
            m = seg == CLS[kind]
            if not m.any():
                continue
            seen.add(kind)
            k, dist = owner(scene, X[m], kind)
            assert dist.max() < 5e-3, (i, kind, dist.max())
            if kind == "sphere":
                centers = np.array([o.center for o in scene.objects], np.float64)[k]
                radii = np.array([o.size[0] for o in scene.objects], np.float64)[k]
                assert np.allclose(n_world[m], (X[m] - centers) / radii[:, None], atol=1e-2)
        # No object pixel belongs to a room class and vice versa: points on an
        # object's surface are far from the floor and walls unless at contact.
        objects = seg >= CLS["sphere"]
        assert np.all(np.abs(np.maximum(np.abs(X[objects][:, 0]), np.abs(X[objects][:, 2])) - L) > 0.5)
    assert seen == {"sphere", "box", "cylinder"}


def test_principal_curvature(ds, samples):
    for i, s in enumerate(map(np_sample, samples)):
        scene = ds.scene(i)
        X, _ = world_points(s, RES)
        k1, k2 = s["principal_curvature"]
        seg = s["semseg"]
        assert np.all(k1 >= k2)
        planes = np.isin(seg, [0, CLS["floor"], CLS["wall"], CLS["box"]])
        assert np.all(k1[planes] == 0) and np.all(k2[planes] == 0)
        m = seg == CLS["sphere"]
        if m.any():
            k, _ = owner(scene, X[m], "sphere")
            r = np.array([o.size[0] for o in scene.objects])[k]
            assert np.allclose(k1[m], 1 / r, rtol=1e-6) and np.allclose(k2[m], 1 / r, rtol=1e-6)
        m = seg == CLS["cylinder"]
        if m.any():
            k, _ = owner(scene, X[m], "cylinder")
            r = np.array([o.size[0] for o in scene.objects])[k]
            top = s["parts"][m] == PART["cylinder_top"]
            assert np.allclose(k1[m][~top], 1 / r[~top], rtol=1e-6) and np.all(k1[m][top] == 0)
            assert np.all(k2[m] == 0)


def test_saliency_and_parts(ds, samples):
    for i, s in enumerate(map(np_sample, samples)):
        scene = ds.scene(i)
        seg, parts = s["semseg"], s["parts"]
        objects = np.isin(seg, [CLS["sphere"], CLS["box"], CLS["cylinder"]])
        assert np.array_equal(s["saliency"][0] == 1, objects)
        assert np.array_equal(parts > 0, objects)
        X, T = world_points(s, RES)
        n_up = (s["normal"].transpose(1, 2, 0) @ T[:3, :3].T)[..., 1]
        for kind, names in (("sphere", ("sphere_upper", "sphere_lower")), ("box", ("box_top", "box_side")),
                            ("cylinder", ("cylinder_top", "cylinder_side"))):
            m = seg == CLS[kind]
            assert set(np.unique(parts[m])) <= {PART[n] for n in names}
            if not m.any():
                continue
            if kind == "sphere":
                k, _ = owner(scene, X[m], "sphere")
                cy = np.array([o.center[1] for o in scene.objects], np.float64)[k]
                upper = parts[m] == PART["sphere_upper"]
                # Pixels within rounding of the equator may go either way.
                clear = np.abs(X[m][:, 1] - cy) > 1e-3
                assert np.array_equal(upper[clear], (X[m][:, 1] > cy)[clear])
            else:
                # Top faces and discs are the ones whose normal points up.
                top = parts[m] == PART[names[0]]
                assert np.array_equal(top, n_up[m] > 0.5)


def test_reshading_is_the_headlight_cosine(samples):
    for s in map(np_sample, samples):
        n = s["normal"].transpose(1, 2, 0)
        expect = np.maximum(-(n * rays_cam(s["meta"], RES)).sum(-1), 0)
        assert np.allclose(s["reshading"][0], expect, atol=1e-5)


def test_shadows_match_brute_force():
    """The shadow test (bounding-sphere prefilter, analytic spheres) against
    casting every lit pixel's segment to the light at every other object."""
    kinds = set()
    for index in range(12):
        scene = _scene.sample_scene(4, index)
        kinds.add(scene.light.kind)
        g = _render.surfaces(scene, 80, ())
        lv, dist, ndotl = _render.light_terms(scene, g.X, g.normal)
        lit = ndotl > 0
        inst = g.inst.ravel()
        fast = np.zeros(inst.size, bool)
        fast[_raycast.shadowed(scene, g.X, lit, inst, lv, dist)] = True
        brute = np.zeros(inst.size, bool)
        for k, obj in enumerate(scene.objects):
            idx = np.flatnonzero(lit & (inst != _scene.FIRST_OBJECT + k))
            ldir = tuple(a[idx] for a in lv) if dist is not None else tuple(lv)
            t = _raycast.intersect(obj, tuple(a[idx] for a in g.X), ldir)
            brute[idx[t < (dist[idx] if dist is not None else np.inf)]] = True
        assert brute.any()
        # Rays grazing a sphere may round either way; nothing else may differ.
        assert np.sum(fast != brute) <= 2, (index, np.sum(fast != brute), brute.sum())
        assert not np.any(fast & ~lit)
    assert kinds == {"point", "directional"}


def test_image_is_shaded_albedo():
    """Lit, unshadowed surface pixels of one colour get brighter with n . l,
    exactly by (ambient + (1 - ambient) n.l) * colour * albedo."""
    scene = _scene.sample_scene(4, 1)
    g = _render.surfaces(scene, 80, ())
    rgb = _render.render(scene, 80, ())["image"].reshape(3, -1)
    _, _, ndotl = _render.light_terms(scene, g.X, g.normal)
    light = scene.light
    albedo = scene.albedo_table()[g.aid].T * light.color[:, None]
    inst = g.inst.ravel()
    shade = np.where(inst > 0, light.ambient + (1 - light.ambient) * np.maximum(ndotl, 0), 0)
    lit_here = np.abs(rgb - albedo * shade).max(0) < 1e-5
    in_shadow = np.abs(rgb - albedo * light.ambient).max(0) < 1e-5
    # Every surface pixel is either lit as Lambert says or in shadow (ambient only).
    assert np.all((lit_here | in_shadow)[inst > 0])
    assert lit_here[inst > 0].mean() > 0.5


# --- edges and keypoints -------------------------------------------------------------


def pairs(a):
    """(values of the left/top pixel, values of the right/bottom pixel) for every
    horizontal and vertical 4-neighbour pair, each flattened."""
    return (np.concatenate([a[:, :-1].ravel(), a[:-1, :].ravel()]),
            np.concatenate([a[:, 1:].ravel(), a[1:, :].ravel()]))


def pair_index(res):
    idx = np.arange(res * res).reshape(res, res)
    return pairs(idx)


def all_neighbours(ok, ia, ib):
    """Pixels where ``ok`` (one value per pair) holds for every 4-neighbour pair the pixel is in."""
    out = np.ones(max(ia.max(), ib.max()) + 1, bool)
    np.logical_and.at(out, ia, ok)
    np.logical_and.at(out, ib, ok)
    return out


def test_occlusion_edges_are_depth_discontinuities(ds, samples):
    ia, ib = pair_index(RES)
    for i, s in enumerate(map(np_sample, samples)):
        edge = s["edge_occlusion"][0].ravel() == 1
        depth = s["depth_euclidean"][0].ravel()
        seg = s["semseg"].ravel()
        f = s["meta"]["intrinsics"][0, 0]
        da, db = depth[ia], depth[ib]
        sky_pair = (seg[ia] == 0) != (seg[ib] == 0)
        both = (seg[ia] > 0) & (seg[ib] > 0)
        gap = np.abs(da - db)
        # Every edge pixel has a neighbour across a jump of more than one pixel
        # footprint (depth / f metres), or across the border of the sky.
        jump = sky_pair | (both & (gap > np.minimum(da, db) / f))
        has_jump = np.zeros(depth.size, bool)
        has_jump[ia[jump]] = True
        has_jump[ib[jump]] = True
        assert np.all(has_jump[edge])
        # Every large jump between different classes (or at the sky's border) is
        # marked on both sides. (Within one object a large jump across a pixel
        # can be a surface seen at a grazing angle, e.g. a cylinder's top disc
        # from just above it: continuous, not an occlusion.)
        big = sky_pair | (both & (seg[ia] != seg[ib]) & (gap > 0.2 * np.minimum(da, db)))
        assert big.any()
        assert np.all(edge[ia[big]]) and np.all(edge[ib[big]])
        # Floor and walls meet in creases: no edge where only room surfaces meet.
        room = (seg == CLS["floor"]) | (seg == CLS["wall"])
        assert not np.any(edge[all_neighbours(room[ia] & room[ib], ia, ib)])
        # Nothing occludes itself: no edge inside a region of one instance (sky,
        # floor, walls, or an object whose class has a single instance).
        counts = np.bincount([CLS[o.kind] for o in ds.scene(i).objects], minlength=len(CLS))
        single = [c for c in range(len(CLS)) if c < CLS["sphere"] or counts[c] == 1]
        inside = all_neighbours((seg[ia] == seg[ib]) & np.isin(seg[ia], single), ia, ib)
        assert inside.sum() > 0.5 * depth.size
        assert not np.any(edge[inside])


def test_occlusion_edges_outline_objects(ds, samples):
    """The silhouette of a sphere against a far background is an occlusion edge."""
    found = 0
    for _i, s in enumerate(map(np_sample, samples)):
        seg, edge = s["semseg"], s["edge_occlusion"][0] == 1
        sphere = seg == CLS["sphere"]
        # Sphere pixels whose right neighbour is sky or a wall (walls are metres away).
        m = sphere[:, :-1] & ((seg[:, 1:] == 0) | (seg[:, 1:] == CLS["wall"]))
        found += m.sum()
        assert np.all(edge[:, :-1][m]) and np.all(edge[:, 1:][m])
    assert found > 0


def test_texture_edges(ds, samples):
    ia, ib = pair_index(RES)
    saw_floor_edges = checked_plain = textured_inside = 0
    for i, s in enumerate(map(np_sample, samples)):
        scene = ds.scene(i)
        seg = s["semseg"].ravel()
        edge = s["edge_texture"][0].ravel() == 1
        # Different classes have different materials: every class border is a texture edge.
        border = seg[ia] != seg[ib]
        assert np.all(edge[ia[border]]) and np.all(edge[ib[border]])
        # Inside the floor, edges exist exactly when the floor is textured.
        floor = seg == CLS["floor"]
        inner = all_neighbours(floor[ia] & floor[ib], ia, ib)
        if scene.materials[1].texture.kind == "plain":
            assert not np.any(edge[inner])
        saw_floor_edges += np.any(edge[inner])
        # Each object pixel belongs to the object whose surface its 3-D point
        # is on. Inside a plainly textured object's image there are no
        # texture edges; inside textured ones there are.
        X, _ = world_points(s, RES)
        objects = np.flatnonzero(seg >= CLS["sphere"])
        dist = np.stack([surface_distance(o, X.reshape(-1, 3)[objects]) for o in scene.objects], 1)
        assert dist.min(1).max() < 5e-3
        own = np.full(seg.size, -1)
        own[objects] = dist.argmin(1)
        for k, obj in enumerate(scene.objects):
            inside = all_neighbours((own[ia] == k) & (own[ib] == k), ia, ib)
            if scene.materials[obj.material].texture.kind == "plain":
                checked_plain += inside.any()
                assert not np.any(edge[inside])
            else:
                textured_inside += np.any(edge[inside])
    assert saw_floor_edges and checked_plain and textured_inside


def test_keypoints2d_is_harris_of_the_image(samples):
    s = np_sample(samples[1])
    gray = s["image"].transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114])
    ix, iy = np.zeros_like(gray), np.zeros_like(gray)
    ix[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    iy[1:-1] = gray[2:] - gray[:-2]
    b = np.array([1, 4, 6, 4, 1]) / 16
    W = np.outer(b, b)
    M = np.zeros((3,) + gray.shape)
    for c, a in enumerate((ix * ix, iy * iy, ix * iy)):
        for i in range(2, RES - 2):
            for j in range(2, RES - 2):
                M[c, i, j] = (W * a[i - 2:i + 3, j - 2:j + 3]).sum()
    r = M[0] * M[1] - M[2] ** 2 - 0.05 * (M[0] + M[1]) ** 2
    r[:3], r[-3:], r[:, :3], r[:, -3:] = 0, 0, 0, 0
    r = np.maximum(r, 0)
    r /= r.max()
    assert np.allclose(s["keypoints2d"][0], r, atol=2e-4)
    assert s["keypoints2d"].max() == 1


def test_keypoints3d_at_visible_corners(ds, samples):
    hits = 0
    for i, s in enumerate(map(np_sample, samples)):
        scene = ds.scene(i)
        kp = s["keypoints3d"][0]
        seg = s["semseg"]
        assert kp.min() >= 0 and kp.max() <= 1
        assert np.all(kp[np.isin(seg, [0, CLS["floor"], CLS["wall"], CLS["sphere"]])] == 0)
        X, T = world_points(s, RES)
        K = s["meta"]["intrinsics"].astype(np.float64)
        for obj in scene.objects:
            if obj.kind != "box":
                continue
            rot = obj.rot.astype(np.float64)
            signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
            corners = (signs * obj.size) @ rot.T + obj.center
            cam = (corners - T[:3, 3]) @ T[:3, :3]
            for p_world, p in zip(corners, cam):
                u, v = K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]
                j, ii = int(round(u)), int(round(v))
                if not (0 <= ii < RES and 0 <= j < RES) or seg[ii, j] != CLS["box"]:
                    continue
                # Visible: the pixel's 3-D point is the corner itself (within a footprint).
                d = np.linalg.norm(X[ii, j] - p_world)
                if d < 0.03:
                    hits += 1
                    # The nearest corner is at most d away.
                    assert kp[ii, j] >= math.exp(-d ** 2 / (2 * 0.1 ** 2)) - 1e-3
    assert hits > 0


# --- determinism, tasks, cache, arguments ---------------------------------------------


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "meta":
            assert_same(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


def test_determinism_by_seed_and_order():
    a = SyntheticScenes(6, resolution=64, seed=11)
    b = SyntheticScenes(6, resolution=64, seed=11)
    c = SyntheticScenes(6, resolution=64, seed=12)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert_same(x, y)
    assert_same(a[-1], forward[5])
    for x, y in zip(forward, (c[i] for i in range(6))):
        assert not torch.equal(x["image"], y["image"])
    # Different indices are different scenes.
    assert not torch.equal(forward[0]["image"], forward[1]["image"])


def test_task_subset_equals_full(samples):
    sub = SyntheticScenes(N, resolution=RES, seed=3, tasks=["parts", "depth_zbuffer", "keypoints2d"])
    assert sub.tasks == ("parts", "depth_zbuffer", "keypoints2d")
    s = sub[2]
    assert set(s) == {"image", "meta", "parts", "depth_zbuffer", "keypoints2d"}
    for k in s:
        if k != "meta":
            assert torch.equal(s[k], samples[2][k]), k
    assert SyntheticScenes(1, tasks=["normal", "normal"]).tasks == ("normal",)


def test_cache_round_trip(tmp_path, samples, monkeypatch):
    cached = SyntheticScenes(N, resolution=RES, seed=3, cache_dir=tmp_path)
    first = cached[4]
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["0000004.npz"]                     # no temporaries left behind
    assert_same(first, samples[4])

    # The second read comes from the file: rendering is not called again.
    def fail(*a, **k):
        raise AssertionError("rendered although cached")

    monkeypatch.setattr(_render, "render", fail)
    assert_same(cached[4], samples[4])
    sub = SyntheticScenes(N, resolution=RES, seed=3, tasks=["normal"], cache_dir=tmp_path)
    s = sub[4]
    assert set(s) == {"image", "meta", "normal"} and torch.equal(s["normal"], samples[4]["normal"])
    monkeypatch.undo()

    # A damaged file is regenerated and rewritten.
    path = next(tmp_path.rglob("*.npz"))
    path.write_bytes(b"not a zip file")
    assert_same(cached[4], samples[4])
    assert path.stat().st_size > 1000
    # Another resolution or seed does not read this sample.
    other = SyntheticScenes(N, resolution=64, seed=3, cache_dir=tmp_path)
    assert other[4]["image"].shape == (3, 64, 64)
    assert len(list(tmp_path.rglob("*.npz"))) == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(resolution=63), ValueError, r"resolution must be in \[64, 448\]"),
    (dict(resolution=449), ValueError, r"resolution must be in \[64, 448\]"),
    (dict(resolution=128.0), TypeError, "resolution must be an int"),
    (dict(resolution=True), TypeError, "resolution must be an int"),
    (dict(num_samples=-1), ValueError, "num_samples must be >= 0"),
    (dict(seed=-3), ValueError, "seed must be >= 0"),
    (dict(tasks=["depth", "normal"]), ValueError, "unknown task.*'depth'.*valid tasks are: semseg, normal"),
    (dict(tasks="normal"), TypeError, "not a string"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(num_samples=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SyntheticScenes(**args)


def test_bad_index():
    ds = SyntheticScenes(3, resolution=64)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    with pytest.raises(TypeError):
        ds[1.0]


@pytest.mark.parametrize("res", [64, 97, 448])
def test_any_resolution(res):
    s = SyntheticScenes(1, resolution=res, seed=5, tasks=["semseg", "normal"])[0]
    assert s["image"].shape == (3, res, res) and s["semseg"].shape == (res, res)
    assert float(s["meta"]["intrinsics"][0, 2]) == pytest.approx((res - 1) / 2)


def test_dataloader_workers_match_single_process():
    ds = SyntheticScenes(8, resolution=64, seed=7)
    single = list(DataLoader(ds, batch_size=4, num_workers=0))
    multi = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(single) == len(multi) == 2
    for a, b in zip(single, multi):
        assert_same(a, b)
    assert torch.equal(single[1]["meta"]["index"], torch.arange(4, 8))
