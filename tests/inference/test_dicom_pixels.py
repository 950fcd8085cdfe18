"""Decoding untrusted DICOM pixels in every transfer syntax the node accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_file_factory import encode_as, make_dataset, mammo_pixels, roundtrip, write
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, SecondaryCaptureImageStorage

from inference.dicom_header import read_dataset, read_meta
from inference.dicom_pixels import MAX_PIXELS, decode_pixels
from inference.types import InputError

# ---------------------------------------------------------------------------- transfer syntaxes


EXPECTED_SYNTAX = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "j2k": "1.2.840.10008.1.2.4.90",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_sv1": "1.2.840.10008.1.2.4.70",
    "jpeg_p14": "1.2.840.10008.1.2.4.57",
}


@pytest.mark.parametrize("bits", [12, 14])
@pytest.mark.parametrize("syntax", list(EXPECTED_SYNTAX))
def test_decode_is_bit_exact_in_every_lossless_syntax(syntax: str, bits: int, tmp_path: Path) -> None:
    pixels = mammo_pixels(bits)
    path = encode_as(make_dataset(pixels, bits=bits), syntax, tmp_path)
    ds = read_dataset(path)
    assert ds.file_meta.TransferSyntaxUID == EXPECTED_SYNTAX[syntax]
    assert read_meta(ds).transfer_syntax_uid == EXPECTED_SYNTAX[syntax]
    decoded = decode_pixels(ds)
    assert decoded.shape == pixels.shape
    assert np.issubdtype(decoded.dtype, np.integer)
    np.testing.assert_array_equal(decoded, pixels)


def test_decode_lossy_jpeg2000_is_close(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:128, 0:96]
    pixels = ((yy * 20 + xx * 10) % 4096).astype(np.uint16)
    ds = make_dataset(pixels)
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
    decoded = decode_pixels(roundtrip(ds, tmp_path))
    assert decoded.shape == pixels.shape
    assert np.abs(decoded.astype(np.int64) - pixels).mean() < 20  # 0.5 % of the 12-bit range


def test_decode_applies_rescale(tmp_path: Path) -> None:
    pixels = mammo_pixels(12)
    ds = roundtrip(make_dataset(pixels, RescaleSlope="2", RescaleIntercept="-100"), tmp_path)
    decoded = decode_pixels(ds)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, pixels.astype(np.float32) * 2 - 100)


def test_decode_masks_bits_above_high_bit(tmp_path: Path) -> None:
    """Old files keep overlays in the unused high bits; they are not part of the value."""
    pixels = mammo_pixels(12)
    ds = make_dataset(pixels)
    ds.PixelData = (pixels | 0xF000).tobytes()
    np.testing.assert_array_equal(decode_pixels(roundtrip(ds, tmp_path)), pixels)


def test_decode_multiframe_returns_first_frame(tmp_path: Path) -> None:
    first, second = mammo_pixels(12, seed=1), mammo_pixels(12, seed=2)
    ds = make_dataset(first, NumberOfFrames=2)
    ds.PixelData = first.tobytes() + second.tobytes()
    np.testing.assert_array_equal(decode_pixels(roundtrip(ds, tmp_path)), first)


def test_decode_rgb_secondary_capture_to_grey(tmp_path: Path) -> None:
    grey = (mammo_pixels(8) & 0xFF).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    ds = make_dataset(grey.astype(np.uint16), bits=8)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = rgb.tobytes()
    decoded = decode_pixels(roundtrip(ds, tmp_path))
    assert decoded.shape == grey.shape
    np.testing.assert_allclose(decoded.astype(int), grey.astype(int), atol=1)


# ---------------------------------------------------------------------------- hostile pixels


def test_decode_refuses_missing_pixel_data(tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12), PixelData=None)
    with pytest.raises(InputError, match="no pixel data"):
        decode_pixels(roundtrip(ds, tmp_path))


@pytest.mark.parametrize(("rows", "cols"), [(0, 96), (128, 0), (20000, 20000)])
def test_decode_refuses_absurd_dimensions_before_decoding(rows: int, cols: int, tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12), Rows=rows, Columns=cols)
    assert rows * cols == 0 or rows * cols > MAX_PIXELS
    with pytest.raises(InputError, match=r"image size|too large"):
        decode_pixels(roundtrip(ds, tmp_path))


def test_decode_refuses_short_native_pixel_data(tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(InputError, match="truncated"):
        decode_pixels(roundtrip(ds, tmp_path))


def test_decode_failure_names_the_transfer_syntax(tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = write(ds, tmp_path / "j2k.dcm")
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ marker: corrupt the code stream
    data[start + 40 : start + 400] = bytes(360)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"cannot decode pixel data in transfer syntax JPEG 2000.*"):
        decode_pixels(read_dataset(path))


def test_decode_refuses_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = roundtrip(make_dataset(mammo_pixels(12)), tmp_path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4")
    with pytest.raises(InputError, match="transfer syntax"):
        decode_pixels(ds)
