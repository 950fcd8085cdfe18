"""Transfer syntaxes of the phantoms and the encoders behind them.

Real archives send mammograms in all of these, and the RSNA set itself mixes JPEG 2000 and JPEG
Lossless; the node and the preprocessing must decode every one bit-exactly (HTJ2K lossy, the one
lossy syntax, closely). pydicom encodes JPEG 2000 (pylibjpeg/openjpeg), JPEG-LS (pyjpegls) and
RLE; it has no JPEG Lossless encoder, so that one is made with GDCM's codec, in memory, from the
raw frame, and no HTJ2K encoder, which OpenJPH provides (:mod:`training.synth.htj2k`).

Every encoder is named explicitly (design invariant 8), never "the first plugin pydicom finds":
with python-gdcm installed that would be GDCM's RLE encoder, which aborts the process on any odd
Rows x Columns. GDCM's JPEG Lossless encoder is the one GDCM codec used, and it encodes odd and
1-pixel frames cleanly (pinned by tests/inference/test_codecs_odd_sizes.py in child processes).
"""

from __future__ import annotations

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from training.synth.htj2k import htj2k_frame, set_lossy_compression

EXPLICIT_VR_LITTLE_ENDIAN = uid.ExplicitVRLittleEndian

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": EXPLICIT_VR_LITTLE_ENDIAN,
    "jpeg2000": str(JPEG2000Lossless),
    "jpegls": str(JPEGLSLossless),
    "jpeg-lossless": str(JPEGLosslessSV1),
    "rle": str(RLELossless),
    "htj2k": str(HTJ2KLossless),
    "htj2k-rpcl": str(HTJ2KLosslessRPCL),
    "htj2k-lossy": str(HTJ2K),
}
"""Name -> Transfer Syntax UID. ``mixed`` (not a key) picks one of :data:`MIXED_SYNTAXES` per image."""

MIXED = "mixed"

MIXED_SYNTAXES: tuple[str, ...] = ("explicit", "jpeg-lossless", "jpeg2000", "jpegls", "rle")
"""What ``mixed`` cycles through in the ``digital`` style, in this order: the syntaxes it chose
before HTJ2K was added, and it must keep choosing exactly these so that existing datasets and the
model card's training data regenerate identically from their seeds. Never add to it."""

LOSSY_SYNTAXES: frozenset[str] = frozenset({"htj2k-lossy"})
"""The names whose pixels do not decode back bit for bit (LossyImageCompression "01" is set)."""

_HTJ2K_NAMES = ("htj2k", "htj2k-rpcl", "htj2k-lossy")

FILM_MIXED_SYNTAXES: tuple[str, ...] = ("jpeg2000", "rle")
"""What ``mixed`` alternates between in the ``film`` style: RLE, as CBIS-DDSM is stored, and JPEG
2000, the other lossless syntax archives commonly hold (and the one the GPU path decodes)."""

MIN_FRAME_SIDE: dict[str, int] = {"jpeg2000": 32, "jpegls": 32}
"""Smallest rows and columns each syntax can encode; the others encode any size, even 1 x 1.

openjpeg needs 32 pixels a side for its 6 resolution levels, and pyjpegls's output buffer is too
small for a tiny frame that does not compress; both fail cleanly, and so do we, up front, with a
message naming the limit. Real mammograms (and the phantoms, see ``MIN_SIZE``) are far larger.
"""

_PYDICOM_PLUGINS: dict[str, str] = {"jpeg2000": "pylibjpeg", "jpegls": "pyjpegls", "rle": "pylibjpeg"}
"""The encoder plugin of each syntax pydicom encodes (see the module docstring: never gdcm)."""


def check_transfer_syntax(name: str) -> None:
    """ValueError unless ``name`` is a key of TRANSFER_SYNTAXES or ``mixed``."""
    if name != MIXED and name not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax must be one of {[*TRANSFER_SYNTAXES, MIXED]}, got {name!r}")


