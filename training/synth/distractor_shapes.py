"""How each distractor looks: one small function per kind, drawn in millimetres.

Every function takes a random generator and a :class:`Scene` (the view's outline in the
canonical frame, chest wall on the left, and the pixel size) and returns one :class:`Drawn`
patch: the attenuation it adds (in the units of :mod:`training.synth.anatomy`: fat ~0.3, dense
tissue ~0.7; the detector saturates near 1.4-1.6) and the mask of where it shows. None means the
kind found no place in this view (e.g. no air for a label). Sizes are physical, so a BB is 1.5-4 mm
whatever the matrix; where a size comes from is said in :mod:`training.synth.distractors`.

Metal (markers, clips, devices, lead letters) is drawn with an amplitude above 1, so it saturates
or nearly, as radio-opaque metal does on a processed mammogram. Calcified vessels are as bright as
calcifications; the paddle edge is plastic and faint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from training.synth.anatomy import ViewGeometry

SUPERSAMPLE = 4
"""Lines are drawn at this multiple and averaged down, so sub-pixel wires get partial values."""
METAL = (1.3, 2.0)
"""Attenuation added by radio-opaque metal: saturates the detector or nearly, over any tissue."""
MASK_LEVEL = 0.01
"""Added attenuation at which a distractor's mask ends (about 0.7% of the detector range)."""


@dataclass
class Scene:
    """Where distractors go: the canonical outline, the pixel size and the metal-free corners."""

    geom: ViewGeometry
    mm: float  # millimetres per pixel at the rendered size

    def px(self, millimetres: float) -> float:
        return millimetres / self.mm

    @property
    def shape(self) -> tuple[int, int]:
        return self.geom.height, self.geom.width


@dataclass
class Drawn:
    """A distractor patch: added attenuation (float32) and its mask, placed at (y0, x0)."""

    add: np.ndarray
    mask: np.ndarray
    y0: int
    x0: int


def blur(patch: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    """The focal spot and detector blur every edge a little; nothing in an X-ray is pixel-sharp."""
    return np.asarray(cv2.GaussianBlur(patch, (0, 0), sigma))


def as_drawn(profile: np.ndarray, amplitude: float, y0: int, x0: int, level: float = MASK_LEVEL) -> Drawn:
    """A patch whose mask is where it adds at least ``level``; the faint tail below it is cut, so
    the mask covers every pixel the distractor changes."""
    add = (profile * np.float32(amplitude)).astype(np.float32)
    mask = add >= level
    return Drawn(add=np.where(mask, add, np.float32(0.0)), mask=mask, y0=y0, x0=x0)


def polyline_patch(
    paths: list[np.ndarray], thickness: float, pad: float = 3.0
) -> tuple[np.ndarray, int, int] | None:
    """Coverage (0..1, float32) of ``paths`` (each (N, 2) float x, y image coordinates) drawn
    ``thickness`` pixels wide, as a patch with its top-left (y0, x0); None if there is nothing."""
    pts = np.concatenate(paths)
    x0 = math.floor(float(pts[:, 0].min()) - thickness - pad)
    y0 = math.floor(float(pts[:, 1].min()) - thickness - pad)
    x1 = math.ceil(float(pts[:, 0].max()) + thickness + pad)
    y1 = math.ceil(float(pts[:, 1].max()) + thickness + pad)
    if x1 <= x0 or y1 <= y0:
        return None
    s = SUPERSAMPLE
    canvas = np.zeros(((y1 - y0) * s, (x1 - x0) * s), dtype=np.float32)
    width = max(1, round(thickness * s))
    for path in paths:
        scaled = np.round((path - [x0, y0]) * s + (s - 1) / 2.0).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [scaled], False, 1.0, width, cv2.LINE_8)
    small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.float32), y0, x0


def wander(
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    length: float,
    step: float,
    bend: float,
) -> np.ndarray:
    """A gently curving path (x, y) of ``length`` pixels from ``start``, heading ``angle``."""
    n = max(2, math.ceil(length / max(step, 1.0)))
    turns = np.cumsum(rng.normal(0.0, bend, n))
    headings = angle + turns
    xy = np.zeros((n + 1, 2))
    xy[0] = start
    xy[1:, 0] = start[0] + np.cumsum(np.cos(headings)) * length / n
    xy[1:, 1] = start[1] + np.cumsum(np.sin(headings)) * length / n
    return xy


