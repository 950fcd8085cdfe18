"""Reading untrusted DICOM: files, tags and pixels in every transfer syntax the node accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from inference.dicom_io import (
    DX_MAMMO_FOR_PRESENTATION,
    DX_MAMMO_FOR_PROCESSING,
    MAX_PIXELS,
    decode_pixels,
    is_mammogram,
    laterality_from_text,
    read_dataset,
    read_meta,
    view_from_text,
)
from inference.types import UNKNOWN, InputError

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def mammo_pixels(bits: int, rows: int = 128, cols: int = 96, seed: int = 0) -> np.ndarray:
    """A half-ellipse 'breast' on a noisy background, using the full ``bits`` range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((yy - rows / 2) / (0.4 * rows)) ** 2 + (xx / (0.6 * cols)) ** 2 <= 1
    top = 2**bits - 1
    img = rng.normal(0.05 * top, 0.01 * top, (rows, cols))
    img[inside] = rng.uniform(0.3 * top, top, int(inside.sum()))
    img[0, 0], img[-1, -1] = 0, top  # the extremes, so every bit plane is exercised
    return np.clip(np.rint(img), 0, top).astype(np.uint16)


def make_dataset(pixels: np.ndarray, bits: int = 12, **tags: Any) -> Dataset:
    """A DX Mammography For Presentation image with ``pixels`` and any extra/override ``tags``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PAT-001"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def roundtrip(ds: Dataset, tmp_path: Path, name: str = "img.dcm") -> Dataset:
    return read_dataset(write(ds, tmp_path / name))


# ---------------------------------------------------------------------------- transfer syntaxes


def _dcmtk_jpeg(src: Path, dst: Path, flag: str) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (dcmtk) is not installed")
    subprocess.run(["dcmcjpeg", flag, str(src), str(dst)], check=True, capture_output=True)


def _encode(ds: Dataset, syntax: str, tmp_path: Path) -> Path:
    """Write ``ds`` in ``syntax`` the way a modality or another toolkit would."""
    explicit = write(ds, tmp_path / "explicit.dcm")
    if syntax == "explicit":
        return explicit
    out = tmp_path / f"{syntax}.dcm"
    if syntax in ("jpeg_sv1", "jpeg_p14"):
        _dcmtk_jpeg(explicit, out, "+e1" if syntax == "jpeg_sv1" else "+el")
        return out
    ds = pydicom.dcmread(explicit)
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless)
    elif syntax == "rle":
        ds.compress(RLELossless)
    return write(ds, out)


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
    path = _encode(make_dataset(pixels, bits=bits), syntax, tmp_path)
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
    ds.SOPClassUID = SECONDARY_CAPTURE
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


# ---------------------------------------------------------------------------- files


def test_read_refuses_non_dicom(tmp_path: Path) -> None:
    cases = {
        "text.dcm": b"hello, this is not DICOM\n" * 20,
        "random.dcm": np.random.default_rng(0).bytes(5000),
        "empty.dcm": b"",
        "zeros.dcm": bytes(5000),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=r"not a DICOM file|cannot parse|truncated or empty"):
            read_dataset(tmp_path / name)
    with pytest.raises(InputError, match="not a readable file"):
        read_dataset(tmp_path / "missing.dcm")
    with pytest.raises(InputError, match="not a readable file"):
        read_dataset(tmp_path)


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
@pytest.mark.parametrize("syntax", ["explicit", "j2k"])
def test_read_refuses_truncated_files(syntax: str, tmp_path: Path) -> None:
    path = _encode(make_dataset(mammo_pixels(12)), syntax, tmp_path)
    data = path.read_bytes()
    for cut in (len(data) - 1000, len(data) // 2, 333, 200):
        truncated = tmp_path / f"cut{cut}.dcm"
        truncated.write_bytes(data[:cut])
        with pytest.raises(InputError):
            ds = read_dataset(truncated)
            decode_pixels(ds)  # a cut between elements is only visible here


def test_read_bare_dataset_without_preamble(tmp_path: Path) -> None:
    pixels = mammo_pixels(12)
    ds = make_dataset(pixels)
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    back = read_dataset(path)
    assert read_meta(back).sop_instance_uid == ds.SOPInstanceUID
    np.testing.assert_array_equal(decode_pixels(back), pixels)


def test_read_without_pixels_reads_meta_only(tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12))
    back = read_dataset(write(ds, tmp_path / "a.dcm"), stop_before_pixels=True)
    assert "PixelData" not in back
    meta = read_meta(back)
    assert (meta.rows, meta.columns) == (128, 96)
    with pytest.raises(InputError, match="no pixel data"):
        decode_pixels(back)


# ---------------------------------------------------------------------------- tags


def test_read_meta_fields(tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12), ImageLaterality="R", ViewPosition="MLO")
    meta = read_meta(roundtrip(ds, tmp_path))
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.sop_class_uid == DX_MAMMO_FOR_PRESENTATION
    assert meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.series_instance_uid == ds.SeriesInstanceUID
    assert meta.patient_id == "PAT-001"
    assert (meta.laterality, meta.view, meta.modality) == ("R", "MLO", "MG")
    assert (meta.rows, meta.columns, meta.photometric) == (128, 96, "MONOCHROME2")
    assert meta.presentation_intent == "FOR PRESENTATION"
    assert meta.transfer_syntax_uid == ExplicitVRLittleEndian


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns when the test sets them
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", "../../x"),
        ("StudyInstanceUID", "1.2.3.abc"),
        ("SeriesInstanceUID", "1." + "2" * 70),
        ("SOPClassUID", None),
    ],
)
def test_read_meta_refuses_bad_uids_naming_the_tag(keyword: str, value: str | None, tmp_path: Path) -> None:
    ds = make_dataset(mammo_pixels(12))
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    with pytest.raises(InputError, match=keyword):
        read_meta(ds)


def test_read_meta_keeps_hostile_patient_id_as_data() -> None:
    meta = read_meta(make_dataset(mammo_pixels(12), PatientID="../../etc/passwd"))
    assert meta.patient_id == "../../etc/passwd"


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    ("tags", "laterality"),
    [
        ({"ImageLaterality": "R"}, "R"),
        ({"ImageLaterality": None, "Laterality": "L"}, "L"),
        ({"ImageLaterality": None, "SeriesDescription": "R MLO"}, "R"),
        ({"ImageLaterality": None, "ProtocolName": "LCC screening"}, "L"),
        ({"ImageLaterality": None, "ImageComments": "Left breast, 2 views"}, "L"),
        ({"ImageLaterality": None, "StudyDescription": "MAMMO RIGHT DIAGNOSTIC"}, "R"),
        ({"ImageLaterality": None, "SeriesDescription": "L-XCCL"}, "L"),
        ({"ImageLaterality": None, "SeriesDescription": "R/O mass, screening"}, UNKNOWN),
        ({"ImageLaterality": None, "StudyDescription": "Bilateral L + R"}, UNKNOWN),
        ({"ImageLaterality": None, "SeriesDescription": "MLO"}, UNKNOWN),
        ({"ImageLaterality": "B", "SeriesDescription": "tomo"}, UNKNOWN),
    ],
)
def test_laterality_sources(tags: dict[str, Any], laterality: str) -> None:
    assert read_meta(make_dataset(mammo_pixels(12), **tags)).laterality == laterality


@pytest.mark.parametrize(
    ("tags", "view"),
    [
        ({"ViewPosition": "MLO"}, "MLO"),
        ({"ViewPosition": "RCC"}, "CC"),
        ({"ViewPosition": None, "ViewCodeSequence": [("399368009", "SCT", "medio-lateral oblique")]}, "MLO"),
        ({"ViewPosition": None, "ViewCodeSequence": [("399162004", "SCT", "cranio-caudal")]}, "CC"),
        ({"ViewPosition": None, "ViewCodeSequence": [("399260004", "SCT", "medial-lateral")]}, "ML"),
        ({"ViewPosition": None, "ViewCodeSequence": [("399352003", "SCT", "latero-medial")]}, "LM"),
        (
            {"ViewPosition": None, "ViewCodeSequence": [("399192008", "SCT", "cc exaggerated laterally")]},
            "XCCL",
        ),
        ({"ViewPosition": None, "ViewCodeSequence": [("R-10226", "SRT", "medio-lateral oblique")]}, "MLO"),
        ({"ViewPosition": None, "ViewCodeSequence": [("99999", "99X", "Cranio-Caudal")]}, "CC"),
        ({"ViewPosition": None, "SeriesDescription": "R MLO"}, "MLO"),
        ({"ViewPosition": None, "SeriesDescription": "LXCCL"}, "XCCL"),
        ({"ViewPosition": None, "ProtocolName": "Medio-lateral oblique left"}, "MLO"),
        ({"ViewPosition": None, "SeriesDescription": "screening"}, UNKNOWN),
    ],
)
def test_view_sources(tags: dict[str, Any], view: str) -> None:
    codes = tags.pop("ViewCodeSequence", None)
    ds = make_dataset(mammo_pixels(12), **tags)
    if codes:
        ds.ViewCodeSequence = Sequence([_code_item(*code) for code in codes])
    assert read_meta(ds).view == view


def test_text_parsers_directly() -> None:
    assert laterality_from_text("RMLO") == "R"
    assert laterality_from_text("lcc") == "L"
    assert laterality_from_text("LM") == UNKNOWN  # latero-medial, not "left M"
    assert view_from_text("LM") == "LM"
    assert view_from_text("RLM") == "LM"
    assert view_from_text("LMLO") == "MLO"
    assert view_from_text("cranio caudal") == "CC"


def test_secondary_capture_meta_is_graceful() -> None:
    ds = make_dataset(
        mammo_pixels(8),
        SOPClassUID=SECONDARY_CAPTURE,
        ImageLaterality=None,
        ViewPosition=None,
        PresentationIntentType=None,
        Laterality="L",
    )
    meta = read_meta(ds)
    assert (meta.laterality, meta.view, meta.presentation_intent) == ("L", UNKNOWN, UNKNOWN)
    assert is_mammogram(ds, meta)[0]


@pytest.mark.parametrize(
    ("sop_class", "modality", "expected"),
    [
        (DX_MAMMO_FOR_PRESENTATION, "MG", True),
        (DX_MAMMO_FOR_PROCESSING, "MG", True),
        (SECONDARY_CAPTURE, "MG", True),
        ("1.2.840.10008.5.1.4.1.1.1.1", "MG", True),  # DX For Presentation labelled MG
        (SECONDARY_CAPTURE, "OT", False),
        (CT_IMAGE, "CT", False),
        ("1.2.840.10008.5.1.4.1.1.13.1.3", "MG", False),  # tomosynthesis volume
        (BASIC_TEXT_SR, "MG", False),
        ("1.2.840.10008.5.1.4.1.1.7.3", "MG", False),  # multi-frame grayscale word SC, 3 frames
    ],
)
def test_is_mammogram(sop_class: str, modality: str, expected: bool) -> None:
    ds = make_dataset(mammo_pixels(12), SOPClassUID=sop_class, Modality=modality)
    if sop_class.endswith(".7.3"):
        ds.NumberOfFrames = 3
    if sop_class == BASIC_TEXT_SR:
        for keyword in ("Rows", "Columns", "PixelData"):
            delattr(ds, keyword)
    ok, reason = is_mammogram(ds, read_meta(ds))
    assert ok is expected
    assert reason


# ---------------------------------------------------------------------------- fuzzing


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about the mangled tags
@pytest.mark.parametrize("syntax", ["explicit", "implicit", "j2k", "jpegls", "rle", "jpeg_sv1"])
def test_corrupted_files_raise_input_error_only(syntax: str, tmp_path: Path) -> None:
    """Flip random bytes (mostly in the header, some in the pixel data): reading, tags and
    decoding either work or raise InputError; nothing else escapes and nothing aborts."""
    base = _encode(make_dataset(mammo_pixels(12, rows=64, cols=48)), syntax, tmp_path).read_bytes()
    rng = np.random.default_rng(2024)
    for i in range(40):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, 1200)) if i % 4 else int(rng.integers(len(data) // 2, len(data)))
            data[min(pos, len(data) - 1)] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz{i}.dcm"
        path.write_bytes(bytes(data))
        try:
            ds = read_dataset(path)
            meta = read_meta(ds)
            is_mammogram(ds, meta)
            decode_pixels(ds)
        except InputError:
            pass