def encode_pixels(ds: Dataset, pixels: np.ndarray, name: str) -> None:
    """Store ``pixels`` (uint16, already as they must be stored) in ``ds`` with syntax ``name``.

    ``ds`` must carry the Image Pixel module and a ``file_meta``; its TransferSyntaxUID is set.
    Frames smaller than :data:`MIN_FRAME_SIDE` of the syntax are refused with a ValueError.
    """
    if name not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax must be one of {list(TRANSFER_SYNTAXES)}, got {name!r}")
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D uint16 array, got {pixels.dtype} {pixels.shape}")
    side = MIN_FRAME_SIDE.get(name, 1)
    if min(pixels.shape) < side:
        raise ValueError(f"{name} needs at least {side} rows and columns, got {pixels.shape}")
    pixels = np.ascontiguousarray(pixels)
    uid = UID(TRANSFER_SYNTAXES[name])
    if name == "explicit":
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = uid
    elif name == "jpeg-lossless":
        frame = jpeg_lossless_sv1(pixels, int(ds.BitsStored), str(ds.PhotometricInterpretation))
        _set_encapsulated(ds, frame, uid)
    elif name in _HTJ2K_NAMES:
        lossy = name in LOSSY_SYNTAXES
        frame = htj2k_frame(pixels, int(ds.BitsStored), lossy=lossy, rpcl=name == "htj2k-rpcl")
        _set_encapsulated(ds, frame, uid)
        if lossy:
            set_lossy_compression(ds, frame)
    else:
        ds.compress(uid, pixels, encoding_plugin=_PYDICOM_PLUGINS[name], generate_instance_uid=False)


def _set_encapsulated(ds: Dataset, frame: bytes, uid: UID) -> None:
    """One frame as encapsulated Pixel Data (one fragment) in transfer syntax ``uid``."""
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid


def jpeg_lossless_sv1(pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2") -> bytes:
    """A JPEG Lossless (process 14, selection value 1) code stream of a 16-bit grey frame.

    Uses GDCM's encoder in memory; the output is checked to start with SOI + SOF3 and end with EOI
    (an odd-length stream is padded to even length after EOI, as DICOM requires). Like dcmcjpeg,
    GDCM writes sample precision 16 for any 16-bit-allocated frame, whatever ``bits_stored``;
    pylibjpeg-libjpeg, GDCM and dcmdjpeg all decode that bit-exactly.
    """
    import gdcm  # heavy import, only needed for this syntax

    rows, cols = pixels.shape
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimension(0, cols)
    image.SetDimension(1, rows)
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, 0))
    pi = getattr(gdcm.PhotometricInterpretation, photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(pixels.astype("<u2").tobytes())
    image.SetDataElement(element)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    # SetInput takes a GDCM smart pointer to ``image``, which deletes it together with
    # ``change``; Python must give up ownership or the image is freed twice (segfault), and it
    # must not free it first either (GDCM aborts on a referenced object).
    image.thisown = False
    try:
        if not change.Change():
            raise RuntimeError("GDCM could not encode the frame as JPEG Lossless SV1")
        fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
        if fragments is None or fragments.GetNumberOfFragments() != 1:
            raise RuntimeError("GDCM returned an unexpected JPEG Lossless fragment layout")
        # The SWIG binding hands bytes back as a str decoded with surrogateescape.
        fragment = fragments.GetFragment(0)
        raw, length = fragment.GetByteValue().GetBuffer(), int(str(fragment.GetVL()))
        del fragment, fragments
    finally:
        del change  # frees ``image`` too
    stream = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    if len(stream) != length:
        raise RuntimeError(f"GDCM fragment of {length} bytes came back as {len(stream)} bytes")
    if not (stream.startswith(b"\xff\xd8\xff\xc3") and stream.rstrip(b"\x00").endswith(b"\xff\xd9")):
        raise RuntimeError("GDCM output is not a JPEG Lossless (SOF3) code stream")
    if len(stream) % 2:
        stream += b"\x00"
    return stream
