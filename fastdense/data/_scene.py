"""Random scene descriptions for :class:`fastdense.data.SyntheticScenes`.

World frame: right-handed, metres, ``+y`` up. The floor is the plane ``y = 0``;
four walls stand on it at ``x = +-L`` and ``z = +-L`` (``L`` = ``room_half``),
``wall_height`` tall, with no ceiling, so rays that leave over the walls see
the sky. Objects stand inside the disc of radius ``PLACE_RADIUS`` around the
origin, never touching each other or a wall; boxes and cylinders rest on the
floor, spheres rest on it or float above it. The camera stands between the
objects and the walls and looks at a point near the origin.

Everything here is drawn from one ``numpy.random.Generator`` seeded with
``(seed, index)``, so a scene depends on nothing but those two numbers.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

# Instance ids in the per-pixel instance map: 0 sky, then the room, then objects.
# All four walls are one instance (their creases are not occlusions), and
# objects come last, so "instance >= FIRST_OBJECT" means "object".
SKY, FLOOR, WALL, FIRST_OBJECT = 0, 1, 2, 3

# Materials: 0 sky, 1 floor, 2 all four walls (one wallpaper), 3.. one per object.
MAT_SKY, MAT_FLOOR, MAT_WALL = 0, 1, 2
MAX_LABELS = 4                   # texture labels per material; albedo id = mat * 4 + label

PLACE_RADIUS = 2.6               # objects' footprints stay inside this disc
GAP = 0.15                       # minimum clearance between two objects' footprints
TEXTURES = ("plain", "stripes", "checker", "blobs")


@dataclasses.dataclass
class Texture:
    """A solid (3-D) texture: a function from object-local points to labels.

    ``stripes``: ``floor((X + offset) . direction / period) mod n``;
    ``checker``: parity of the sum of ``floor((X + offset) / period)`` over
    the three axes (2 labels); ``blobs``: the sum of three random plane waves
    ``sin(X . w_k + phi_k)`` thresholded at ``levels`` (smooth, curvy regions
    with sharp borders); ``plain``: label 0 everywhere. The random offset keeps
    flat faces (constant coordinate) away from cell borders, where rounding
    noise would otherwise flip labels pixel by pixel.
    """

    kind: str
    period: float = 1.0
    direction: tuple = (0.0, 0.0, 0.0)      # unit vector (stripes)
    offset: tuple = (0.0, 0.0, 0.0)
    waves: tuple = ()                       # three wave vectors (blobs), rad / m
    phases: tuple = ()
    levels: tuple = ()                      # n_labels - 1 increasing thresholds (blobs)
    n_labels: int = 1

    def labels(self, x, y, z):
        """Texture labels (int32, in ``[0, n_labels)``) of local points ``(x, y, z)``."""
        if self.kind == "plain":
            return np.zeros(np.shape(x), np.int32)
        ox, oy, oz = self.offset
        f32 = np.float32
        if self.kind == "stripes":
            d = [c / self.period for c in self.direction]
            s = x * f32(d[0])
            s += y * f32(d[1])
            s += z * f32(d[2])
            s += f32(ox * d[0] + oy * d[1] + oz * d[2])
            np.floor(s, out=s)
            # floor(s) mod n in floats: integer % is much slower than float ops.
            # Division (not a reciprocal) is exact on multiples of n.
            q = s / np.float32(self.n_labels)
            np.floor(q, out=q)
            q *= np.float32(self.n_labels)
            s -= q
            return s.astype(np.int32)
        if self.kind == "checker":
            inv = f32(1 / self.period)
            s = np.floor((x + f32(ox)) * inv)
            s += np.floor((y + f32(oy)) * inv)
            s += np.floor((z + f32(oz)) * inv)
            return s.astype(np.int32) & 1
        # blobs
        w, p = self.waves, self.phases
        s = np.zeros(np.shape(x), np.float32)
        for (wx, wy, wz), ph in zip(w, p):
            a = x * f32(wx)
            a += y * f32(wy)
            a += z * f32(wz)
            a += f32(ph)
            s += np.sin(a, out=a)
        lab = (s > f32(self.levels[0])).astype(np.int32)
        for level in self.levels[1:]:
            lab += s > f32(level)
        return lab


@dataclasses.dataclass
class Material:
    texture: Texture
    colors: np.ndarray           # (n_labels, 3) float32 RGB albedo in [0, 1]


@dataclasses.dataclass
class Object:
    """A sphere, box or cylinder; all dimensions in metres.

    ``center``: sphere centre; box centre; cylinder *base* centre (the centre
    of its bottom disc, on the floor). ``size``: sphere ``(r,)``; box half
    extents ``(hx, hy, hz)`` in its own frame; cylinder ``(r, height)``.
    ``yaw``: the box's rotation about the world ``+y`` axis (0 for an
    axis-aligned box; unused otherwise); the box frame is
    ``local = R_y(yaw)^T (world - center)``. ``resting``: touches the floor.
    Derived: ``bound``, the radius of a sphere about ``bound_center`` that
    contains the object, and ``footprint``, the radius of a vertical
    cylinder about the centre that contains it.
    """

    kind: str
    center: np.ndarray
    size: np.ndarray
    yaw: float
    material: int
    resting: bool
    bound_center: np.ndarray = dataclasses.field(init=False, repr=False)
    bound: float = dataclasses.field(init=False, repr=False)
    footprint: float = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.center = np.asarray(self.center, np.float32)
        self.size = np.asarray(self.size, np.float32)
        self.footprint = footprint(self.kind, self.size)
        self.bound_center = self.center.copy()
        if self.kind == "sphere":
            self.bound = float(self.size[0])
        elif self.kind == "box":
            self.bound = math.sqrt(sum(float(h) ** 2 for h in self.size))
        else:
            self.bound_center[1] += self.size[1] / 2
            self.bound = math.hypot(self.size[0], self.size[1] / 2)

    @property
    def rot(self) -> np.ndarray:
        """World-from-local rotation (about +y by ``yaw``)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float32)


