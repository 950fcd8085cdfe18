"""HTJ2K code streams (ISO/IEC 15444-15) of the phantoms: OpenJPH, through imagecodecs.

pydicom has no HTJ2K encoder; imagecodecs wraps OpenJPH, the reference HT encoder, and is used
here to encode only. Nothing decodes with it: on a truncated stream OpenJPH returns a wrong image
without an error, so the node and the tests of the phantoms decode HTJ2K with pydicom's
pylibjpeg-openjpeg plugin, as they decode JPEG 2000.

imagecodecs cannot set the sample precision: a uint16 frame is always written with SIZ precision
16, while DICOM wants the code stream to agree with Bits Stored (PS3.5 8.2.4). So the frame is
prepared such that rewriting the one SIZ precision byte (Ssiz) to Bits Stored B gives the stream a
B-bit encoder writes:

- irreversible (lossy): OpenJPH quantises samples normalised by 2**precision and its quantisation
  table does not depend on the precision, so ``pixels << (16 - B)`` at precision 16 encodes to the
  very bytes of ``pixels`` at precision B, Ssiz apart (checked on 8-bit frames);
- reversible (lossless): the DC level shift subtracts 2**(precision - 1), so
  ``pixels + 2**15 - 2**(B - 1)`` at precision 16 gives the wavelet coefficients of ``pixels`` at
  precision B. Only the QCD exponents keep room for 16-bit magnitudes: each code block signals
  those extra bit-planes as missing, which is valid and costs a few bits per block.

tests/inference/test_htj2k.py decodes both with OpenJPEG and with OpenJPH, lossless bit for bit.
"""

from __future__ import annotations

import struct

import numpy as np
from pydicom.dataset import Dataset

RPCL_BASE_SIDE = 64
"""HTJ2K Lossless RPCL: enough decompositions for a base resolution of at most 64 a side, with
RPCL progression and TLM markers (PS3.5 10.18), so a reader can fetch a thumbnail first."""
LOSSY_STEP = 1 / 512
"""Quantisation step of the lossy syntax, as a fraction of the stored range (8 values at 12 bits):
about 8-9:1 on a 12-bit phantom, whose values then differ by under half a step on average and by
at most a few steps."""
LOSSY_METHOD = "ISO_15444_15"
"""Lossy Image Compression Method of HTJ2K irreversible compression (PS3.3 C.7.6.1.1.5.1)."""

_SOC_SIZ = b"\xff\x4f\xff\x51"
_SSIZ = 42  # SOC, SIZ marker, Lsiz, Rsiz, 8 x 4 bytes of extents and offsets, Csiz: then Ssiz
_COD, _TLM, _SOT = 0xFF52, 0xFF55, 0xFF90
_RPCL = 2  # COD progression order: 0 LRCP, 1 RLCP, 2 RPCL, 3 PCRL, 4 CPRL


def rpcl_decompositions(rows: int, cols: int) -> int:
    """The fewest wavelet decompositions (at least 1) leaving no side above RPCL_BASE_SIDE."""
    base_sides = -(-max(rows, cols) // RPCL_BASE_SIDE)  # ceil(side / 64): 2**levels must reach it
    return max(1, (base_sides - 1).bit_length())


def htj2k_frame(pixels: np.ndarray, bits_stored: int, *, lossy: bool = False, rpcl: bool = False) -> bytes:
    """One HTJ2K code stream of a grey frame, with SIZ precision ``bits_stored``.

    ``lossy`` quantises with :data:`LOSSY_STEP` (9/7 wavelet); otherwise the 5/3 wavelet keeps
    every value. ``rpcl`` writes the HTJ2K Lossless RPCL form (see :data:`RPCL_BASE_SIDE`);
    without it OpenJPH's defaults apply (5 decompositions, no TLM). The stream's header is checked
    against what was asked, so a change of encoder defaults fails here, not in a reader.
    """
    import imagecodecs  # the training extra; only needed for these syntaxes

    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D uint16 array, got {pixels.dtype} {pixels.shape}")
    if not 1 <= bits_stored <= 16 or int(pixels.max(initial=0)) >> bits_stored:
        raise ValueError(f"pixels do not fit in bits_stored={bits_stored}")
    if lossy:
        src = pixels << np.uint16(16 - bits_stored)
    else:
        src = pixels + np.uint16((1 << 15) - (1 << (bits_stored - 1)))
    stream = bytes(
        imagecodecs.htj2k_encode(
            src,
            LOSSY_STEP if lossy else None,
            reversible=not lossy,
            resolutions=rpcl_decompositions(*pixels.shape) if rpcl else None,  # None: OpenJPH's 5
            tlm=rpcl,
        )
    )
    _check_header(stream, rpcl=rpcl)
    return stream[:_SSIZ] + bytes([bits_stored - 1]) + stream[_SSIZ + 1 :]


def set_lossy_compression(ds: Dataset, frame: bytes) -> None:
    """Record in ``ds`` that its pixels went through HTJ2K irreversible compression (PS3.3
    C.7.6.1.1.5): the ratio is the frame's size as stored uncompressed over ``frame``'s size."""
    uncompressed = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{uncompressed / len(frame):.2f}"
    ds.LossyImageCompressionMethod = LOSSY_METHOD


def _check_header(stream: bytes, *, rpcl: bool) -> None:
    """RuntimeError unless ``stream`` is one grey component of precision 16 in RPCL order (and,
    for ``rpcl``, with TLM markers): the layout :func:`htj2k_frame` relies on."""
    if not stream.startswith(_SOC_SIZ) or struct.unpack_from(">H", stream, _SSIZ - 2) != (1,):
        raise RuntimeError("OpenJPH did not write a one-component SOC + SIZ code stream")
    if stream[_SSIZ] != 15:
        raise RuntimeError(f"OpenJPH wrote precision {(stream[_SSIZ] & 0x7F) + 1}, expected 16 unsigned")
    segments = _main_header(stream)
    cod = segments.get(_COD)
    if cod is None or cod[1] != _RPCL:
        raise RuntimeError("OpenJPH did not write RPCL progression")
    if rpcl and _TLM not in segments:
        raise RuntimeError("OpenJPH did not write the TLM markers HTJ2K Lossless RPCL needs")


def _main_header(stream: bytes) -> dict[int, bytes]:
    """The main header's marker segments (after SOC, up to the first SOT), by marker."""
    segments: dict[int, bytes] = {}
    pos = 2
    while pos + 4 <= len(stream):
        marker, length = struct.unpack_from(">HH", stream, pos)
        if marker == _SOT:
            break
        segments.setdefault(marker, stream[pos + 4 : pos + 2 + length])
        pos += 2 + length
    return segments
