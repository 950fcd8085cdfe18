"""Decode only the resolution the model and the capture need (:mod:`inference.pyramid`).

A lossless JPEG 2000 or HTJ2K code stream is decoded at half resolution by openjpeg's own reduced
decode (Pillow's binding, ``Image.reduce``), which skips the finest wavelet level: a 3328x2560
mammogram in about a fifth of the full decode's time. The coarser levels are then computed from that
one (:class:`~inference.pyramid.Pyramid`), because a decoder clips only its final output and the
pyramid's definition clips every level: a one-step reduced decode is bit-exact with it, a deeper one
is not. Everything else is decoded in full (:func:`inference.dicom_pixels.decode_stored`) and its
levels computed, so whichever way an image arrives it gives the same arrays. A full decode is also
the fallback whenever the reduced one is not possible (not a single-tile raw code stream at the
origin, irreversible (lossy) wavelet, signed or 8-bit samples, a level the stream does not have) or
fails.

Like every decoder, this runs only in the pixel pool's child processes (design invariant 8):
openjpeg's reduced path has crashed on hostile streams before.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from inference.dicom_header import brief, optional_int
from inference.dicom_pixels import check_pixel_module, decode_stored, modality_values
from inference.pyramid import MAX_LEVEL, Pyramid, sample_range
from inference.types import InputError

logger = logging.getLogger(__name__)

REDUCED_SYNTAXES = frozenset(
    {
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,  # may still be reversible: the code stream says
    }
)
"""Transfer syntaxes whose code stream is a wavelet pyramid openjpeg can stop early in."""
DIRECT_LEVEL = 1
"""The one level decoded directly (see the module docstring)."""

_COD, _COC, _SOT = 0xFF52, 0xFF53, 0xFF90


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a raw code stream says, as far as a reduced decode cares."""

    rows: int
    columns: int
    precision: int
    signed: bool
    components: int
    tiles: int
    at_origin: bool
    levels: int  # decomposition levels of component 0 (COD, or its COC)
    reversible: bool  # 5/3 wavelet (lossless); False for 9/7


class SourceLevels:
    """The levels of one source image as preprocessing and the capture ask for them.

    Decodes lazily: the first request decodes at that level or ``finest``, whichever is finer (a
    reduced decode where possible); a request finer than what was decoded decodes again in full
    (rare: a breast so small in the image that the model needs the source resolution).
    """

    def __init__(self, ds: Dataset, finest: int = MAX_LEVEL) -> None:
        self.ds = ds
        self.finest = finest
        self._pyramid: Pyramid | None = None
        self.rows = optional_int(ds, "Rows")
        self.columns = optional_int(ds, "Columns")

    @classmethod
    def from_stored(cls, ds: Dataset, stored: np.ndarray) -> SourceLevels:
        """The levels of an image another decoder (DALI) decoded in full."""
        source = cls(ds, 0)
        source._pyramid = pyramid_of_stored(ds, stored)
        return source

    @property
    def decoded_level(self) -> int | None:
        """The finest level decoded so far (None before the first request)."""
        return None if self._pyramid is None else self._pyramid.base

    def level(self, r: int) -> np.ndarray:
        """Stored values at level ``r`` (trimmed, see :meth:`Pyramid.level`)."""
        if self._pyramid is None or r < self._pyramid.base:
            self._pyramid = decode_pyramid(self.ds, min(r, self.finest) if self._pyramid is None else r)
        return self._pyramid.level(r)

    def modality(self, r: int) -> np.ndarray:
        """Modality values (Modality LUT or rescale applied) at level ``r``."""
        return modality_values(self.level(r), self.ds)


def decode_pyramid(ds: Dataset, finest: int) -> Pyramid:
    """The source's :class:`~inference.pyramid.Pyramid` holding level ``min(finest, 1)`` or finer.

    ``finest`` is the finest level any consumer will ask for; a reduced decode is used when it is
    at least 1 and the code stream allows it, else the image is decoded in full. InputError as
    :func:`inference.dicom_pixels.decode_pixels` raises it.
    """
    ts = check_pixel_module(ds)
    rows, cols = optional_int(ds, "Rows"), optional_int(ds, "Columns")
    if finest >= DIRECT_LEVEL and ts in REDUCED_SYNTAXES:
        reduced = _reduced(ds, rows, cols)
        if reduced is not None:
            return reduced
    return pyramid_of_stored(ds, decode_stored(ds))


def pyramid_of_stored(ds: Dataset, stored: np.ndarray) -> Pyramid:
    """The pyramid of a fully decoded image (its stored values, level 0), clipped as a JPEG 2000
    decoder of the same code stream would clip it."""
    ts = check_pixel_module(ds)
    rows, cols = optional_int(ds, "Rows"), optional_int(ds, "Columns")
    bits = optional_int(ds, "BitsStored") or stored.dtype.itemsize * 8
    signed = optional_int(ds, "PixelRepresentation") == 1 and np.issubdtype(stored.dtype, np.signedinteger)
    if ts in REDUCED_SYNTAXES:  # a decoder clips to the code stream's precision, not BitsStored
        header = _header_or_none(ds)
        if header is not None:
            bits, signed = header.precision, header.signed
    if not np.issubdtype(stored.dtype, np.integer):
        raise InputError(f"unexpected decoded sample type {stored.dtype}")
    low, high = sample_range(bits, signed)
    # A file whose values exceed BitsStored (found in real archives) keeps them: widen the range.
    low, high = min(low, int(stored.min())), max(high, int(stored.max()))
    return Pyramid.of(stored.astype(np.int32), rows, cols, 0, low, high)


