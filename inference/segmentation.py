"""Telling the breast from air, strips and labels: the segmentation behind the VOI fallback window
(:func:`inference.voi.percentile_window`) and the crop (:func:`inference.preprocessing.find_breast`).

Both use the same tests (a three-class Otsu split, the air's noise floor, edge bands), so they
agree on what is breast and what is a collimator strip.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PERCENTILES = (0.5, 99.5)
"""Robust ends of the ``percentile`` fallback window (outliers: noise, labels, dead pixels)."""
AIR_NOISE_SIGMAS = 3.0
"""The ``percentile`` window starts this many air-noise deviations above the air level."""
EDGE_BAND_MAX = 0.05
"""A bright band along an image edge at most this thick (share of the side) is a border strip..."""
EDGE_BAND_FILL = 0.8
"""...when each of its lines is at least this full..."""
EDGE_BAND_DROP = 0.25
"""...and the first line inside it is emptier by at least this much (a breast fades gradually)."""


def noise_floor(air: np.ndarray) -> float:
    """Where the air ends: its median plus AIR_NOISE_SIGMAS deviations, at most its 99.5th
    percentile. ``air`` is the class below an air/tissue threshold (air plus the faintest
    tissue). The deviation is measured below the median (median minus 15.87th percentile, one
    sigma of a normal distribution) because faint tissue under the threshold only ever adds
    values above the air, while the dark half is pure detector noise. Also used by the crop
    (:func:`inference.preprocessing.find_breast`) to follow the faint skin line."""
    one_sigma_below, median, robust_end = np.percentile(air, [15.87, 50.0, PERCENTILES[1]])
    return float(min(robust_end, median + AIR_NOISE_SIGMAS * (median - one_sigma_below)))


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The breast in a tissue mask: edge bands cleared, specks opened away, largest component.

    When nothing survives the cleaning (tissue only in thin slivers) the mask is kept as is,
    so the window never depends on an empty set.
    """
    cleaned = remove_edge_bands(mask)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    opened = cv2.morphologyEx(cleaned.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count <= 1:
        return mask
    return np.asarray(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))


def remove_edge_bands(mask: np.ndarray) -> np.ndarray:
    """Clear thin, nearly full bands along the image edges (collimator or scanner borders).

    A band qualifies when it is at most EDGE_BAND_MAX thick, each line is EDGE_BAND_FILL full,
    and the line just inside is clearly emptier: a breast touching the edge fades gradually
    and is kept, a strip ends abruptly. Shared by the fallback window and the crop
    (:func:`inference.preprocessing.find_breast`), so both agree on what a strip is.
    Returns a new mask; ``mask`` is not modified.
    """
    mask = np.array(mask, dtype=bool)
    views = (mask, mask[::-1], mask.T, mask.T[::-1])  # top, bottom, left, right (writable views)
    for view in views:
        lines = view.shape[0]
        if lines < 2:
            continue
        fill = view.mean(axis=1)
        limit = min(max(1, math.ceil(EDGE_BAND_MAX * lines)), lines - 1)
        full = fill[: limit + 1] >= EDGE_BAND_FILL
        thickness = int(np.argmin(full)) if not full.all() else limit + 1
        if 0 < thickness <= limit and fill[thickness] <= fill[:thickness].min() - EDGE_BAND_DROP:
            view[:thickness] = False
    return mask


def otsu_thresholds3(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """The two thresholds of a three-class Otsu split of any-range values (ascending).

    Each threshold is the upper edge of the last bin of the class below it. Exhaustive over the
    ``bins`` x ``bins`` pairs, vectorised (a 256-bin histogram costs about two milliseconds):
    maximising the between-class variance equals maximising sum(S_k^2 / P_k) over the classes,
    with P_k the class weight and S_k its first moment.
    """
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return lo, lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    weight = np.concatenate(([0.0], np.cumsum(hist, dtype=np.float64)))
    centers = (edges[:-1] + edges[1:]) / 2.0 - (lo + hi) / 2.0  # centred: same argmax, no cancellation
    moment = np.concatenate(([0.0], np.cumsum(hist * centers)))

    def term(start: np.ndarray | int, stop: np.ndarray | int) -> np.ndarray:
        w = weight[stop] - weight[start]
        s = moment[stop] - moment[start]
        return np.asarray(np.where(w > 0, s * s / np.maximum(w, 1e-12), 0.0))

    # class 0 = bins [0, i), class 1 = [i, j), class 2 = [j, bins), 1 <= i < j <= bins - 1
    i = np.arange(1, bins)[:, None]
    j = np.arange(1, bins)[None, :]
    score = np.where(j > i, term(0, i) + term(i, j) + term(j, bins), -np.inf)
    first, second = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(edges[int(first) + 1]), float(edges[int(second) + 1])