def footprint(kind, size) -> float:
    if kind == "box":
        return math.hypot(size[0], size[2])
    return float(size[0])


@dataclasses.dataclass
class Camera:
    """Pinhole camera. ``rot``'s columns are the camera axes in world
    coordinates (OpenCV convention: x right, y down, z forward), so a
    camera-frame vector ``v`` is ``rot @ v`` in the world. ``focal`` is in
    units of the image width: ``fx = fy = focal * resolution``."""

    position: np.ndarray
    rot: np.ndarray
    focal: float


@dataclasses.dataclass
class Light:
    """``kind`` "point" (``position``) or "directional" (``direction``, unit,
    pointing *towards* the light). Shading is ``albedo * color * (ambient +
    (1 - ambient) * max(0, n . l) * unshadowed)``."""

    kind: str
    position: np.ndarray
    direction: np.ndarray
    color: np.ndarray
    ambient: float


@dataclasses.dataclass
class Scene:
    """Walls at ``x = +-room_half`` and ``z = +-room_half``, ``wall_height``
    tall; ``materials[m]`` belongs to material id ``m`` (0 sky, 1 floor, 2
    walls, then ``objects[k].material``). The sky's colour blends from
    ``sky_horizon`` to ``sky_zenith`` with ``sqrt(max(0, ray_y))``."""

    room_half: float
    wall_height: float
    objects: list
    materials: list
    camera: Camera
    light: Light
    sky_horizon: np.ndarray
    sky_zenith: np.ndarray

    def albedo_table(self) -> np.ndarray:
        """(n_materials * MAX_LABELS, 3) colours indexed by albedo id."""
        table = np.zeros((len(self.materials) * MAX_LABELS, 3), np.float32)
        for m, mat in enumerate(self.materials):
            table[m * MAX_LABELS: m * MAX_LABELS + len(mat.colors)] = mat.colors
        return table


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / math.sqrt(v @ v)