def _reduced(ds: Dataset, rows: int, cols: int) -> Pyramid | None:
    """Level 1 from openjpeg's reduced decode, or None (then the caller decodes in full)."""
    header = _header_or_none(ds)
    if header is None:
        return None
    why = _not_reducible(header, rows, cols)
    if why:
        logger.debug("full decode: %s", why)
        return None
    try:
        image = _pillow_reduced(_frame(ds), DIRECT_LEVEL)
    except Exception as exc:  # noqa: BLE001 - any codec failure: the full decode decides
        logger.debug("reduced JPEG 2000 decode failed (%s): full decode", brief(exc))
        return None
    expected = (-(-rows // 2), -(-cols // 2))
    if image.shape != expected:
        logger.debug("reduced decode gave %s, expected %s: full decode", image.shape, expected)
        return None
    low, high = sample_range(header.precision, header.signed)
    return Pyramid.of(image, rows, cols, DIRECT_LEVEL, low, high)


def _not_reducible(header: J2KHeader, rows: int, cols: int) -> str:
    """Why this code stream gets a full decode ('' when a reduced one is exact)."""
    if (header.rows, header.columns) != (rows, cols):
        return f"code stream is {header.rows}x{header.columns}, header says {rows}x{cols}"
    if header.components != 1 or header.signed or not 9 <= header.precision <= 16:
        return f"{header.components} component(s), {header.precision}-bit, signed={header.signed}"
    if header.tiles != 1 or not header.at_origin:
        return f"{header.tiles} tiles, origin at 0: {header.at_origin}"
    if not header.reversible:
        return "irreversible (lossy) wavelet"
    if header.levels < DIRECT_LEVEL:
        return f"{header.levels} decomposition levels"
    return ""


def _frame(ds: Dataset) -> bytes:
    try:
        return bytes(get_frame(ds.PixelData, 0, number_of_frames=1))
    except (ValueError, KeyError, AttributeError, TypeError, struct.error) as exc:
        raise InputError(f"cannot read the first frame: {brief(exc)}") from exc


def _header_or_none(ds: Dataset) -> J2KHeader | None:
    try:
        return parse_header(_frame(ds))
    except (InputError, struct.error, IndexError) as exc:
        logger.debug("no usable JPEG 2000 main header (%s): full decode", brief(exc))
        return None


def parse_header(stream: bytes) -> J2KHeader:
    """The SIZ and COD/COC of a raw code stream's main header (ISO/IEC 15444-1 A.5, A.6)."""
    if stream[:4] != b"\xff\x4f\xff\x51":
        raise InputError("not a raw JPEG 2000 code stream (no SOC+SIZ)")
    lsiz = struct.unpack(">H", stream[4:6])[0]
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz = struct.unpack(">8I", stream[8:40])
    components = struct.unpack(">H", stream[40:42])[0]
    ssiz = stream[42]
    if xtsiz == 0 or ytsiz == 0:
        raise InputError("invalid tile size 0")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    levels, reversible = -1, False
    at = 4 + lsiz
    while at + 4 <= len(stream):
        marker, length = struct.unpack(">HH", stream[at : at + 4])
        if marker == _SOT or marker < 0xFF00:
            break
        if marker == _COD:
            levels, reversible = stream[at + 9], stream[at + 13] == 1
        elif marker == _COC and components < 257 and stream[at + 4] == 0:
            levels, reversible = stream[at + 6], stream[at + 10] == 1
        at += 2 + length
    if levels < 0:
        raise InputError("no COD marker segment in the main header")
    return J2KHeader(
        rows=ysiz - yosiz,
        columns=xsiz - xosiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        components=components,
        tiles=tiles,
        at_origin=xosiz == 0 and yosiz == 0,
        levels=levels,
        reversible=reversible,
    )


def _pillow_reduced(stream: bytes, level: int) -> np.ndarray:
    """openjpeg's decode of ``stream`` at ``level`` through Pillow, as stored values (int32).

    Pillow hands 9-16-bit samples back scaled to 16 bits (shifted left by ``16 - precision``);
    the shift is undone here.
    """
    from PIL import Image

    header = parse_header(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(stream), formats=["JPEG2000"]) as image:
            image.reduce = level  # type: ignore[method-assign,assignment]
            image.load()
            if image.mode != "I;16":
                raise InputError(f"reduced decode gave mode {image.mode}")
            pixels = np.asarray(image, dtype=np.uint16)
    return np.right_shift(pixels, 16 - header.precision).astype(np.int32)
