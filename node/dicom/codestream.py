"""Cheap checks of encapsulated pixel data at receipt: structure and code-stream headers, no decode.

A C-STORE is answered Success only for an image the worker can use, yet the SCP must not decode
it (a 16384 x 16384 JPEG 2000 needs gigabytes, and decoders are crash-prone: design invariant 8).
What can be checked from a few bytes is checked here:

- the item/fragment structure of encapsulated Pixel Data (PS3.5 A.4): a Basic Offset Table item,
  at least one fragment, every fragment inside the bytes received, a sequence delimiter;
- the header of the first frame's code stream agrees with the Image Pixel module: JPEG 2000 and
  HTJ2K SIZ (bare code stream or JP2 boxes), JPEG SOFn, JPEG-LS SOF55, and the RLE header.

Only the first frame is checked: it is the one the worker decodes. Everything here is a pure
function on bytes; failures are :class:`FragmentError` or :class:`CodestreamError`, both
:class:`~inference.types.InputError`, whose messages never quote the data.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import uid

from inference import InputError

ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
HEAD_BYTES = 64 * 1024
"""How much of a frame is gathered to find its header (J2K SIZ is in the first ~50 bytes; a JPEG
SOF follows tables and APPn segments, which stay well under this in practice)."""

RETIRED_JPEG_PROCESSES = (52, 53, 54, 55, 56, 58, 59, 60, 61, 62, 63, 64, 65, 66)
"""JPEG processes PS3.5 retired (and pydicom does not list), still found in old archives."""
JPEG_SYNTAXES = frozenset(uid.JPEGTransferSyntaxes) | {
    uid.UID(f"1.2.840.10008.1.2.4.{n}") for n in RETIRED_JPEG_PROCESSES
}
JPEG_LS_SYNTAXES = frozenset(uid.JPEGLSTransferSyntaxes)
J2K_SYNTAXES = frozenset(uid.JPEG2000TransferSyntaxes)
"""JPEG 2000 and HTJ2K: one SIZ marker segment describes both."""
RLE_SYNTAX = uid.RLELossless

_SOC, _SIZ = b"\xff\x4f", b"\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JPEG_SOI = b"\xff\xd8"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
_SOF55 = 0xF7  # JPEG-LS frame header (ITU-T T.87)
_SOS, _EOI = 0xDA, 0xD9
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # RSTn, TEM, SOI: no length field
_MAX_BOXES = 64
_RLE_HEADER = 64


class FragmentError(InputError):
    """The encapsulated Pixel Data is not a complete item/fragment sequence within the bytes."""


class CodestreamError(InputError):
    """The first frame is not a code stream of its transfer syntax, or disagrees with the header."""


@dataclass(frozen=True)
class Encapsulated:
    """Where the items of an encapsulated Pixel Data value are, as offsets into the received bytes."""

    offsets: tuple[int, ...]
    """The Basic Offset Table (empty when the encoder left it empty)."""
    fragments: tuple[tuple[int, int], ...]
    """(start, length) of each fragment's value."""
    end: int
    """Offset just after the sequence delimiter."""


@dataclass(frozen=True)
class FrameHeader:
    """What a code stream's own header says about its frame."""

    rows: int
    columns: int
    bits: int
    """Sample precision in bits (JPEG P, JPEG 2000 Ssiz + 1)."""
    samples: int
    """Components in the frame."""


def parse_encapsulated(data: bytes | memoryview, start: int) -> Encapsulated:
    """The item structure of an encapsulated value starting at ``start`` (little endian).

    The first item is the Basic Offset Table (its length a multiple of 4), then one or more
    fragments, each of defined length and inside ``data``, then the sequence delimiter. The walk is
    linear in the number of items and reads 8 bytes per item.
    """
    view = memoryview(data)
    size = len(view)
    pos = start
    items: list[tuple[int, int]] = []
    while True:
        if pos + 8 > size:
            raise FragmentError("encapsulated pixel data ends before its sequence delimiter")
        tag_group, tag_element, length = struct.unpack_from("<HHI", view, pos)
        tag = (tag_group << 16) | tag_element
        pos += 8
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM:
            raise FragmentError(f"unexpected tag ({tag_group:04X},{tag_element:04X}) among pixel data items")
        if length == UNDEFINED_LENGTH:
            raise FragmentError("a pixel data item has undefined length")
        if pos + length > size:
            raise FragmentError(f"a pixel data item of {length} bytes runs past the received data")
        items.append((pos, length))
        pos += length
    if not items:
        raise FragmentError("encapsulated pixel data has no Basic Offset Table item")
    if len(items) < 2:
        raise FragmentError("encapsulated pixel data has no fragment")
    bot_start, bot_length = items[0]
    if bot_length % 4:
        raise FragmentError(f"Basic Offset Table of {bot_length} bytes is not a multiple of 4")
    offsets = struct.unpack_from(f"<{bot_length // 4}I", view, bot_start) if bot_length else ()
    return Encapsulated(tuple(offsets), tuple(items[1:]), pos)