def _inside_point(rng: np.random.Generator, scene: Scene, margin_mm: float) -> tuple[float, float] | None:
    """A random (x, y) inside the breast, ``margin_mm`` from the skin and the pectoral muscle."""
    geom = scene.geom
    margin = scene.px(margin_mm)
    ok = geom.dist > margin
    xs = np.arange(geom.width, dtype=np.float32)[None, :]
    ok &= xs > geom.pectoral_edge[:, None] + margin
    ys, xs_ = np.nonzero(ok)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return float(xs_[i]), float(ys[i])


def _in_breast(scene: Scene, path: np.ndarray, pectoral: bool = False) -> np.ndarray:
    """Which points (x, y) of ``path`` lie in the breast (and, with ``pectoral``, in front of the
    pectoral muscle)."""
    geom = scene.geom
    x = np.round(path[:, 0]).astype(int)
    y = np.round(path[:, 1]).astype(int)
    inside = (x >= 0) & (y >= 0) & (x < geom.width) & (y < geom.height)
    xc, yc = np.clip(x, 0, geom.width - 1), np.clip(y, 0, geom.height - 1)
    inside &= geom.mask[yc, xc]
    if pectoral:
        inside &= path[:, 0] > geom.pectoral_edge[yc]
    return np.asarray(inside)


def _skin_point(rng: np.random.Generator, scene: Scene) -> tuple[float, float] | None:
    """A random (x, y) on the skin line, away from its thin top and bottom tips."""
    geom = scene.geom
    rows = np.flatnonzero(geom.x_edge > 0.35 * geom.depth)
    if rows.size == 0:
        return None
    y = int(rows[int(rng.integers(rows.size))])
    return float(geom.x_edge[y]), float(y)


def _sphere(radius: float, ring: float = 0.0) -> tuple[np.ndarray, int]:
    """A metal ball (or, with ``ring`` > 0, a torus of that tube radius) seen in projection:
    the chord through metal saturates almost to the rim. Returns the profile and its half size."""
    half = math.ceil(radius + ring + 3)
    ax = np.arange(-half, half + 1, dtype=np.float32)
    rho = np.hypot(ax[:, None], ax[None, :])
    if ring > 0:
        chord = np.sqrt(np.clip(1.0 - ((rho - radius) / ring) ** 2, 0.0, 1.0))
    else:
        chord = np.sqrt(np.clip(1.0 - (rho / radius) ** 2, 0.0, 1.0))
    return blur(np.clip(4.0 * chord, 0.0, 1.0).astype(np.float32)), half


def bb_marker(rng: np.random.Generator, scene: Scene) -> Drawn | None:
    """A round skin marker: a solid BB of 1.5-4 mm, or (one in four) a mole ring of 4-7 mm, on
    the skin line (tangential) or, less often, projected over the breast."""
    on_skin = rng.random() < 0.6
    at = _skin_point(rng, scene) if on_skin else _inside_point(rng, scene, 3.0)
    if at is None:
        return None
    if rng.random() < 0.25:
        radius = scene.px(rng.uniform(2.0, 3.5))
        profile, half = _sphere(radius, ring=max(scene.px(0.3), 0.6))
    else:
        radius = max(scene.px(rng.uniform(1.5, 4.0)) / 2.0, 0.8)
        profile, half = _sphere(radius)
    # On the skin line the marker sits on the surface: its centre just outside, or on the line.
    x = at[0] + rng.uniform(-0.3, 1.0) * radius if on_skin else at[0]
    return as_drawn(profile, rng.uniform(*METAL), round(at[1]) - half, round(x) - half)


def nipple_marker(rng: np.random.Generator, scene: Scene) -> Drawn | None:
    """A small metal pellet (1.5-3 mm) taped on the nipple, seen at the tip in profile."""
    geom = scene.geom
    radius = max(scene.px(rng.uniform(1.5, 3.0)) / 2.0, 0.8)
    profile, half = _sphere(radius)
    x = geom.depth + rng.uniform(-0.5, 0.8) * radius
    y = geom.nipple_row + rng.uniform(-1.0, 1.0) * radius
    return as_drawn(profile, rng.uniform(*METAL), round(y) - half, round(x) - half)


