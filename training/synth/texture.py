"""The power-law exponent β of phantom texture, to check it stays in the band of real mammograms.

Mammographic parenchyma has a power spectrum close to ``1/f^β`` (Burgess et al.; see
:mod:`training.synth.noise`), and issue 13 holds the phantoms to the band of real images
(median 2.2-3.3 at 2048 rows with 128-px ROIs). The measurement here is ours:

- square ROIs of ``roi`` pixels on a non-overlapping grid, kept when they lie wholly inside the
  breast (the breast mask eroded by half an ROI) and, when ``exclude`` is given, touch none of it;
- each ROI minus its least-squares plane (the thickness fall-off is not texture), times a 2-D
  Hann window, Fourier transformed; the power is averaged over rings of integer radius;
- β is minus the slope of log power against log frequency over ``band`` cycles/mm (default
  0.1-1 cycles/mm: below it an ROI holds too few periods, above it the detector noise flattens
  the spectrum).
"""

from __future__ import annotations

import cv2
import numpy as np

BAND_CYCLES_PER_MM = (0.1, 1.0)


def roi_beta(roi: np.ndarray, mm_per_px: float, band: tuple[float, float] = BAND_CYCLES_PER_MM) -> float:
    """β of one square ROI (see the module docstring)."""
    n = roi.shape[0]
    if roi.shape != (n, n) or n < 16:
        raise ValueError(f"roi must be square and at least 16 px, got {roi.shape}")
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    design = np.stack([np.ones(n * n), yy.ravel(), xx.ravel()], axis=1)
    values = roi.astype(np.float64).ravel()
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    flat = (values - design @ coef).reshape(n, n)
    window = np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fftshift(np.fft.fft2(flat * window))) ** 2
    radius = np.hypot(yy - n // 2, xx - n // 2).round().astype(np.int64).ravel()
    ring_power = np.bincount(radius, weights=power.ravel()) / np.maximum(np.bincount(radius), 1)
    lo = max(1, round(band[0] * n * mm_per_px))
    hi = min(n // 2 - 1, round(band[1] * n * mm_per_px))
    if hi - lo < 3:
        raise ValueError(f"band {band} cycles/mm holds fewer than 4 rings of a {n}-px ROI at {mm_per_px} mm")
    k = np.arange(lo, hi + 1)
    slope = np.polyfit(np.log(k), np.log(np.maximum(ring_power[k], 1e-30)), 1)[0]
    return float(-slope)


def breast_betas(
    pixels: np.ndarray,
    breast_mask: np.ndarray,
    mm_per_px: float,
    *,
    roi: int = 128,
    exclude: np.ndarray | None = None,
) -> list[float]:
    """β of every ROI of the grid that lies inside the breast (and off ``exclude``)."""
    h, w = pixels.shape
    kernel = np.ones((roi + 1, roi + 1), np.uint8)
    inner = cv2.erode(breast_mask.astype(np.uint8), kernel) > 0
    half = roi // 2
    out = []
    for y in range(0, h - roi + 1, roi):
        for x in range(0, w - roi + 1, roi):
            if not inner[y + half, x + half]:
                continue
            if exclude is not None and exclude[y : y + roi, x : x + roi].any():
                continue
            out.append(roi_beta(pixels[y : y + roi, x : x + roi], mm_per_px))
    return out
