"""Reading untrusted DICOM: files and tags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_file_factory import encode_as, make_dataset, mammo_pixels, roundtrip, write
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from inference.dicom_header import (
    DX_MAMMO_FOR_PRESENTATION,
    DX_MAMMO_FOR_PROCESSING,
    is_mammogram,
    laterality_from_text,
    read_dataset,
    read_meta,
    view_from_text,
)
from inference.dicom_pixels import decode_pixels
from inference.types import UNKNOWN, InputError

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
    path = encode_as(make_dataset(mammo_pixels(12)), syntax, tmp_path)
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
        SOPClassUID=SecondaryCaptureImageStorage,
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
        (SecondaryCaptureImageStorage, "MG", True),
        ("1.2.840.10008.5.1.4.1.1.1.1", "MG", True),  # DX For Presentation labelled MG
        (SecondaryCaptureImageStorage, "OT", False),
        (CTImageStorage, "CT", False),
        ("1.2.840.10008.5.1.4.1.1.13.1.3", "MG", False),  # tomosynthesis volume
        (BasicTextSRStorage, "MG", False),
        ("1.2.840.10008.5.1.4.1.1.7.3", "MG", False),  # multi-frame grayscale word SC, 3 frames
    ],
)
def test_is_mammogram(sop_class: str, modality: str, expected: bool) -> None:
    ds = make_dataset(mammo_pixels(12), SOPClassUID=sop_class, Modality=modality)
    if sop_class.endswith(".7.3"):
        ds.NumberOfFrames = 3
    if sop_class == BasicTextSRStorage:
        for keyword in ("Rows", "Columns", "PixelData"):
            delattr(ds, keyword)
    ok, reason = is_mammogram(ds, read_meta(ds))
    assert ok is expected
    assert reason


def test_a_cam_capture_with_modality_mg_is_not_a_mammogram_to_score() -> None:
    """CAM captures say Modality MG (hanging protocols), so the source reference decides: an image
    made by image processing of another image is a result, not a mammogram (no re-scoring loop)."""
    from pydicom.dataset import Dataset

    ds = make_dataset(mammo_pixels(8), SOPClassUID=SecondaryCaptureImageStorage, Modality="MG")
    assert is_mammogram(ds, read_meta(ds))[0]  # a digitised film: scored
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    ref = Dataset()
    ref.ReferencedSOPClassUID = DX_MAMMO_FOR_PRESENTATION
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ref.PurposeOfReferenceCodeSequence = [purpose]
    ds.SourceImageSequence = [ref]
    ok, reason = is_mammogram(ds, read_meta(ds))
    assert not ok and "image processing" in reason


# ---------------------------------------------------------------------------- fuzzing


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about the mangled tags
@pytest.mark.parametrize("syntax", ["explicit", "implicit", "j2k", "jpegls", "rle", "jpeg_sv1"])
def test_corrupted_files_raise_input_error_only(syntax: str, tmp_path: Path) -> None:
    """Flip random bytes (mostly in the header, some in the pixel data): reading, tags and
    decoding either work or raise InputError; nothing else escapes and nothing aborts."""
    base = encode_as(make_dataset(mammo_pixels(12, rows=64, cols=48)), syntax, tmp_path).read_bytes()
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
