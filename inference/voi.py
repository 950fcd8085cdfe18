"""VOI transformation (windowing) to display values in [0, 1], per DICOM PS3.3 C.11.2.

The model sees what a radiologist's viewer shows by default: the first window of the file (with
its VOI LUT Function), or else its first VOI LUT, and then the MONOCHROME1 polarity flip so
that dense tissue is always bright. Files carrying no VOI at all (For Processing images,
Secondary Captures) get the seed-003 treatment: clip to a window, then min-max normalise.

Precedence when a file has both a window and a VOI LUT Sequence (the standard lets the viewer
choose): the window, a fixed choice so every image of a vendor is treated alike in training and
serving, and the only alternative that carries the VOI LUT Function (SIGMOID); the LUT is used
when no valid window exists. (pydicom's ``apply_voi_lut`` prefers the LUT by default.)

The MONOCHROME1 inversion happens here and nowhere else: everything downstream of
:func:`apply_voi` (preprocessing, training transforms) sees "bright = dense".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian

from inference.segmentation import PERCENTILES, largest_region, noise_floor, otsu_thresholds3
from inference.types import InputError

logger = logging.getLogger(__name__)

FallbackMethod = Literal["percentile", "minmax"]

_TABLE_MAX_SPAN = 1 << 20  # integer inputs whose range fits are mapped through a lookup table
_SAMPLE_PIXELS = 250_000  # pixels sampled for the fallback statistics


@dataclass(frozen=True)
class Window:
    """Window Center/Width and VOI LUT Function of one VOI alternative (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class VoiLut:
    """One item of the VOI LUT Sequence: LUT Descriptor decoded, LUT Data as an array."""

    first_mapped: int
    bits: int
    data: np.ndarray


def apply_voi(pixels: np.ndarray, ds: Dataset, *, fallback: FallbackMethod = "percentile") -> np.ndarray:
    """Map Modality-LUT output values to float32 display values in [0, 1], dense tissue bright.

    ``pixels`` is the output of :func:`inference.dicom_pixels.decode_pixels`. VOI tags are honoured
    only for MONOCHROME images (the VOI LUT Module does not apply to colour); everything else,
    and monochrome images without a usable VOI, use ``fallback``.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    monochrome1 = photometric == "MONOCHROME1"
    out: np.ndarray | None = None
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        window = read_window(ds)
        if window is not None:
            out = apply_window(pixels, window)
        else:
            lut = _usable_voi_lut(ds)
            if lut is not None:
                out = apply_lut(pixels, lut)
    if out is None:
        out = fallback_window(pixels, fallback, tissue_bright=not monochrome1)
    if monochrome1:
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Reading the VOI LUT Module
# --------------------------------------------------------------------------------------------


def read_window(ds: Dataset) -> Window | None:
    """The first Window Center/Width pair with its VOI LUT Function, or None if absent/invalid.

    An invalid window (unparseable, LINEAR width < 1, other widths <= 0) is logged and ignored,
    so the image falls through to the VOI LUT Sequence or the fallback instead of being lost.
    """
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = _first_number(ds.WindowCenter)
        width = _first_number(ds.WindowWidth)
    except (ValueError, TypeError, IndexError) as exc:
        logger.warning("ignoring unreadable window: %s", exc)
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        logger.warning("unknown VOI LUT Function %r, using LINEAR", function[:32])
        function = "LINEAR"
    minimum_ok = width >= 1 if function == "LINEAR" else width > 0
    if not (np.isfinite(center) and np.isfinite(width) and minimum_ok):
        logger.warning("ignoring invalid window center=%s width=%s (%s)", center, width, function)
        return None
    return Window(center=center, width=width, function=function)


def read_voi_lut(ds: Dataset) -> VoiLut | None:
    """The first item of the VOI LUT Sequence (PS3.3 C.11.2.1.1), or None if absent.

    LUT Descriptor: number of entries (0 means 65536), first input value mapped, bits per entry.
    The first-mapped value is signed when the VOI input can be negative (Pixel Representation 1
    or a negative Rescale Intercept); pydicom may have read it as US, so 16-bit two's complement
    is undone here. A malformed LUT raises InputError (:func:`apply_voi` then logs it and uses
    the fallback, as for an invalid window).
    """
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        raw = item.LUTData
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"invalid VOI LUT Sequence item: {exc}") from exc
    if len(descriptor) != 3:
        raise InputError(f"invalid VOI LUT Descriptor {descriptor}")
    entries = (descriptor[0] & 0xFFFF) or 65536
    first = descriptor[1]
    bits = descriptor[2] & 0xFFFF
    signed_input = int(ds.get("PixelRepresentation", 0) or 0) == 1 or _rescale_intercept(ds) < 0
    if signed_input and first >= 0x8000:
        first -= 0x10000
    if not 1 <= bits <= 16:
        raise InputError(f"invalid VOI LUT Descriptor bits per entry {bits}")
    data = _lut_data(raw, entries, _little_endian(ds))
    if data.size != entries:
        logger.warning("VOI LUT has %d entries, descriptor says %d", data.size, entries)
    if data.size == 0:
        raise InputError("VOI LUT Data is empty")
    return VoiLut(first_mapped=first, bits=bits, data=data)


def _usable_voi_lut(ds: Dataset) -> VoiLut | None:
    """Like an invalid window, a malformed VOI LUT is logged and the fallback used instead."""
    try:
        return read_voi_lut(ds)
    except InputError as exc:
        logger.warning("ignoring VOI LUT Sequence: %s", exc)
        return None


def _lut_data(raw: Any, entries: int, little_endian: bool) -> np.ndarray:
    """LUT Data as read by pydicom: a list of ints (US) or bytes (OW, 8- or 16-bit entries)."""
    if isinstance(raw, bytes):
        if len(raw) == entries:  # 8-bit entries packed one per byte
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        return np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<u2" if little_endian else ">u2").astype(
            np.int64
        )
    values = raw if isinstance(raw, MultiValue | list | tuple) else [raw]
    return np.asarray([int(v) for v in values], dtype=np.int64)


def _first_number(value: Any) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _rescale_intercept(ds: Dataset) -> float:
    try:
        return float(ds.get("RescaleIntercept", 0) or 0)
    except (ValueError, TypeError):
        return 0.0


def _little_endian(ds: Dataset) -> bool:
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return ts != ExplicitVRBigEndian  # retired


# --------------------------------------------------------------------------------------------
# The transformations (public so a GPU path can be tested against them)
# --------------------------------------------------------------------------------------------


def apply_window(pixels: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), with
    output range y_min = 0, y_max = 1."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return _map(pixels, lambda x: 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)))
    if window.function == "LINEAR_EXACT":
        low, high = c - w / 2.0, c + w / 2.0
        return _map(pixels, lambda x: np.where(x <= low, 0.0, np.where(x > high, 1.0, (x - c) / w + 0.5)))
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1;
    # else ((x - (c - 0.5)) / (w - 1) + 0.5). With w == 1 the middle interval is empty.
    low, high = c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0
    span = max(w - 1.0, 1e-12)
    return _map(
        pixels,
        lambda x: np.where(x <= low, 0.0, np.where(x > high, 1.0, (x - (c - 0.5)) / span + 0.5)),
    )


def apply_lut(pixels: np.ndarray, lut: VoiLut) -> np.ndarray:
    """Look values up in a VOI LUT: inputs below the first mapped value take the first entry,
    above the last take the last (PS3.3 C.11.2.1.1); entries are scaled by 2^bits - 1."""
    full_scale = float((1 << lut.bits) - 1)
    top = int(lut.data.max())
    if top > full_scale:  # vendors that declare 12 bits and store 16
        logger.warning("VOI LUT entries reach %d, above the declared %d bits", top, lut.bits)
        full_scale = float((1 << top.bit_length()) - 1)
    table = lut.data.astype(np.float64) / full_scale
    last = table.size - 1

    def lookup(x: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(x) - lut.first_mapped, 0, last).astype(np.int64)
        return np.asarray(table[index])

    return _map(pixels, lookup)


def fallback_window(
    pixels: np.ndarray, method: FallbackMethod = "percentile", *, tissue_bright: bool = True
) -> np.ndarray:
    """Seed-003 windowing for files without VOI: clip to [low, high], then min-max to [0, 1].

    ``minmax``: low/high are the image minimum and maximum. ``percentile``: the window runs
    from just above the air (its noise floor) to the robust far end of the breast (the 99.5th
    percentile of the breast region), so that the whole breast, skin line included, is above
    black and neither burned-in labels, collimator strips nor dead pixels squash its contrast.
    See :func:`percentile_window` for how air and breast are told apart. A uniform image maps
    to zeros (preprocessing then reports it).
    """
    if pixels.size == 0:
        raise InputError("empty image")
    if method == "minmax":
        low, high = float(np.min(pixels)), float(np.max(pixels))
    elif method == "percentile":
        low, high = percentile_window(pixels, tissue_bright=tissue_bright)
    else:
        raise ValueError(f"unknown fallback window {method!r}")
    if not high > low:
        return np.zeros(pixels.shape, dtype=np.float32)
    scale = 1.0 / (high - low)
    return _map(pixels, lambda x: np.clip((x - low) * scale, 0.0, 1.0))


def percentile_window(pixels: np.ndarray, *, tissue_bright: bool = True) -> tuple[float, float]:
    """The ``percentile`` fallback window (low, high) in the units of ``pixels``.

    A mammogram's histogram has more than two modes: air, tissue, and often a third, small but
    far away: a collimator or scanner-border strip and burned-in text (as bright as the
    brightest tissue or brighter), a silicone implant, the pectoral muscle. A two-class Otsu
    split then separates that mode from everything else, air and breast land in one class, and
    the window misses the breast (for MONOCHROME1 it went entirely black). So:

    * the air/tissue boundary is the air-side threshold of a *three*-class Otsu, which keeps
      air a class of its own whatever extra mode is present;
    * the window starts at the air's noise floor (its median plus AIR_NOISE_SIGMAS noise
      deviations, the noise measured on the air's dark half, which faint tissue cannot reach),
      at most the 99.5th percentile of the air class; so the faint skin line stays above black;
    * the window ends at the 99.5th percentile of the breast: the largest connected region
      above the threshold once thin bands along the image edges are removed, the same test the
      crop uses (:func:`remove_edge_bands`). Strips and labels lie outside it.

    Statistics come from a strided sample of about _SAMPLE_PIXELS pixels (a few milliseconds
    even for a 3328x2560 image). Without a separable background (less than 1 % on either side
    of the threshold) the window is the 0.5-99.5 percentiles of the whole image.
    """
    step = max(1, int(np.ceil(np.sqrt(pixels.size / _SAMPLE_PIXELS))))
    sample = np.asarray(pixels[::step, ::step] if pixels.ndim == 2 else pixels[::step], dtype=np.float64)
    oriented = sample if tissue_bright else -sample  # from here on tissue is high, air low
    finite = np.isfinite(oriented)
    values = oriented[finite]
    if values.size == 0:
        raise InputError("image has no finite pixel values")
    threshold = otsu_thresholds3(values)[0]
    tissue = finite & (oriented > threshold)
    n_tissue = int(np.count_nonzero(tissue))
    if min(n_tissue, values.size - n_tissue) < 0.01 * values.size:  # no separable background
        low, high = (float(v) for v in np.percentile(values, PERCENTILES))
    else:
        low = noise_floor(oriented[finite & ~tissue])
        breast = largest_region(tissue) if oriented.ndim == 2 else tissue
        high = float(np.percentile(oriented[breast], PERCENTILES[1]))
    if not high > low:
        low, high = float(values.min()), float(values.max())
    return (low, high) if tissue_bright else (-high, -low)


def _map(pixels: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an elementwise float64 function, through a lookup table for integer images.

    A 16-bit mammogram has at most 65536 distinct values, so evaluating ``fn`` once per value
    and indexing is both exact and several times faster than evaluating it per pixel.
    """
    if np.issubdtype(pixels.dtype, np.integer) and pixels.size > 0:
        low, high = int(pixels.min()), int(pixels.max())
        if high - low < _TABLE_MAX_SPAN:
            table = np.asarray(fn(np.arange(low, high + 1, dtype=np.float64)), dtype=np.float32)
            if np.issubdtype(pixels.dtype, np.unsignedinteger):
                # pixels >= low, so the subtraction cannot wrap and no wider copy is needed
                index = pixels if low == 0 else pixels - pixels.dtype.type(low)
                return np.asarray(table[index])
            return np.asarray(table[pixels.astype(np.int64) - low])
    return np.asarray(fn(pixels.astype(np.float64)), dtype=np.float32)
