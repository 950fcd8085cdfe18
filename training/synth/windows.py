"""The VOI windows written into the phantoms (DICOM PS3.3 C.11.2); :mod:`inference.voi` applies them.

Mammography units disagree on how they tell a viewer to display an image: a LINEAR window, a
LINEAR_EXACT or SIGMOID one, several windows, a VOI LUT Sequence, or nothing at all. The RSNA
winners' preprocessing handles each, so the phantoms carry each, computed from the pixels so that
every variant shows the breast well.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

VOI_STYLES: tuple[str, ...] = ("linear", "linear_exact", "sigmoid", "multi", "lut", "none")
"""``multi`` = two LINEAR windows (normal, harder); ``lut`` = a VOI LUT Sequence; ``none`` = no VOI."""


def tissue_range(
    pixels: np.ndarray, bits_stored: int, breast_mask: np.ndarray | None = None
) -> tuple[float, float]:
    """Low and high values of the breast in MONOCHROME2-sense ``pixels``.

    With ``breast_mask`` only the breast counts. Without it, foreground is what clearly exceeds
    the detector offset, minus saturated text; a collimator strip then widens the window a bit.
    The top percentile is high enough that dense tissue and lesions are not clipped.
    """
    maxval = (1 << bits_stored) - 1
    sample = pixels[::2, ::2].astype(np.float32)
    if breast_mask is not None:
        if breast_mask.shape != pixels.shape:
            raise ValueError(f"breast_mask shape {breast_mask.shape} != pixels {pixels.shape}")
        foreground = sample[breast_mask[::2, ::2].astype(bool)]
    else:
        foreground = sample[(sample > 0.06 * maxval) & (sample < 0.99 * maxval)]
    if foreground.size < 16:
        return 0.0, float(maxval)
    lo, hi = np.percentile(foreground, [0.5, 99.99])
    return float(lo), float(max(hi, lo + 1.0))


def window_for(
    pixels: np.ndarray,
    bits_stored: int,
    monochrome1: bool,
    widen: float = 1.1,
    breast_mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """A (center, width) window on *stored* values covering the breast tissue."""
    lo, hi = tissue_range(pixels, bits_stored, breast_mask)
    if monochrome1:
        maxval = (1 << bits_stored) - 1
        lo, hi = maxval - hi, maxval - lo
    center = round((lo + hi) / 2.0)
    width = round((hi - lo) * widen) or 1
    return float(center), float(width)


def apply_voi_tags(ds: Dataset, style: str, window: tuple[float, float], bits_stored: int) -> None:
    """Add the VOI LUT module attributes of ``style`` to ``ds`` for ``window`` (stored values)."""
    if style not in VOI_STYLES:
        raise ValueError(f"voi must be one of {VOI_STYLES}, got {style!r}")
    center, width = _number(window[0]), _number(window[1])
    if style == "none":
        return
    if style == "lut":
        ds.VOILUTSequence = Sequence([_lut_item(center, width, bits_stored)])
        return
    if style == "multi":
        ds.WindowCenter = [center, center]
        ds.WindowWidth = [width, round(width * 0.7) or 1]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER"]
        ds.VOILUTFunction = "LINEAR"
        return
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "SYNTHETIC"
    ds.VOILUTFunction = style.upper()


def _number(value: float) -> float | int:
    """Integral window values are written as "2048", not "2048.0", like most units do."""
    return int(value) if float(value).is_integer() else float(value)


def _lut_item(center: float, width: float, bits_stored: int) -> Dataset:
    """A VOI LUT Sequence item: a sigmoid-shaped table over the window, bits_stored-bit output."""
    maxval = (1 << bits_stored) - 1
    first = int(max(0, round(center - width / 2.0)))
    last = int(min(maxval, round(center + width / 2.0)))
    n = max(last - first + 1, 2)
    x = np.linspace(-4.0, 4.0, n)
    curve = 1.0 / (1.0 + np.exp(-x))
    curve = (curve - curve[0]) / (curve[-1] - curve[0])
    table = np.rint(curve * maxval).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [n if n < 65536 else 0, first, bits_stored]
    item["LUTDescriptor"].VR = "US"
    item.LUTExplanation = "SYNTHETIC SIGMOID"
    item.add(DataElement(0x00283006, "OW", table.tobytes()))  # LUT Data
    return item
