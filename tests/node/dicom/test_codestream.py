"""Receipt checks of encapsulated pixel data (node.dicom.codestream) on real encoded streams.

Streams come from the encoders a modality or PACS would use: pydicom with pylibjpeg-openjpeg
(JPEG 2000), pyjpegls (JPEG-LS) and its RLE encoder, Pillow (a JP2 file), and dcmtk's dcmcjpeg
(baseline, extended, lossless), dcmcjpls and dcmcrle, called by absolute path.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from inference.types import InputError
from node.dicom import codestream
from node.dicom.codestream import CodestreamError, FragmentError

ROWS, COLS = 53, 37  # odd width and height, like rescaled real mammograms


def _native(rows: int = ROWS, cols: int = COLS, *, bits: int = 16, samples: int = 1) -> Dataset:
    """A small Secondary Capture image in explicit VR little endian."""
    rng = np.random.default_rng(7)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MG"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    shape = (rows, cols, samples) if samples == 3 else (rows, cols)
    dtype = np.uint16 if bits > 8 else np.uint8
    ds.PixelData = rng.integers(0, 1 << bits, shape, dtype=dtype).tobytes()
    return ds


_ITEM = b"\xfe\xff\x00\xe0"
_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
"""pydicom keeps an encapsulated value without its sequence delimiter; the writer adds it."""


def _fragments(ds: Dataset) -> list[bytes]:
    value = bytes(ds.PixelData) + _DELIMITER
    enc = codestream.parse_encapsulated(value, 0)
    return [value[start : start + length] for start, length in enc.fragments]


def _check(ds: Dataset, *, head: bytes | None = None, overrides: dict[str, int] | None = None) -> None:
    frame = _fragments(ds)[0]
    values = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples": int(ds.SamplesPerPixel),
        "bits_allocated": int(ds.BitsAllocated),
    }
    values.update(overrides or {})
    codestream.check_frame(
        str(ds.file_meta.TransferSyntaxUID), frame if head is None else head, len(frame), **values
    )


def _dcmtk(tool: str, flag: str, ds: Dataset, tmp_path: Path) -> Dataset:
    src, dst = tmp_path / f"{tool}-in.dcm", tmp_path / f"{tool}{flag}-out.dcm"
    ds.save_as(src, enforce_file_format=True)
    args = [f"/usr/bin/{tool}", *([flag] if flag else []), str(src), str(dst)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return dcmread(dst)


# -- JPEG 2000 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_j2k_siz_of_pylibjpeg_streams_matches_the_header(bits: int) -> None:
    ds = _native(bits=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    found = codestream.j2k_header(_fragments(ds)[0])
    assert (found.rows, found.columns, found.samples) == (ROWS, COLS, 1)
    assert found.bits == bits
    _check(ds)


def test_j2k_inside_a_jp2_file_is_read_through_its_boxes() -> None:
    from PIL import Image

    pixels = np.arange(ROWS * COLS, dtype=np.uint8).reshape(ROWS, COLS)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG2000", irreversible=False, no_jp2=False)
    data = buffer.getvalue()
    assert data.startswith(b"\x00\x00\x00\x0cjP  ")
    found = codestream.j2k_header(data)
    assert (found.rows, found.columns, found.bits, found.samples) == (ROWS, COLS, 8, 1)


def test_j2k_claiming_a_huge_image_is_refused() -> None:
    """The 2.5 KB stream whose SIZ says 16384 x 16384 (decoding it takes gigabytes)."""
    ds = _native(bits=12)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    frame = bytearray(_fragments(ds)[0])
    struct.pack_into(">II", frame, 8, 16384, 16384)
    with pytest.raises(CodestreamError, match="16384x16384"):
        _check(ds, head=bytes(frame))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rows": ROWS + 1}, "header says"),
        ({"columns": COLS - 1}, "header says"),
        ({"samples": 3}, "components"),
        ({"bits_allocated": 8}, "precision"),
    ],
)
def test_j2k_mismatch_with_the_image_pixel_module(overrides: dict[str, int], message: str) -> None:
    ds = _native(bits=12)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    with pytest.raises(CodestreamError, match=message):
        _check(ds, overrides=overrides)


@pytest.mark.parametrize("cut", [0, 2, 4, 20, 41])
def test_j2k_cut_inside_siz_is_refused(cut: int) -> None:
    ds = _native()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    with pytest.raises(CodestreamError):
        codestream.j2k_header(_fragments(ds)[0][:cut])


def test_raw_bytes_and_other_code_streams_are_not_j2k() -> None:
    with pytest.raises(CodestreamError, match="not a JPEG 2000"):
        codestream.check_frame(
            str(JPEG2000Lossless), bytes(range(256)) * 4, 1024, rows=1, columns=1, samples=1, bits_allocated=8
        )
    jls = _native()
    jls.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
    with pytest.raises(CodestreamError):  # a JPEG-LS stream sent as JPEG 2000
        codestream.check_frame(
            str(JPEG2000Lossless),
            _fragments(jls)[0],
            len(_fragments(jls)[0]),
            rows=ROWS,
            columns=COLS,
            samples=1,
            bits_allocated=16,
        )


# -- JPEG and JPEG-LS ----------------------------------------------------------------------------


def test_jpeg_ls_sof55_of_pyjpegls_streams() -> None:
    ds = _native(bits=12)
    ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
    found = codestream.jpeg_header(_fragments(ds)[0])
    assert (found.rows, found.columns, found.bits, found.samples) == (ROWS, COLS, 12, 1)
    _check(ds)
    with pytest.raises(CodestreamError):
        _check(ds, overrides={"rows": ROWS * 2})


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("tool", "flag", "bits", "samples"),
    [
        ("dcmcjpeg", "+e1", 16, 1),  # lossless SV1, the mammography workhorse
        ("dcmcjpeg", "+e1", 12, 1),
        ("dcmcjpeg", "+el", 12, 1),
        ("dcmcjpeg", "+eb", 8, 1),  # baseline 8-bit
        ("dcmcjpeg", "+eb", 8, 3),  # baseline colour (YBR_FULL_422)
        ("dcmcjpeg", "+ee", 12, 1),  # extended 12-bit
        ("dcmcjpls", "", 16, 1),
        ("dcmcjpls", "", 12, 1),
        ("dcmcrle", "", 16, 1),
        ("dcmcrle", "", 8, 3),
    ],
)
def test_dcmtk_streams_pass(tool: str, flag: str, bits: int, samples: int, tmp_path: Path) -> None:
    ds = _dcmtk(tool, flag, _native(bits=bits, samples=samples), tmp_path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    _check(ds)


@pytest.mark.dcmtk
def test_dcmtk_jpeg_lossless_mismatch(tmp_path: Path) -> None:
    ds = _dcmtk("dcmcjpeg", "+e1", _native(bits=16), tmp_path)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    found = codestream.jpeg_header(_fragments(ds)[0])
    assert (found.rows, found.columns, found.samples) == (ROWS, COLS, 1)
    with pytest.raises(CodestreamError, match="header says"):
        _check(ds, overrides={"columns": COLS + 1})
    with pytest.raises(CodestreamError, match="precision"):
        _check(ds, overrides={"bits_allocated": 8})


def _jpeg(*segments: tuple[int, bytes]) -> bytes:
    out = b"\xff\xd8"
    for marker, body in segments:
        out += bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body
    return out


def test_jpeg_walks_tables_and_fill_bytes_and_tolerates_dnl() -> None:
    sof = struct.pack(">BHHB", 8, 0, COLS, 1) + b"\x01\x11\x00"  # lines 0: set later by DNL
    stream = _jpeg((0xE0, b"JFIF\x00" + b"\x00" * 9), (0xDB, b"\x00" * 65))
    stream += b"\xff\xff"  # fill bytes before a marker
    stream += b"\xc0" + struct.pack(">H", len(sof) + 2) + sof
    found = codestream.jpeg_header(stream)
    assert (found.rows, found.columns, found.bits, found.samples) == (0, COLS, 8, 1)
    codestream.check_frame(
        str(JPEGBaseline8Bit), stream, len(stream), rows=ROWS, columns=COLS, samples=1, bits_allocated=8
    )


@pytest.mark.parametrize(
    "stream",
    [
        b"",
        b"\x00\x01\x02",
        b"\xff\xd8",  # SOI alone
        _jpeg((0xDB, b"\x00" * 65), (0xDA, b"\x00" * 10)),  # a scan before any frame header
        _jpeg((0xC4, b"\x00" * 20)),  # DHT is not a frame header
        _jpeg((0xC3, b"\x10\x00")),  # SOF3 cut short
        _jpeg((0xC3, struct.pack(">BHHB", 16, ROWS, COLS, 2) + b"\x01\x11\x00")),  # Nf disagrees
        b"\xff\xd8\xff\xe0\x00\x01",  # length 1
        b"\xff\xd8\x00\xff\xc0",  # junk where a marker belongs
    ],
)
def test_jpeg_without_a_sound_frame_header_is_refused(stream: bytes) -> None:
    with pytest.raises(CodestreamError):
        codestream.jpeg_header(stream)


# -- RLE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "samples", "segments"), [(8, 1, 1), (16, 1, 2), (8, 3, 3)])
def test_rle_header_of_pydicom_streams(bits: int, samples: int, segments: int) -> None:
    ds = _native(bits=bits, samples=samples)
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    frame = _fragments(ds)[0]
    assert len(codestream.rle_segments(frame, len(frame))) == segments
    _check(ds)


def _rle_header(count: int, offsets: list[int]) -> bytes:
    return struct.pack("<16I", count, *offsets, *([0] * (15 - len(offsets))))


@pytest.mark.parametrize(
    ("header", "length", "message"),
    [
        (b"\x00" * 10, 10, "shorter"),
        (_rle_header(0, []), 100, "0 segments"),
        (_rle_header(16, [64] * 15), 2000, "16 segments"),
        (_rle_header(2, [64, 64]), 100, "increasing"),
        (_rle_header(2, [64, 40]), 100, "increasing"),
        (_rle_header(2, [64, 100]), 100, "increasing"),  # the second segment starts at the end
        (_rle_header(1, [60]), 100, "after the header"),
    ],
)
def test_rle_header_faults(header: bytes, length: int, message: str) -> None:
    with pytest.raises(CodestreamError, match=message):
        codestream.rle_segments(header, length)


def test_rle_segment_count_must_match_samples_and_bits() -> None:
    ds = _native(bits=8)
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    with pytest.raises(CodestreamError, match="segments"):
        _check(ds, overrides={"bits_allocated": 16})


# -- encapsulation --------------------------------------------------------------------------------


def test_encapsulation_is_walked_with_and_without_an_offset_table() -> None:
    frames = [b"\x01" * 10, b"\x02" * 6]
    plain = encapsulate(frames, has_bot=False) + _DELIMITER
    enc = codestream.parse_encapsulated(plain, 0)
    assert enc.offsets == () and [length for _, length in enc.fragments] == [10, 6]
    assert enc.end == len(plain)
    with_bot = encapsulate(frames, fragments_per_frame=2, has_bot=True) + _DELIMITER
    enc = codestream.parse_encapsulated(with_bot, 0)
    assert len(enc.offsets) == 2 and len(enc.fragments) == 4
    first = codestream.first_frame_fragments(enc, frames=2)
    assert codestream.frame_head(with_bot, first) == frames[0]
    assert codestream.first_frame_fragments(enc, frames=1) == enc.fragments
    extended, _, _ = encapsulate_extended(frames)
    assert len(codestream.parse_encapsulated(extended + _DELIMITER, 0).fragments) == 2


def test_frame_head_stops_at_its_limit() -> None:
    value = encapsulate([b"\x05" * 100], has_bot=False) + _DELIMITER
    enc = codestream.parse_encapsulated(value, 0)
    assert codestream.frame_head(value, enc.fragments, limit=7) == b"\x05" * 7


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_ITEM + struct.pack("<I", 0) + _DELIMITER, "no fragment"),
        (_DELIMITER, "no Basic Offset Table"),
        (_ITEM + struct.pack("<I", 0) + _ITEM + struct.pack("<I", 4) + b"abcd", "sequence delimiter"),
        (_ITEM + struct.pack("<I", 0) + _ITEM + struct.pack("<I", 400) + b"abcd" + _DELIMITER, "runs past"),
        (_ITEM + struct.pack("<I", 0) + _ITEM + struct.pack("<I", 0xFFFFFFFF) + _DELIMITER, "undefined"),
        (
            _ITEM + struct.pack("<I", 0) + b"\xe0\x7f\x10\x00" + struct.pack("<I", 0) + _DELIMITER,
            "unexpected",
        ),
        (_ITEM + struct.pack("<I", 2) + b"\x00\x00" + _ITEM + struct.pack("<I", 2) + b"ab" + _DELIMITER, "4"),
        (_ITEM + struct.pack("<I", 0) + _ITEM, "sequence delimiter"),
    ],
)
def test_broken_encapsulation_is_refused(value: bytes, message: str) -> None:
    with pytest.raises(FragmentError, match=message):
        codestream.parse_encapsulated(value, 0)


def test_errors_are_input_errors_and_unknown_syntaxes_are_refused() -> None:
    assert issubclass(FragmentError, InputError) and issubclass(CodestreamError, InputError)
    with pytest.raises(CodestreamError, match="no code-stream check"):
        codestream.check_frame(
            "1.2.840.10008.1.2.4.100", b"", 0, rows=1, columns=1, samples=1, bits_allocated=8
        )