def first_frame_fragments(enc: Encapsulated, frames: int) -> tuple[tuple[int, int], ...]:
    """The fragments of frame 1: all of them for a single frame, those before the second offset
    when the Basic Offset Table says, else the first fragment (one fragment per frame)."""
    if frames <= 1:
        return enc.fragments
    if len(enc.offsets) >= 2:
        first_start = enc.fragments[0][0] - 8
        out = [f for f in enc.fragments if f[0] - 8 - first_start < enc.offsets[1]]
        return tuple(out) or enc.fragments[:1]
    return enc.fragments[:1]


def frame_head(
    data: bytes | memoryview, fragments: Sequence[tuple[int, int]], limit: int = HEAD_BYTES
) -> bytes:
    """The first ``limit`` bytes of a frame spread over ``fragments``."""
    view = memoryview(data)
    out = bytearray()
    for start, length in fragments:
        take = min(length, limit - len(out))
        out += view[start : start + take]
        if len(out) >= limit:
            break
    return bytes(out)


# -- code stream headers ------------------------------------------------------------------------


def j2k_header(stream: bytes) -> FrameHeader:
    """The SIZ of a JPEG 2000 / HTJ2K code stream (ISO/IEC 15444-1 A.5.1), bare or in JP2 boxes.

    Image size is Xsiz - XOsiz by Ysiz - YOsiz; precision is the first component's Ssiz + 1.
    """
    if stream.startswith(_JP2_SIGNATURE):
        stream = _jp2_codestream(stream)
    if stream[:2] != _SOC or stream[2:4] != _SIZ:
        raise CodestreamError("not a JPEG 2000 code stream (no SOC followed by SIZ)")
    if len(stream) < 4 + 38:
        raise CodestreamError("JPEG 2000 SIZ segment is cut short")
    lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HHIIII", stream, 4)
    csiz = struct.unpack_from(">H", stream, 4 + 36)[0]
    if csiz < 1 or lsiz != 38 + 3 * csiz or len(stream) < 4 + lsiz:
        raise CodestreamError(f"JPEG 2000 SIZ segment is malformed ({csiz} components, length {lsiz})")
    if xosiz >= xsiz or yosiz >= ysiz:
        raise CodestreamError("JPEG 2000 SIZ has an empty image area")
    ssiz = stream[4 + 38]
    return FrameHeader(rows=ysiz - yosiz, columns=xsiz - xosiz, bits=(ssiz & 0x7F) + 1, samples=csiz)


