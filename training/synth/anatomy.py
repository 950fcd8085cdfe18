"""Breast anatomy of the phantoms: outline per view, pectoral muscle, parenchyma, skin, nipple.

Everything here works in a *canonical frame*: chest wall on the left (x = 0), nipple pointing
right, as a right breast is displayed. :mod:`training.synth.phantom` mirrors left breasts at the
end, so geometry is written once.

The output is a float attenuation map (roughly 0 for air, ~0.3 for fat, ~0.7 for dense
fibroglandular tissue) that the detector model turns into stored pixel values.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from training.synth.noise import power_law_noise, smooth_noise_1d, upsampled_noise

DENSITIES: tuple[str, ...] = ("A", "B", "C", "D")

# BI-RADS density -> (fraction of the glandular envelope that is fibroglandular, brightness of
# fibroglandular tissue above fat).
DENSITY_PARAMS: dict[str, tuple[float, float]] = {
    "A": (0.10, 0.24),
    "B": (0.28, 0.28),
    "C": (0.52, 0.32),
    "D": (0.78, 0.36),
}


@dataclass(frozen=True)
class BreastAnatomy:
    """Per-breast shape and tissue parameters, shared by the CC and MLO views of that breast.

    Lengths are fractions of the image width (``*_w``) or height (``*_h``).
    """

    density: str = "B"
    depth_w: float = 0.70  # chest wall to nipple, CC view
    half_height_h: float = 0.38  # half extent of the CC outline along the chest wall
    center_h: float = 0.5  # CC nipple row
    superellipse: float = 2.2  # CC outline exponent (2 = ellipse, higher = boxier)
    mlo_depth_ratio: float = 1.04
    mlo_nipple_h: float = 0.55
    mlo_lower_h: float = 0.36  # nipple to inframammary fold, MLO
    pectoral_w: float = 0.26
    pectoral_h: float = 0.48
    pectoral_curve: float = 1.0
    axilla_w: float = 0.07  # tissue beyond the pectoral muscle at the top of the MLO
    fat_level: float = 0.32
    subcutaneous: float = 0.05  # subcutaneous fat thickness, fraction of depth
    implant: bool = False

    def __post_init__(self) -> None:
        if self.density not in DENSITY_PARAMS:
            raise ValueError(f"density must be one of {DENSITIES}, got {self.density!r}")
        if not 0.2 <= self.depth_w <= 0.9:
            raise ValueError(f"depth_w must be in [0.2, 0.9], got {self.depth_w}")

    @classmethod
    def random(cls, rng: np.random.Generator, density: str, *, implant: bool = False) -> BreastAnatomy:
        """A plausible breast of ``density``; denser breasts tend to be smaller, as in life."""
        if density not in DENSITY_PARAMS:
            raise ValueError(f"density must be one of {DENSITIES}, got {density!r}")
        shrink = 0.03 * DENSITIES.index(density)
        return cls(
            density=density,
            depth_w=float(rng.uniform(0.58, 0.80) - shrink),
            half_height_h=float(rng.uniform(0.32, 0.43)),
            center_h=float(rng.uniform(0.45, 0.55)),
            superellipse=float(rng.uniform(1.8, 2.7)),
            mlo_depth_ratio=float(rng.uniform(0.98, 1.08)),
            mlo_nipple_h=float(rng.uniform(0.50, 0.60)),
            mlo_lower_h=float(rng.uniform(0.28, 0.36)),
            pectoral_w=float(rng.uniform(0.16, 0.32)),
            pectoral_h=float(rng.uniform(0.35, 0.60)),
            pectoral_curve=float(rng.uniform(0.8, 1.25)),
            axilla_w=float(rng.uniform(0.04, 0.10)),
            fat_level=float(rng.uniform(0.28, 0.36)),
            subcutaneous=float(rng.uniform(0.03, 0.07)),
            implant=implant,
        )

    def mirrored_twin(self, rng: np.random.Generator) -> BreastAnatomy:
        """The contralateral breast: same patient, slightly different size and shape."""

        def jitter(value: float, rel: float) -> float:
            return float(value * (1.0 + rng.uniform(-rel, rel)))

        return BreastAnatomy(
            density=self.density,
            depth_w=min(max(jitter(self.depth_w, 0.05), 0.2), 0.85),
            half_height_h=jitter(self.half_height_h, 0.05),
            center_h=jitter(self.center_h, 0.03),
            superellipse=self.superellipse,
            mlo_depth_ratio=self.mlo_depth_ratio,
            mlo_nipple_h=jitter(self.mlo_nipple_h, 0.03),
            mlo_lower_h=jitter(self.mlo_lower_h, 0.05),
            pectoral_w=jitter(self.pectoral_w, 0.1),
            pectoral_h=jitter(self.pectoral_h, 0.1),
            pectoral_curve=self.pectoral_curve,
            axilla_w=self.axilla_w,
            fat_level=self.fat_level,
            subcutaneous=self.subcutaneous,
            implant=self.implant,
        )


@dataclass
class ViewGeometry:
    """The outline of one view in the canonical frame, in pixels.

    ``x_edge[y]`` is the skin line (the breast spans 0 <= x < x_edge[y] on row y) and
    ``pectoral_edge[y]`` the pectoral muscle border (0 on CC views). ``mask`` includes the nipple.
    """

    height: int
    width: int
    view: str
    depth: float  # nipple column
    nipple_row: float
    x_edge: np.ndarray
    pectoral_edge: np.ndarray
    mask: np.ndarray  # bool
    dist: np.ndarray  # float32 distance to the skin line, pixels


def view_geometry(
    anatomy: BreastAnatomy, view: str, size: tuple[int, int], rng: np.random.Generator
) -> ViewGeometry:
    """Outline, pectoral muscle and skin distance of ``view`` ("CC" or "MLO")."""
    h, w = size
    ys = np.arange(h, dtype=np.float32)
    wobble = 1.0 + 0.015 * smooth_noise_1d(rng, h, 3.0)
    if view == "CC":
        depth = anatomy.depth_w * w
        cy = anatomy.center_h * h
        b = anatomy.half_height_h * h
        k = anatomy.superellipse
        s = np.clip(np.abs(ys - cy) / b, 0.0, 1.0)
        x_edge = depth * (1.0 - s**k) ** (1.0 / k)
        pect = np.zeros(h, dtype=np.float32)
    elif view == "MLO":
        depth = min(anatomy.depth_w * anatomy.mlo_depth_ratio, 0.86) * w
        cy = anatomy.mlo_nipple_h * h
        lower = min(anatomy.mlo_lower_h * h, h - cy - 0.04 * h)
        pw, ph = anatomy.pectoral_w * w, anatomy.pectoral_h * h
        top = min(pw + anatomy.axilla_w * w, 0.8 * depth)
        up = np.clip((cy - ys) / cy, 0.0, 1.0)
        down = np.clip((ys - cy) / lower, 0.0, 1.0)
        x_upper = top + (depth - top) * np.sqrt(1.0 - up**2)
        x_lower = depth * np.sqrt(1.0 - down**2)
        x_edge = np.where(ys < cy, x_upper, x_lower)
        pect = pw * np.clip(1.0 - ys / ph, 0.0, 1.0) ** anatomy.pectoral_curve
    else:
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
    x_edge = (x_edge * wobble).astype(np.float32)
    pect = pect.astype(np.float32)

    xs = np.arange(w, dtype=np.float32)[None, :]
    mask = xs < x_edge[:, None]
    # Nipple: a small bump on the (wobbled) skin line at the nipple row, which defines the depth.
    depth = float(x_edge[min(max(round(cy), 0), h - 1)])
    rn = max(0.022 * depth, 1.5)
    nipple = np.zeros((h, w), dtype=np.uint8)
    cv2.circle(nipple, (round(depth - 0.3 * rn), round(cy)), round(rn), 1, -1)
    mask |= nipple.astype(bool)
    mask_u8 = mask.astype(np.uint8)
    dist = cv2.distanceTransform(mask_u8, cv2.DIST_L2, 5)
    return ViewGeometry(
        height=h,
        width=w,
        view=view,
        depth=float(depth),
        nipple_row=float(cy),
        x_edge=x_edge,
        pectoral_edge=pect,
        mask=mask,
        dist=dist,
    )


def lesion_center(
    geom: ViewGeometry, nipple_distance: float, offset: float, margin: float
) -> tuple[float, float]:
    """Where a lesion ``nipple_distance`` (fraction of depth) behind the nipple sits in this view.

    The column is the same fraction of depth in every view; the row is ``offset`` (-1..1) across
    the rows at that column that are inside the breast, outside the pectoral muscle and at least
    ``margin`` pixels from both.
    """
    x = geom.depth * (1.0 - nipple_distance)
    x = float(np.clip(x, 0.08 * geom.depth, 0.92 * geom.depth))
    ok = (geom.x_edge - x > margin) & (x - geom.pectoral_edge > margin)
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        # Breast too thin here for this margin: use the widest row at that depth instead.
        return geom.nipple_row, min(x, geom.depth - margin)
    lo, hi = float(rows.min()), float(rows.max())
    y = lo + (offset + 1.0) / 2.0 * (hi - lo)
    return y, x


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _vessels(rng: np.random.Generator, geom: ViewGeometry) -> np.ndarray:
    """2-5 faint, slightly tortuous vessels running from the chest wall towards the nipple."""
    h, w = geom.height, geom.width
    canvas: np.ndarray = np.zeros((h, w), dtype=np.float32)
    thickness = max(1, round(0.003 * w))
    for _ in range(int(rng.integers(2, 6))):
        y = float(rng.uniform(0.15, 0.85)) * h
        x = 0.0
        angle = float(rng.normal(0.0, 0.25))
        step = 0.04 * geom.depth
        points = [(x, y)]
        while x < 0.85 * geom.depth:
            angle = 0.8 * angle + float(rng.normal(0.0, 0.12))
            x += step * np.cos(angle)
            y += step * np.sin(angle) + 0.02 * (geom.nipple_row - y) * step / geom.depth
            points.append((x, y))
        pts = np.round(np.array(points)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], False, float(rng.uniform(0.5, 1.0)), thickness, cv2.LINE_8)
    canvas = cv2.GaussianBlur(canvas, (0, 0), max(0.5, 0.0015 * w))
    return 0.045 * canvas * geom.mask


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ductal_noise(rng: np.random.Generator, geom: ViewGeometry) -> np.ndarray:
    """Texture elongated along lines radiating from the nipple, like ducts and Cooper ligaments.

    Anisotropic power-law noise is made on a (radius, angle) grid and sampled back to the image
    through a polar warp centred on the nipple.
    """
    h, w = geom.height, geom.width
    # Cells of ~4 px in both directions out to the chest wall: a coarser angular grid would
    # stretch each noise sample into visible straight streaks far from the nipple.
    grid_h = max(64, round(2.0 * np.pi * 1.3 * geom.depth / 4.0))
    grid_w = max(64, round(1.6 * geom.depth / 4.0))
    polar = power_law_noise(rng, (grid_h, grid_w), 2.6, anisotropy=2.2)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = geom.depth - xs
    dy = ys - geom.nipple_row
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    map_x = (r / (1.6 * geom.depth) * (grid_w - 1)).astype(np.float32)
    map_y = ((theta / np.pi + 1.0) * 0.5 * (grid_h - 1)).astype(np.float32)
    texture = cv2.remap(polar, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # The polar grid packs all angles into a point at the nipple; fade the texture there so it
    # does not draw a starburst that looks like a spiculated mass.
    return texture * (0.15 + 0.85 * _smoothstep(r / (0.4 * geom.depth)))


def tissue_attenuation(rng: np.random.Generator, anatomy: BreastAnatomy, geom: ViewGeometry) -> np.ndarray:
    """The attenuation map of the breast (no lesions), float32, 0 outside the breast."""
    h, w = geom.height, geom.width
    depth = geom.depth
    mask = geom.mask
    dist = geom.dist
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]

    # Compressed thickness falls off over the last ~12% of depth towards the skin line.
    t_edge = np.clip(dist / (0.12 * depth), 0.0, 1.0)
    thick = np.sqrt(1.0 - (1.0 - t_edge) ** 2)

    # Fibroglandular tissue lives inside the subcutaneous and retromammary fat.
    # The retromammary boundary follows the outline (a fraction of the local breast depth) and
    # wanders, so the fat band at the chest wall is not a straight vertical edge.
    sub = anatomy.subcutaneous * depth
    relative = xs / np.maximum(geom.x_edge[:, None], 1.0)
    posterior = 0.04 + 0.08 * np.abs(smooth_noise_1d(rng, h, 2.5))[:, None]
    envelope = _smoothstep((dist - sub) / (0.10 * depth)) * _smoothstep((relative - posterior) / 0.35)
    pectoral = _sigmoid((geom.pectoral_edge[:, None] - xs) / max(0.004 * w, 0.5))
    if geom.view == "MLO":
        envelope = envelope * (1.0 - pectoral) * _smoothstep((ys - 0.04 * h) / (0.15 * h))

    fraction, brightness = DENSITY_PARAMS[anatomy.density]
    blobs = upsampled_noise(rng, (h, w), 3.2, factor=4)
    ducts = _ductal_noise(rng, geom)
    field = blobs + 0.3 * ducts
    inside = envelope > 0.5
    threshold = float(np.quantile(field[inside], 1.0 - fraction)) if inside.any() else 0.0
    gland = envelope * _sigmoid((field - threshold) / 0.3)
    fine = power_law_noise(rng, (h, w), 2.0)

    att = thick * (anatomy.fat_level + brightness * gland + 0.035 * ducts * (0.4 + gland) + 0.012 * fine)
    att += thick * _vessels(rng, geom)

    # Skin: a thin bright rim on the skin line.
    skin_w = max(0.0035 * w, 0.8)
    att += 0.2 * np.exp(-((dist / skin_w) ** 2))
    # Nipple/areola: slightly denser.
    areola = 0.06 * depth
    att += 0.06 * np.exp(-((xs - depth) ** 2 + (ys - geom.nipple_row) ** 2) / (areola * areola))

    if geom.view == "MLO":
        pw = max(float(geom.pectoral_edge.max()), 1.0)
        muscle = 0.58 + 0.10 * (1.0 - xs / pw) + 0.025 * blobs + 0.015 * fine
        att = att * (1.0 - pectoral) + pectoral * muscle * np.maximum(thick, 0.6)

    if anatomy.implant:
        cx, cy = 0.30 * depth, geom.nipple_row
        rx, ry = 0.28 * depth, 0.22 * h
        d2 = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
        # Silicone is far denser than tissue: the implant hides what lies over it.
        shell = _smoothstep((1.0 - d2) / 0.08)
        att = att * (1.0 - shell) + shell * (1.15 + 0.01 * fine)

    att = np.where(mask, att, 0.0)
    return att.astype(np.float32)
