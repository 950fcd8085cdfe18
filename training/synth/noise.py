"""Power-law (1/f^beta) noise fields, the texture source of the synthetic parenchyma.

Mammographic parenchyma has a power spectrum close to 1/f^beta with beta around 2.5-3.5
(Burgess et al.), so filtering white noise in the Fourier domain gives texture that looks like
breast tissue at every scale; an FFT keeps it fast enough for thousands of images.
"""

from __future__ import annotations

import cv2
import numpy as np


def power_law_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    beta: float,
    *,
    anisotropy: float = 1.0,
    f_min: float = 1e-3,
) -> np.ndarray:
    """A float32 field of ``shape`` with power spectrum ~ 1/f^beta, zero mean and unit std.

    ``anisotropy`` > 1 stretches structures along the x axis (columns): frequencies along x are
    weighted more, so the field varies slowly in x. ``f_min`` (cycles per pixel) caps the DC
    blow-up so the field is not dominated by one giant gradient.
    """
    if beta < 0 or anisotropy <= 0:
        raise ValueError(f"beta must be >= 0 and anisotropy > 0, got {beta}, {anisotropy}")
    h, w = shape
    white = rng.standard_normal((h, w), dtype=np.float32)
    spectrum = np.fft.rfft2(white)
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt((fx * anisotropy) ** 2 + fy**2)
    amplitude = np.maximum(f, np.float32(f_min)) ** np.float32(-beta / 2.0)
    amplitude[0, 0] = 0.0
    field = np.fft.irfft2(spectrum * amplitude, s=(h, w)).astype(np.float32)
    std = float(field.std())
    return field / std if std > 0 else field


def smooth_noise_1d(rng: np.random.Generator, n: int, beta: float = 3.0) -> np.ndarray:
    """A 1-D power-law profile (zero mean, unit std), used to wobble outlines."""
    return power_law_noise(rng, (max(n, 2), 1), beta)[:n, 0]


def upsampled_noise(
    rng: np.random.Generator, shape: tuple[int, int], beta: float, *, factor: int = 4
) -> np.ndarray:
    """Low-frequency power-law noise made at 1/``factor`` resolution and resized up.

    Steep spectra (beta >= 3) carry almost no energy at high frequencies, so computing them on a
    coarse grid saves most of the FFT time without visible difference.
    """
    h, w = shape
    small = power_law_noise(rng, (max(h // factor, 8), max(w // factor, 8)), beta)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
