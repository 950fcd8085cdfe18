"""Lesion models: spiculated masses, microcalcification clusters and benign round masses.

A :class:`Lesion` is described once per breast, in breast-relative coordinates (distance from
the nipple, position across the breast in each view), so that both views of a cancer breast show
it at geometrically consistent places. Rendering gives a small float patch (the added
attenuation, 0..1 before the amplitude) and the patch of the lesion mask that the
evaluation (pointing game, masks) relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

LESION_KINDS: tuple[str, ...] = ("mass", "calcification", "benign")

# Peak attenuation added by each lesion kind at contrast 1.0, in units of the tissue model
# (fatty tissue ~0.3, dense tissue ~0.7). Chosen so that a mass is clearly visible on a dense
# background after downsampling to 512x256 without saturating the detector.
AMPLITUDE: dict[str, float] = {"mass": 0.26, "calcification": 0.42, "benign": 0.09}


@dataclass(frozen=True)
class Lesion:
    """One lesion of one breast, shared by all views of that breast.

    ``nipple_distance`` is the distance from the nipple towards the chest wall as a fraction of
    the breast depth (the same in CC and MLO, which is what a radiologist uses to match a finding
    across views). ``offset_cc``/``offset_mlo`` place it across the breast in each view, -1..1 of
    the usable extent at that depth. ``size`` is the mass radius or the cluster radius as a
    fraction of the breast depth. ``seed`` fixes the shape; each view perturbs it slightly, as a
    different projection would.
    """

    kind: str
    nipple_distance: float
    offset_cc: float
    offset_mlo: float
    size: float
    seed: int
    n_specks: int = 0
    speck_diameter: float = 0.0075  # fraction of the image width (calcifications only)
    contrast: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.nipple_distance <= 1.0:
            raise ValueError(f"nipple_distance must be in [0, 1], got {self.nipple_distance}")
        if not (-1.0 <= self.offset_cc <= 1.0 and -1.0 <= self.offset_mlo <= 1.0):
            raise ValueError("lesion offsets must be in [-1, 1]")
        if not 0.0 < self.size < 0.5:
            raise ValueError(f"lesion size must be in (0, 0.5), got {self.size}")
        if self.kind == "calcification" and self.n_specks < 1:
            raise ValueError("a calcification cluster needs n_specks >= 1")

    @property
    def malignant(self) -> bool:
        """Masses and calcification clusters are the cancers; ``benign`` is a distractor."""
        return self.kind != "benign"

    def offset(self, view: str) -> float:
        return self.offset_mlo if view == "MLO" else self.offset_cc


def random_lesion(rng: np.random.Generator, kind: str) -> Lesion:
    """A lesion of ``kind`` with the size and position ranges the synthetic dataset uses."""
    if kind == "mass":
        size = float(rng.uniform(0.04, 0.08))
        n_specks = 0
    elif kind == "calcification":
        size = float(rng.uniform(0.035, 0.07))
        n_specks = int(rng.integers(5, 31))
    elif kind == "benign":
        size = float(rng.uniform(0.03, 0.05))
        n_specks = 0
    else:
        raise ValueError(f"lesion kind must be one of {LESION_KINDS}, got {kind!r}")
    return Lesion(
        kind=kind,
        nipple_distance=float(rng.uniform(0.2, 0.75)),
        offset_cc=float(rng.uniform(-0.8, 0.8)),
        offset_mlo=float(rng.uniform(-0.8, 0.8)),
        size=size,
        seed=int(rng.integers(0, 2**31 - 1)),
        n_specks=n_specks,
        speck_diameter=float(rng.uniform(0.005, 0.01)),
    )


@dataclass
class LesionPatch:
    """A rendered lesion: ``profile`` (float32 0..1) and ``mask`` (bool) placed at (y0, x0)."""

    profile: np.ndarray
    mask: np.ndarray
    y0: int
    x0: int


def render_lesion(
    lesion: Lesion, center: tuple[float, float], depth_px: float, width_px: int, view: str
) -> LesionPatch:
    """Render ``lesion`` around ``center`` (y, x) for a breast ``depth_px`` deep.

    ``width_px`` is the image width, which sets the calcification speck size (specks must stay
    1-2 pixels after the 512x256 downsampling whatever the breast size).
    """
    rng = np.random.default_rng([lesion.seed, 0 if view == "CC" else 1])
    radius = max(lesion.size * depth_px, 2.0)
    if lesion.kind == "mass":
        profile, mask = _spiculated_mass(rng, radius)
    elif lesion.kind == "calcification":
        diameter = max(lesion.speck_diameter * width_px, 1.5)
        profile, mask = _calcification_cluster(rng, radius, lesion.n_specks, diameter)
    else:
        profile, mask = _circumscribed_mass(rng, radius)
    h, w = profile.shape
    y0 = round(center[0]) - h // 2
    x0 = round(center[1]) - w // 2
    return LesionPatch(profile=profile, mask=mask, y0=y0, x0=x0)


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(-half, half + 1, dtype=np.float32)
    return ax[:, None], ax[None, :]


def _harmonic_radius(rng: np.random.Generator, theta: np.ndarray, strength: float) -> np.ndarray:
    """1 + a few random low harmonics of the angle: an irregular, lobulated outline."""
    out = np.ones_like(theta)
    for k in range(2, 6):
        out += float(rng.uniform(0.0, strength)) * np.cos(k * theta + float(rng.uniform(0, 2 * np.pi)))
    return out


def _spiculated_mass(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A dense irregular core with 8-18 thin tapering spicules radiating from it."""
    half = math.ceil(3.6 * radius) + 3
    yy, xx = _grid(half)
    theta = np.arctan2(yy, xx)
    rr = radius * _harmonic_radius(rng, theta, 0.13)
    d = np.hypot(yy, xx) / rr
    core = np.clip(1.0 - d * d, 0.0, 1.0) ** 0.5
    core = cv2.GaussianBlur(core, (0, 0), max(0.5, 0.06 * radius))

    spic = np.zeros_like(core)
    for _ in range(int(rng.integers(8, 19))):
        angle = float(rng.uniform(0, 2 * np.pi))
        length = radius * float(rng.uniform(0.9, 2.5))
        start = 0.7 * radius
        n_seg = 6
        thick0 = max(1, round(0.12 * radius * float(rng.uniform(0.6, 1.2))))
        prev = (half + start * math.cos(angle), half + start * math.sin(angle))
        for i in range(1, n_seg + 1):
            angle += float(rng.normal(0.0, 0.035))
            r_i = start + length * i / n_seg
            cur = (half + r_i * math.cos(angle), half + r_i * math.sin(angle))
            thickness = max(1, round(thick0 * (1.0 - (i - 1) / n_seg)))
            cv2.line(
                spic,
                (round(prev[0]), round(prev[1])),
                (round(cur[0]), round(cur[1])),
                1.0,
                thickness,
                cv2.LINE_8,
            )
            prev = cur
    spic = cv2.GaussianBlur(spic, (0, 0), max(0.6, 0.05 * radius))
    profile = np.maximum(core, 0.55 * np.clip(spic, 0.0, 1.0)).astype(np.float32)
    return profile, profile > 0.2


