"""Defects of the digitised film itself (``film`` style only): digitiser borders and scratches.

They belong to the film and the scanner, not to the X-ray, so they are drawn on the scanned
pixels at full size (after :func:`training.synth.film.render_film_view` resamples the phantom),
in stored values. In the MONOCHROME2 sense of the phantoms clear film is bright: a scratch that
takes the emulsion off is a bright line, dust or a hair a dark one; the scanner bed beyond the
film edge shows as a bright or black band along an edge.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.synth.distractor_shapes import polyline_patch, wander
from training.synth.lesions import paste_max

EDGES: tuple[str, ...] = ("top", "bottom", "left", "right")


def _clear(keep_out: np.ndarray, mask: np.ndarray) -> bool:
    return not bool((keep_out & mask).any())


def digitiser_border(
    rng: np.random.Generator, pixels: np.ndarray, maxval: int, keep_out: np.ndarray
) -> np.ndarray | None:
    """A band along one edge, 0.3-2.5% of the image deep and wedge-shaped (the film sat a little
    skewed in the scanner), bright (scanner light) or black; returns its mask, None if it would
    cover ``keep_out``."""
    h, w = pixels.shape
    edge = EDGES[int(rng.integers(len(EDGES)))]
    across = h if edge in ("top", "bottom") else w
    along = w if edge in ("top", "bottom") else h
    t0 = rng.uniform(0.003, 0.025) * across
    t1 = t0 * rng.uniform(0.4, 1.6)
    depth = np.linspace(t0, t1, along, dtype=np.float32)[None, :]
    pos = np.arange(across, dtype=np.float32)[:, None]
    if edge in ("bottom", "right"):
        pos = across - 1 - pos
    band = pos < depth  # (across, along)
    mask = band if edge in ("top", "bottom") else band.T
    if not mask.any() or not _clear(keep_out, mask):
        return None
    level = rng.uniform(0.9, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.02)
    noise = rng.normal(0.0, 0.003, int(mask.sum()))
    pixels[mask] = np.clip(np.rint((level + noise) * maxval), 0, maxval).astype(pixels.dtype)
    return mask


def scratch(
    rng: np.random.Generator, pixels: np.ndarray, maxval: int, keep_out: np.ndarray, mm: float
) -> np.ndarray | None:
    """A scratch 20-150 mm long, 1-3 scan pixels wide, running mostly along the film's long axis
    (the way film travels through processor rollers); bright, or one in four dark (dust, hair).
    Returns its mask, None if it would cover ``keep_out``."""
    h, w = pixels.shape
    length = rng.uniform(20.0, 150.0) / mm
    long_axis = np.pi / 2 if h >= w else 0.0
    heading = long_axis + rng.normal(0.0, 0.12) + (np.pi if rng.random() < 0.5 else 0.0)
    start = (rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h)
    path = wander(rng, start, heading, length, max(length / 40.0, 2.0), 0.01)
    found = polyline_patch([path], rng.uniform(1.0, 3.0), pad=2.0)
    if found is None:
        return None
    cover, y0, x0 = found
    # Work on the patch grown by one pixel, clipped to the image.
    ty0, tx0 = max(y0 - 1, 0), max(x0 - 1, 0)
    ty1, tx1 = min(y0 + cover.shape[0] + 1, h), min(x0 + cover.shape[1] + 1, w)
    if ty0 >= ty1 or tx0 >= tx1:
        return None
    local = np.zeros((ty1 - ty0, tx1 - tx0), dtype=np.float32)
    paste_max(local, cover, y0 - ty0, x0 - tx0)
    grown_local = cv2.dilate((local > 0.05).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not grown_local.any() or (keep_out[ty0:ty1, tx0:tx1] & grown_local).any():
        return None
    sign = 1.0 if rng.random() < 0.75 else -1.0
    region = pixels[ty0:ty1, tx0:tx1].astype(np.float32) + sign * rng.uniform(0.1, 0.3) * maxval * local
    pixels[ty0:ty1, tx0:tx1] = np.clip(np.rint(region), 0, maxval).astype(pixels.dtype)
    grown = np.zeros((h, w), dtype=bool)
    grown[ty0:ty1, tx0:tx1] = grown_local
    return grown
