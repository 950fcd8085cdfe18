"""Decoding the pixels of untrusted DICOM datasets (tags: :mod:`inference.dicom_header`).

Every failure becomes an :class:`~inference.types.InputError` with a one-line reason (design
invariant 2); size limits are checked before anything is allocated. Training decodes its DICOM
files through the same function (design invariant 4).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from inference.dicom_header import brief, optional_int, optional_text, parse_elements
from inference.types import InputError

logger = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000
"""Largest Rows x Columns decoded; bigger is refused before any memory is allocated."""


# Decoder plugins tried in order. gdcm is deliberately absent: on a corrupt JPEG-LS stream it
# throws an uncaught C++ exception that aborts the whole process (found by fuzzing), which
# would let one bad file take the node down (design invariant 2).
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode the first frame to a 2-D array of stored values with the Modality LUT applied.

    Every transfer syntax pydicom knows is handled (native, RLE, JPEG lossless/lossy, JPEG-LS,
    JPEG 2000, HTJ2K) through the pylibjpeg/pyjpegls plugins (pydicom's own RLE and Pillow as
    fallbacks; gdcm is not used, see ``_PLUGIN_ORDER``). The result is
    the decoder's integer dtype, or float32 when a rescale or Modality LUT applies. Colour
    images (Secondary Captures) are converted to grey. Size limits are checked before decoding,
    so a hostile header cannot make the node allocate gigabytes.
    """
    arr = decode_stored(ds)
    return modality_values(arr, ds)


def check_pixel_module(ds: Dataset) -> UID:
    """Check what can be checked before decoding (pixel data present, size limits, layout) and
    return the transfer syntax; InputError with a one-line reason otherwise."""
    parse_elements(ds)
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError("float pixel data is not supported")
        raise InputError("no pixel data (7FE0,0010)")
    rows, cols = optional_int(ds, "Rows"), optional_int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise InputError(f"invalid image size {rows}x{cols}")
    if rows * cols > MAX_PIXELS:
        raise InputError(f"image too large: {rows}x{cols} exceeds {MAX_PIXELS} pixels")
    samples = optional_int(ds, "SamplesPerPixel") or 1
    bits = optional_int(ds, "BitsAllocated")
    if samples not in (1, 3) or bits not in (8, 16, 32):
        raise InputError(f"unsupported pixel layout: {samples} samples of {bits} bits")
    photometric = optional_text(ds, "PhotometricInterpretation").upper()
    if photometric == "PALETTE COLOR":
        raise InputError("PALETTE COLOR images are not supported")
    frames = optional_int(ds, "NumberOfFrames") or 1
    if frames > 1:
        logger.warning("multi-frame image (%d frames): using the first frame only", frames)
    ts = _transfer_syntax(ds)
    _check_native_length(ds, ts, rows * cols * samples * bits // 8)
    return ts


def decode_stored(ds: Dataset) -> np.ndarray:
    """The first frame's stored values as a 2-D array (colour converted to grey), no Modality LUT:
    :func:`decode_pixels` without its last step, for the resolution pyramid
    (:mod:`inference.reduced_decode`), which is built on stored values."""
    ts = check_pixel_module(ds)
    rows, cols = optional_int(ds, "Rows"), optional_int(ds, "Columns")
    arr = _decode_first_frame(ds, ts)
    if arr.shape[:2] != (rows, cols):
        raise InputError(f"decoded frame is {arr.shape[:2]}, header says {rows}x{cols}")
    if arr.ndim == 3:
        arr = _to_grey(arr)
    elif arr.ndim != 2:
        raise InputError(f"unexpected decoded shape {arr.shape}")
    return arr


def modality_values(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values (of any pyramid level) to modality values: the Modality LUT or rescale of a
    grey image; a colour source (already converted to grey) has none."""
    samples = optional_int(ds, "SamplesPerPixel") or 1
    return _modality_lut(arr, ds) if samples == 1 else arr


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    ts = optional_text(file_meta, "TransferSyntaxUID") if file_meta is not None else ""
    if not ts:
        raise InputError("missing Transfer Syntax UID (0002,0010)")
    uid = UID(ts)
    if not uid.is_transfer_syntax:
        raise InputError(f"unknown transfer syntax {ts[:64]!r}")
    return uid


def _check_native_length(ds: Dataset, ts: UID, frame_bytes: int) -> None:
    if ts.is_compressed:
        return
    raw = ds.get_item("PixelData")
    value = raw.value if raw is not None else None
    if isinstance(value, bytes) and len(value) < frame_bytes:
        raise InputError(f"pixel data is truncated: {len(value)} bytes, a frame needs {frame_bytes}")


def _decode_first_frame(ds: Dataset, ts: UID) -> np.ndarray:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise InputError(f"unsupported transfer syntax {ts.name} ({ts})") from exc
    if not decoder.is_available:
        raise InputError(f"no decoder installed for transfer syntax {ts.name} ({ts})")
    if ts.is_compressed:
        available = set(decoder.available_plugins)
        plugins = [p for p in _PLUGIN_ORDER if p in available]
        if not plugins:
            raise InputError(f"no safe decoder installed for transfer syntax {ts.name} ({ts})")
    else:
        plugins = [""]
    errors: list[str] = []
    for plugin in plugins:
        try:
            arr = pixel_array(ds, index=0, decoding_plugin=plugin)
        except BaseException as exc:  # any codec failure: try the next plugin
            # Rust codecs (pylibjpeg-rle) report corrupt streams as pyo3 PanicException, which
            # derives from BaseException; only genuine interpreter exits are re-raised.
            if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
            logger.debug("decoder plugin %r failed on %s: %s", plugin, ts.name, exc)
            errors.append(f"{plugin or 'native'}: {brief(exc)}")
            continue
        if plugin != plugins[0]:
            logger.info("decoded %s with the %s fallback", ts.name, plugin)
        return np.asarray(arr)
    raise InputError(f"cannot decode pixel data in transfer syntax {ts.name} ({ts}): {errors[-1]}")


def _to_grey(arr: np.ndarray) -> np.ndarray:
    """RGB (pydicom converts YBR to RGB) to luma, keeping the integer dtype when cv2 can."""
    if arr.shape[2] != 3:
        raise InputError(f"unexpected decoded shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY))
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.asarray(arr.astype(np.float32) @ weights)


def _modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply RescaleSlope/Intercept or a Modality LUT Sequence (PS3.3 C.11.1)."""
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(arr, ds))
        except Exception as exc:
            raise InputError(f"invalid Modality LUT Sequence: {brief(exc)}") from exc
    slope, intercept = rescale_parameters(ds)
    if slope == 1.0 and intercept == 0.0:
        return arr
    return (arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def rescale_parameters(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent); InputError when unusable.

    Also read by the GPU path (:mod:`inference.preprocessing_dali`), which folds them into the
    window it applies on the device, so both paths refuse the same values.
    """
    slope = _optional_float(ds, "RescaleSlope", 1.0)
    intercept = _optional_float(ds, "RescaleIntercept", 0.0)
    if slope == 0.0:
        raise InputError("invalid RescaleSlope 0")
    return slope, intercept


def _optional_float(ds: Dataset, keyword: str, default: float) -> float:
    text = optional_text(ds, keyword)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise InputError(f"invalid {keyword}: {text[:32]!r}") from exc
    if not np.isfinite(value):
        raise InputError(f"invalid {keyword}: {text[:32]!r}")
    return value