def _jp2_codestream(stream: bytes) -> bytes:
    """The contents of the ``jp2c`` box of a JP2 file (ISO/IEC 15444-1 I.4)."""
    pos = 0
    for _ in range(_MAX_BOXES):
        if pos + 8 > len(stream):
            break
        length, kind = struct.unpack_from(">I4s", stream, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(stream):
                break
            length = struct.unpack_from(">Q", stream, pos + 8)[0]
            header = 16
        elif length == 0:
            length = len(stream) - pos
        if length < header:
            break
        if kind == b"jp2c":
            return stream[pos + header : pos + length]
        pos += length
    raise CodestreamError("JP2 file without a contiguous code stream box in its first bytes")


def jpeg_header(stream: bytes) -> FrameHeader:
    """The frame header of a JPEG (SOF0-SOF15 but DHT/JPG/DAC) or JPEG-LS (SOF55) code stream.

    Markers are walked from SOI, skipping fill bytes and each segment by its length, until a frame
    header; a scan (SOS) or EOI before it means there is none. Lines may be 0 (defined later by a
    DNL marker, ITU-T T.81 B.2.5), which :func:`check_frame` tolerates.
    """
    if stream[:2] != _JPEG_SOI:
        raise CodestreamError("not a JPEG code stream (no SOI marker)")
    pos = 2
    while True:
        if pos < len(stream) and stream[pos] != 0xFF:
            raise CodestreamError(f"JPEG code stream has no marker at byte {pos}")
        while pos < len(stream) and stream[pos] == 0xFF:
            pos += 1
        if pos >= len(stream):
            break
        marker = stream[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (_SOS, _EOI):
            raise CodestreamError("JPEG code stream has no frame header before its first scan")
        if pos + 2 > len(stream):
            break
        length = struct.unpack_from(">H", stream, pos)[0]
        if length < 2:
            raise CodestreamError(f"JPEG marker segment FF{marker:02X} has length {length}")
        if marker in _SOF_MARKERS or marker == _SOF55:
            if length < 8 or pos + 8 > len(stream):
                raise CodestreamError(f"JPEG frame header FF{marker:02X} is cut short")
            precision, lines, samples_per_line, components = struct.unpack_from(">BHHB", stream, pos + 2)
            if length != 8 + 3 * components:
                raise CodestreamError(f"JPEG frame header FF{marker:02X} is malformed")
            return FrameHeader(rows=lines, columns=samples_per_line, bits=precision, samples=components)
        pos += length
    raise CodestreamError("JPEG code stream has no frame header in its first bytes")


def rle_segments(head: bytes, fragment_length: int) -> tuple[int, ...]:
    """The segment offsets of an RLE frame (PS3.5 G.4): 1-15 segments, the first at byte 64,
    strictly increasing and inside the fragment (each frame is exactly one fragment)."""
    if len(head) < _RLE_HEADER or fragment_length < _RLE_HEADER:
        raise CodestreamError("RLE fragment is shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", head, 0)
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header announces {count} segments (1-15 allowed)")
    used = offsets[:count]
    if used[0] != _RLE_HEADER:
        raise CodestreamError("RLE first segment does not start after the header")
    if any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= fragment_length:
        raise CodestreamError("RLE segment offsets are not increasing inside the fragment")
    return tuple(used)


# -- the check the SCP calls ----------------------------------------------------------------------


def check_frame(
    transfer_syntax: str,
    head: bytes,
    fragment_length: int,
    *,
    rows: int,
    columns: int,
    samples: int,
    bits_allocated: int,
) -> None:
    """Refuse a first frame whose code stream does not match the Image Pixel module.

    ``head`` is the frame's first bytes (:func:`frame_head`), ``fragment_length`` its first
    fragment's full length (RLE offsets are checked against it). Precision may be below Bits
    Allocated (encoders write Bits Stored or Bits Allocated there; decoders cope with both), never
    above it. A syntax without a header check here is refused: Success must mean checked.
    """
    ts = str(transfer_syntax)
    if ts == RLE_SYNTAX:
        segments = rle_segments(head, fragment_length)
        expected = samples * max(bits_allocated // 8, 1)
        if len(segments) != expected:
            raise CodestreamError(
                f"RLE frame has {len(segments)} segments; {samples} samples of {bits_allocated} bits "
                f"need {expected}"
            )
        return
    if ts in J2K_SYNTAXES:
        found = j2k_header(head)
    elif ts in JPEG_SYNTAXES or ts in JPEG_LS_SYNTAXES:
        found = jpeg_header(head)
    else:
        raise CodestreamError(f"no code-stream check for transfer syntax {ts}")
    if found.columns != columns or (found.rows != rows and not (found.rows == 0 and ts in JPEG_SYNTAXES)):
        raise CodestreamError(
            f"code stream is {found.rows}x{found.columns}, the header says {rows}x{columns}"
        )
    if found.samples != samples:
        raise CodestreamError(f"code stream has {found.samples} components, the header says {samples}")
    if not 1 <= found.bits <= bits_allocated:
        raise CodestreamError(
            f"code stream precision {found.bits} bits exceeds Bits Allocated {bits_allocated}"
        )