def _calcification_cluster(
    rng: np.random.Generator, radius: float, n_specks: int, diameter: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n_specks`` small bright irregular specks scattered in a cluster of ``radius``.

    The mask is the cluster region (convex hull of the specks, grown by one speck diameter): that
    is what a radiologist outlines, and what a CAM should point at.
    """
    half = math.ceil(radius + 2 * diameter) + 3
    yy, xx = _grid(half)
    profile = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    centers = []
    for _ in range(n_specks):
        r = radius * min(abs(float(rng.normal(0.0, 0.5))), 1.0)
        a = float(rng.uniform(0, 2 * np.pi))
        cy, cx = r * math.sin(a), r * math.cos(a)
        centers.append((cx + half, cy + half))
        d_i = diameter * float(rng.uniform(0.7, 1.3))
        elong = float(rng.uniform(1.0, 1.6))
        rot = float(rng.uniform(0, np.pi))
        u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
        v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
        rho2 = (u / (0.5 * d_i * elong)) ** 2 + (v / (0.5 * d_i)) ** 2
        speck = np.exp(-(rho2**2)) * float(rng.uniform(0.75, 1.0))
        profile = np.maximum(profile, speck)
    hull: np.ndarray = np.zeros(profile.shape, dtype=np.uint8)
    pts = np.round(np.array(centers, dtype=np.float64)).astype(np.int32)
    if len(pts) >= 3:
        cv2.fillConvexPoly(hull, cv2.convexHull(pts), 255)
    else:
        for x, y in pts:
            hull[y, x] = 255
    k = 2 * max(1, round(diameter)) + 1
    hull = cv2.dilate(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    mask = (hull > 0) | (profile > 0.3)
    return profile.astype(np.float32), mask


def _circumscribed_mass(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, sharply marginated oval: the look of a cyst or fibroadenoma."""
    half = math.ceil(1.3 * radius) + 3
    yy, xx = _grid(half)
    ratio = float(rng.uniform(0.75, 1.0))
    rot = float(rng.uniform(0, np.pi))
    u = xx * math.cos(rot) + yy * math.sin(rot)
    v = -xx * math.sin(rot) + yy * math.cos(rot)
    d2 = (u / radius) ** 2 + (v / (radius * ratio)) ** 2
    dome = (np.clip(1.0 - d2, 0.0, 1.0) ** 0.35).astype(np.float32)
    profile: np.ndarray = cv2.GaussianBlur(dome, (0, 0), 0.6)
    return profile, profile > 0.2


def paste_max(dst: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> None:
    """``dst[y0:, x0:] = max(dst, patch)`` clipped to ``dst``'s bounds (patches may overhang)."""
    _paste(dst, patch, y0, x0, add=False)


def paste_add(dst: np.ndarray, patch: np.ndarray, y0: int, x0: int) -> None:
    """``dst[y0:, x0:] += patch`` clipped to ``dst``'s bounds."""
    _paste(dst, patch, y0, x0, add=True)


def _paste(dst: np.ndarray, patch: np.ndarray, y0: int, x0: int, *, add: bool) -> None:
    h, w = patch.shape
    ty0, tx0 = max(y0, 0), max(x0, 0)
    ty1, tx1 = min(y0 + h, dst.shape[0]), min(x0 + w, dst.shape[1])
    if ty0 >= ty1 or tx0 >= tx1:
        return
    src = patch[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
    region = dst[ty0:ty1, tx0:tx1]
    if add:
        region += src
    else:
        np.maximum(region, src, out=region)
