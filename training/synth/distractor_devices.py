"""The larger distractors: pacemakers and ports, lead letters, compression-paddle edges.

Same contract as :mod:`training.synth.distractor_shapes`: canonical frame (chest wall left),
millimetres through the :class:`Scene`, one :class:`Drawn` patch or None.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from training.synth.distractor_shapes import METAL, Drawn, Scene, as_drawn, blur, polyline_patch, wander
from training.synth.lesions import paste_max

LABEL_TEXTS: tuple[str, ...] = ("{lat}", "{lat}{view}", "{lat} {view}", "{lat}")
"""What technologists spell with lead letters: the side, often with the view."""
CORNER_ROWS = 0.15
CORNER_COLUMNS = 0.35
"""Lead letters keep out of the corners away from the chest wall (fractions of the width/height),
where the burned-in label of :mod:`training.synth.overlays` may go."""


def _superellipse(a: float, b: float, rot: float, power: float = 4.0) -> tuple[np.ndarray, int]:
    """A filled rounded rectangle of half sizes ``a`` x ``b`` pixels (edge softened by one pixel)."""
    half = math.ceil(max(a, b)) + 3
    ax = np.arange(-half, half + 1, dtype=np.float32)
    yy, xx = ax[:, None], ax[None, :]
    c, s = math.cos(rot), math.sin(rot)
    u, v = xx * c + yy * s, -xx * s + yy * c
    r = (np.abs(u / a) ** power + np.abs(v / b) ** power) ** (1.0 / power)
    return np.clip((1.0 - r) * min(a, b), 0.0, 1.0).astype(np.float32), half


def chest_device(rng: np.random.Generator, scene: Scene, port: bool = False) -> Drawn | None:
    """A pacemaker (40-55 x 35-50 mm can, 1-2 leads) or a port (25-32 mm chamber, catheter) at
    the upper chest-wall corner, partly outside the image, as on an MLO view; on a CC view at the
    chest-wall edge."""
    h, w = scene.shape
    if port:
        a = b = scene.px(rng.uniform(25.0, 32.0)) / 2.0
    else:
        a, b = scene.px(rng.uniform(40.0, 55.0)) / 2.0, scene.px(rng.uniform(35.0, 50.0)) / 2.0
    body, half = _superellipse(a, b, rng.uniform(-0.6, 0.6), power=2.0 if port else 4.0)
    if port:
        # The silicone septum in the middle of a port is far less dense than its titanium rim.
        septum, inner = _superellipse(0.55 * a, 0.55 * b, 0.0, power=2.0)
        cut = half - inner
        body[cut : cut + septum.shape[0], cut : cut + septum.shape[1]] *= 1.0 - 0.6 * septum
    cx = rng.uniform(-0.5, 0.4) * a
    cy = rng.uniform(-0.5, 0.4) * b if scene.geom.view == "MLO" else rng.uniform(0.05, 0.6) * h
    profile = np.zeros((h, w), dtype=np.float32)
    paste_max(profile, body * np.float32(rng.uniform(1.6, 2.4)), round(cy) - half, round(cx) - half)
    wires: list[np.ndarray] = []
    for _ in range(1 if port else int(rng.integers(1, 3))):
        heading = rng.uniform(0.2, 1.3)  # into the image: right and down from the device
        wires.append(wander(rng, (cx, cy), heading, scene.px(rng.uniform(40.0, 90.0)), scene.px(3.0), 0.12))
    found = polyline_patch(wires, scene.px(rng.uniform(1.5, 2.5)))
    if found is not None:
        cover, wy, wx = found
        paste_max(profile, blur(cover) * np.float32(0.5 if port else rng.uniform(0.9, 1.3)), wy, wx)
    if not (profile >= 0.02).any():
        return None
    return as_drawn(profile, 1.0, 0, 0)


def _label_spots(scene: Scene, half_h: float, half_w: float, clearance: float) -> np.ndarray:
    """Centres where a label box of that half size sits in air, ``clearance`` from the breast and
    the image edges, and outside the burned-in label corners."""
    geom = scene.geom
    h, w = scene.shape
    air = (~geom.mask).astype(np.uint8)
    to_breast = cv2.distanceTransform(air, cv2.DIST_L2, 5)
    ok = to_breast > math.hypot(half_h, half_w) + clearance
    edge = max(0.03 * w, clearance)
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    ok &= (ys > half_h + edge) & (ys < h - half_h - edge) & (xs > half_w + edge) & (xs < w - half_w - edge)
    corner_rows = (ys < CORNER_ROWS * h + half_h) | (ys > (1.0 - CORNER_ROWS) * h - half_h)
    ok &= ~(corner_rows & (xs > (1.0 - CORNER_COLUMNS) * w - half_w))
    return np.argwhere(ok)


def metal_label(rng: np.random.Generator, scene: Scene, laterality: str) -> Drawn | None:
    """Lead letters (``R``, ``LMLO``, ...) 6-12 mm high, placed by the technologist in the air
    beside the breast, slightly rotated and blurred: not the pixel-exact burned-in text."""
    form = LABEL_TEXTS[int(rng.integers(len(LABEL_TEXTS)))]
    text = form.format(lat=laterality, view=scene.geom.view)
    height = scene.px(rng.uniform(6.0, 12.0))
    scale = height / 22.0  # cv2's Hershey glyphs are about 22 units high at scale 1
    thickness = max(1, round(0.14 * height))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, thickness)
    pad = thickness + 3
    ink = np.zeros((th + base + 2 * pad, tw + 2 * pad), dtype=np.uint8)
    cv2.putText(ink, text, (pad, pad + th), cv2.FONT_HERSHEY_DUPLEX, scale, 255, thickness, cv2.LINE_AA)
    canvas = ink.astype(np.float32) / 255.0
    if laterality == "L":
        canvas = canvas[:, ::-1]  # the canonical frame is mirrored back for left breasts
    angle = rng.uniform(-15.0, 15.0)
    ch, cw = canvas.shape
    side = math.ceil(math.hypot(ch, cw)) + 2
    m = cv2.getRotationMatrix2D((cw / 2.0, ch / 2.0), angle, 1.0)
    m[:, 2] += [(side - cw) / 2.0, (side - ch) / 2.0]
    glyphs = cv2.warpAffine(canvas, m, (side, side), flags=cv2.INTER_LINEAR)
    spots = _label_spots(scene, side / 2.0, side / 2.0, scene.px(3.0))
    if spots.size == 0:
        return None
    cy, cx = spots[int(rng.integers(len(spots)))]
    return as_drawn(
        blur(np.asarray(glyphs, dtype=np.float32)), rng.uniform(*METAL), cy - side // 2, cx - side // 2
    )


def paddle_edge(rng: np.random.Generator, scene: Scene) -> Drawn | None:
    """The edge of the compression paddle: a faint straight line across the image (plastic, not
    metal): nearly horizontal near the top or bottom of a CC view, across the upper chest-wall
    corner of an MLO view."""
    h, w = scene.shape
    if scene.geom.view == "MLO":
        angle = rng.uniform(np.pi / 6, np.pi / 3)
        reach = rng.uniform(0.08, 0.25) * w
        normal = (math.cos(angle), math.sin(angle))
        point = (reach * normal[0], reach * normal[1])
    else:
        angle = rng.uniform(-0.14, 0.14)
        top = rng.random() < 0.5
        row = rng.uniform(0.03, 0.18) * h
        point = (w / 2.0, row if top else h - row)
        normal = (-math.sin(angle), math.cos(angle)) if top else (math.sin(angle), -math.cos(angle))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    signed = (xs - point[0]) * normal[0] + (ys - point[1]) * normal[1]
    rim_width = max(scene.px(rng.uniform(0.5, 1.5)), 0.7)
    rim = np.exp(-((signed / rim_width) ** 2)).astype(np.float32)
    drawn = as_drawn(rim, rng.uniform(0.05, 0.1), 0, 0)
    return drawn if drawn.mask.any() else None