def cross(a, b):
    """3-vector cross product (np.cross costs ~20x more on 3-vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


class _Draws:
    """The numbers of one generator, consumed in a fixed order but drawn in
    blocks: a Generator call costs about a microsecond however few numbers
    it returns, and a scene takes about a hundred."""

    def __init__(self, rng):
        self.rng, self._u, self._n = rng, [], []

    def uniform(self, lo=0.0, hi=1.0):
        if not self._u:
            self._u = self.rng.random(64).tolist()
        return lo + (hi - lo) * self._u.pop()

    def normal(self):
        if not self._n:
            self._n = self.rng.standard_normal(16).tolist()
        return self._n.pop()

    def choice(self, options):
        return options[min(int(self.uniform() * len(options)), len(options) - 1)]


def _palette(draw, n):
    """``n`` colours whose hues are spread apart and whose values alternate,
    so that neighbouring texture labels differ visibly."""
    h0 = draw.uniform()
    colors = []
    for i in range(n):
        hue = (h0 + i / n + draw.uniform(-0.08, 0.08)) % 1.0
        sat = draw.uniform(0.25, 0.9)
        val = draw.uniform(0.65, 0.95) if i % 2 == 0 else draw.uniform(0.3, 0.55)
        colors.append(colorsys.hsv_to_rgb(hue, sat, val))
    return np.array(colors, np.float32)


def _texture(draw, kinds, scale):
    kind = draw.choice(kinds)
    period = scale * draw.uniform(0.6, 1.4)
    tex = Texture(kind=kind, period=period, offset=tuple(draw.uniform(0, period) for _ in range(3)))
    if kind == "stripes":
        v = [draw.normal() for _ in range(3)]
        norm = math.sqrt(sum(c * c for c in v)) or 1.0
        tex.direction = tuple(c / norm for c in v)
        tex.n_labels = draw.choice((2, 3))
    elif kind == "checker":
        tex.n_labels = 2
    elif kind == "blobs":
        # Wave numbers of a few radians per period: blobs about one period wide.
        tex.waves = tuple(tuple(draw.normal() * 2.5 / period for _ in range(3)) for _ in range(3))
        tex.phases = tuple(draw.uniform(0, 2 * math.pi) for _ in range(3))
        tex.n_labels = draw.choice((2, 3))
        # Thresholds inside the bulk of a sum of 3 sines (std ~1.2), so every label shows.
        tex.levels = tuple(sorted(draw.uniform(-0.8, 0.8) for _ in range(tex.n_labels - 1)))
    return tex


def _shape(draw, kind):
    """``(size, center_y, yaw, resting)`` of a new object of ``kind``."""
    if kind == "sphere":
        r = draw.uniform(0.3, 0.75)
        floating = draw.uniform() < 0.3
        lift = draw.uniform(0.3, 1.0) if floating else 0.0
        return (r,), r + lift, 0.0, not floating
    if kind == "box":
        h = tuple(draw.uniform(0.2, 0.65) for _ in range(3))
        # A third of the boxes are axis-aligned; the rest are turned about +y.
        yaw = 0.0 if draw.uniform() < 1 / 3 else draw.uniform(0, math.pi / 2)
        return h, h[1], yaw, True
    return (draw.uniform(0.2, 0.5), draw.uniform(0.4, 1.6)), 0.0, 0.0, True


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of sample ``index`` of the dataset seeded ``seed``."""
    draw = _Draws(np.random.default_rng([seed, index]))
    room_half = draw.uniform(5.5, 7.5)
    wall_height = draw.uniform(2.5, 4.0)

    materials = [
        Material(Texture("plain"), np.zeros((1, 3), np.float32)),  # sky: shaded separately
    ]
    floor_tex = _texture(draw, ("checker", "stripes", "blobs", "plain"), scale=draw.uniform(0.6, 1.2))
    materials.append(Material(floor_tex, _palette(draw, floor_tex.n_labels)))
    wall_tex = _texture(draw, ("stripes", "blobs", "plain"), scale=draw.uniform(0.4, 1.0))
    materials.append(Material(wall_tex, _palette(draw, wall_tex.n_labels)))

    objects = []
    placed = []                              # (x, z, footprint) of the objects so far
    n_objects = draw.choice((3, 4, 5, 6))
    for _ in range(200):                     # rejection sampling of non-touching placements
        if len(objects) == n_objects:
            break
        kind = draw.choice(("sphere", "box", "cylinder"))
        size, cy, yaw, resting = _shape(draw, kind)
        fp = footprint(kind, size)
        rho, phi = (PLACE_RADIUS - fp) * math.sqrt(draw.uniform()), draw.uniform(0, 2 * math.pi)
        x, z = rho * math.cos(phi), rho * math.sin(phi)
        if any(math.hypot(x - px, z - pz) < fp + pf + GAP for px, pz, pf in placed):
            continue
        tex = _texture(draw, TEXTURES, scale=draw.uniform(0.25, 0.6))
        objects.append(Object(kind, (x, cy, z), size, yaw, len(materials), resting))
        materials.append(Material(tex, _palette(draw, tex.n_labels)))
        placed.append((x, z, fp))

    # Camera: between the objects' disc and the walls, at least 1.5 m from any
    # wall, so neither floor nor walls are seen at grazing angles (~6 degrees
    # and more), and at least 0.5 m from any object's bounding sphere.
    bounds = [(o.bound_center.tolist(), o.bound) for o in objects]
    for _ in range(100):
        rho = draw.uniform(PLACE_RADIUS + 1.2, min(PLACE_RADIUS + 3.0, room_half - 1.5))
        phi = draw.uniform(0, 2 * math.pi)
        pos = (rho * math.cos(phi), draw.uniform(1.2, 3.0), rho * math.sin(phi))
        if min(math.dist(pos, c) - r for c, r in bounds) > 0.5:
            break
    pos = np.array(pos)
    target = np.array([draw.uniform(-0.5, 0.5), draw.uniform(0.2, 0.8), draw.uniform(-0.5, 0.5)])
    fwd = _unit(target - pos)
    right = _unit(cross(fwd, (0.0, 1.0, 0.0)))
    down = cross(fwd, right)
    roll = draw.uniform(-0.12, 0.12)         # a slight roll, so the horizon is not always level
    right, down = math.cos(roll) * right + math.sin(roll) * down, -math.sin(roll) * right + math.cos(roll) * down
    fov = math.radians(draw.uniform(50, 70))
    camera = Camera(pos.astype(np.float32), np.stack([right, down, fwd], 1).astype(np.float32),
                    focal=0.5 / math.tan(fov / 2))

    zero = np.zeros(3, np.float32)
    if draw.uniform() < 0.5:
        lpos = np.array([draw.uniform(-3, 3), draw.uniform(3.5, 5.5), draw.uniform(-3, 3)], np.float32)
        light = Light("point", lpos, zero, zero, 0.0)
    else:
        elev, azim = math.radians(draw.uniform(30, 75)), draw.uniform(0, 2 * math.pi)
        ldir = np.array([math.cos(elev) * math.cos(azim), math.sin(elev), math.cos(elev) * math.sin(azim)],
                        np.float32)
        light = Light("directional", zero, ldir, zero, 0.0)
    light.color = np.array([1.0 - draw.uniform(0, 0.15) for _ in range(3)], np.float32)
    light.ambient = draw.uniform(0.15, 0.3)

    sky_horizon = np.array([draw.uniform(0.75, 0.95) for _ in range(3)], np.float32)
    sky_zenith = np.array([draw.uniform(0.2, 0.4), draw.uniform(0.4, 0.6), draw.uniform(0.7, 0.95)], np.float32)
    return Scene(room_half, wall_height, objects, materials, camera, light, sky_horizon, sky_zenith)