def scar_marker(rng: np.random.Generator, scene: Scene) -> Drawn | None:
    """A linear scar marker: a broken metal wire (0.4-0.8 mm) 30-80 mm long along a gentle curve."""
    start = _inside_point(rng, scene, 5.0)
    if start is None:
        return None
    length = scene.px(rng.uniform(30.0, 80.0))
    path = wander(rng, start, rng.uniform(0, 2 * np.pi), length, scene.px(0.5), 0.02)
    dash, gap = scene.px(rng.uniform(3.0, 5.0)), scene.px(rng.uniform(1.5, 2.5))
    seg = np.hypot(*np.diff(path, axis=0).T)
    along = np.concatenate([[0.0], np.cumsum(seg)])
    keep = (along % (dash + gap)) < dash
    on_skin = _in_breast(scene, path)
    pieces = [path[i : i + 2] for i in range(len(path) - 1) if keep[i] and keep[i + 1] and on_skin[i]]
    if not pieces:
        return None
    found = polyline_patch(pieces, max(scene.px(rng.uniform(0.4, 0.8)), 0.5))
    if found is None:
        return None
    cover, y0, x0 = found
    return as_drawn(blur(cover, 0.5), rng.uniform(1.0, 1.6), y0, x0)


def _one_clip(rng: np.random.Generator, scene: Scene, cx: float, cy: float) -> list[np.ndarray]:
    """The wire outline of one 2.5-5 mm clip at (cx, cy): a U, a ribbon zigzag or a small coil."""
    size = scene.px(rng.uniform(2.5, 5.0))
    rot = rng.uniform(0, np.pi)
    shape = int(rng.integers(3))
    if shape == 0:
        local = np.array([[-0.3, -0.5], [-0.3, 0.4], [0.0, 0.5], [0.3, 0.4], [0.3, -0.5]])
    elif shape == 1:
        local = np.array([[-0.5, 0.0], [-0.25, 0.3], [0.0, -0.3], [0.25, 0.3], [0.5, 0.0]])
    else:
        t = np.linspace(0, 4 * np.pi, 24)
        local = np.stack([0.25 * np.cos(t) + t / (8 * np.pi) - 0.25, 0.25 * np.sin(t)], axis=1)
    c, s = math.cos(rot), math.sin(rot)
    pts = local * size @ np.array([[c, s], [-s, c]])
    return [pts + np.array([cx, cy])]


def clip(rng: np.random.Generator, scene: Scene, count: int = 1) -> Drawn | None:
    """Surgical or biopsy marker clips: one, or ``count`` around a 10-25 mm excision cavity."""
    center = _inside_point(rng, scene, 8.0)
    if center is None:
        return None
    paths: list[np.ndarray] = []
    spread = scene.px(rng.uniform(5.0, 12.5)) if count > 1 else 0.0
    for k in range(count):
        a = 2 * np.pi * k / count + rng.normal(0.0, 0.3)
        paths += _one_clip(rng, scene, center[0] + spread * math.cos(a), center[1] + spread * math.sin(a))
    found = polyline_patch(paths, max(scene.px(rng.uniform(0.4, 0.7)), 0.6))
    if found is None:
        return None
    cover, y0, x0 = found
    return as_drawn(blur(cover, 0.5), rng.uniform(*METAL), y0, x0)


def vessel_calcification(rng: np.random.Generator, scene: Scene) -> Drawn | None:
    """A calcified artery: two parallel bright walls ("tram track") 1.5-3 mm apart along a
    tortuous 25-90 mm course, with gaps where the wall is not calcified."""
    start = _inside_point(rng, scene, 6.0)
    if start is None:
        return None
    geom = scene.geom
    # Arteries run from the chest wall towards the nipple: head roughly along the breast.
    aim = math.atan2(geom.nipple_row - start[1], geom.depth - start[0])
    direction = aim + rng.normal(0.0, 0.5) + (np.pi if rng.random() < 0.5 else 0.0)
    path = wander(rng, start, direction, scene.px(rng.uniform(25.0, 90.0)), scene.px(2.0), 0.08)
    half_gap = scene.px(rng.uniform(1.5, 3.0)) / 2.0
    d = np.gradient(path, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-6)[:, None]
    calcified = (rng.random(len(path)) < rng.uniform(0.55, 0.95)) & _in_breast(scene, path, pectoral=True)
    walls: list[np.ndarray] = []
    for sign in (-1.0, 1.0):
        wall = path + sign * half_gap * normal
        walls += [wall[i : i + 2] for i in range(len(wall) - 1) if calcified[i]]
    if not walls:
        return None
    found = polyline_patch(walls, max(scene.px(rng.uniform(0.3, 0.6)), 0.6))
    if found is None:
        return None
    cover, y0, x0 = found
    drawn = as_drawn(blur(cover, 0.5), rng.uniform(0.25, 0.5), y0, x0)
    # The mask is the whole track between and over the walls: that is what a reader calls the vessel.
    k = 2 * math.ceil(half_gap) + 1
    track = cv2.dilate(drawn.mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    drawn.mask = track > 0
    return drawn
