"""CAM secondary capture: valid IOD, same patient and study, references the source, lossless."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from mg_source_factory import (
    DX_MG_FOR_PRESENTATION,
    PATIENT_ID,
    STUDY_UID,
    dciodvfy_errors,
    make_dx_mg,
    make_sc_mg,
)
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

from inference.overlay import render_cam_overlay
from inference.types import RESEARCH_NOTICE, AlgorithmInfo, InputError
from inference.uids import is_valid_uid
from inference.writers.sc import SERIES_DESCRIPTION, build_cam_sc, cam_sc_uids
from inference.writers.source_attributes import PATIENT_AND_STUDY_KEYWORDS

SHA = "3f" * 32
ALGORITHM = AlgorithmInfo(
    name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5, notice=RESEARCH_NOTICE
)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not on PATH")


def _overlay(source: Dataset) -> np.ndarray:
    pixels = source.pixel_array.astype(np.float32)
    image01 = pixels / max(float(pixels.max()), 1.0)
    cam = np.zeros_like(image01)
    cam[100:140, 40:90] = 1.0
    return render_cam_overlay(
        image01,
        cam,
        notice=ALGORITHM.notice,
        caption_lines=["L CC  image P 0.83", "L breast P 0.91 >= threshold 0.50: RECALL"],
    )


def _build(
    source: Dataset, overlay: np.ndarray, *, display_factor: int | None = 1, **kwargs: Any
) -> pydicom.Dataset:
    series_uid, sop_uid = cam_sc_uids(source.SOPInstanceUID, ALGORITHM, source.StudyInstanceUID)
    return build_cam_sc(
        source,
        overlay,
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=901,
        instance_number=1,
        probability=0.83,
        display_factor=display_factor,
        **kwargs,
    )


@pytest.fixture(params=["dx-mg-R-MLO", "dx-mg-L-CC", "sc-mg-L"])
def source(request: pytest.FixtureRequest) -> Dataset:
    if request.param == "dx-mg-R-MLO":
        return make_dx_mg("R", "MLO")
    if request.param == "dx-mg-L-CC":
        return make_dx_mg("L", "CC", index=2)
    return make_sc_mg("L")


@pytest.fixture
def written(source: Dataset, tmp_path: Path) -> tuple[Dataset, np.ndarray, Path]:
    overlay = _overlay(source)
    sc = _build(source, overlay)
    path = tmp_path / "cam.dcm"
    sc.save_as(path, enforce_file_format=True)
    return source, overlay, path


@pytest.mark.dcmtk
@needs_dciodvfy
def test_written_sc_passes_dciodvfy(written: tuple[Dataset, np.ndarray, Path]) -> None:
    _, _, path = written
    assert dciodvfy_errors(path) == []


def test_reread_sc_belongs_to_source_patient_and_study(written: tuple[Dataset, np.ndarray, Path]) -> None:
    source, _, path = written
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert ds.StudyInstanceUID == source.StudyInstanceUID == STUDY_UID
    assert ds.PatientID == source.PatientID == PATIENT_ID
    assert ds.PatientName == source.PatientName
    assert ds.AccessionNumber == source.AccessionNumber
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID


def test_reread_sc_references_the_source_instance(written: tuple[Dataset, np.ndarray, Path]) -> None:
    source, _, path = written
    ds = pydicom.dcmread(path)
    (ref,) = ds.SourceImageSequence
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_reread_sc_pixels_are_the_overlay_exactly(written: tuple[Dataset, np.ndarray, Path]) -> None:
    _, overlay, path = written
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "RGB"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (overlay.shape[0], overlay.shape[1], 3)
    assert np.array_equal(ds.pixel_array, overlay)


def test_reread_sc_header_is_traceable(written: tuple[Dataset, np.ndarray, Path]) -> None:
    source, _, path = written
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.Manufacturer == "MammoNode"
    assert ds.SeriesDescription == SERIES_DESCRIPTION
    assert "RESEARCH USE" in ds.SeriesDescription
    assert "efficientnet_b0 0.1.0" in list(ds.SoftwareVersions)
    assert all(len(v) <= 64 for v in ds.SoftwareVersions)
    assert "0.1.0" in ds.DerivationDescription and SHA in ds.DerivationDescription
    assert RESEARCH_NOTICE in ds.ImageComments
    assert "0.8300" in ds.ImageComments
    expected = source.get("ImageLaterality") or source.get("Laterality")
    assert ds.ImageLaterality == expected
    assert "Laterality" not in ds  # series-level laterality would be wrong for a mixed CAM series
    if source.SOPClassUID == DX_MG_FOR_PRESENTATION:
        assert list(ds.PatientOrientation) == list(source.PatientOrientation)


def test_uids_are_deterministic_and_depend_on_the_weights() -> None:
    src = make_dx_mg("R", "CC")
    first = cam_sc_uids(src.SOPInstanceUID, ALGORITHM, STUDY_UID)
    assert first == cam_sc_uids(src.SOPInstanceUID, ALGORITHM, STUDY_UID)
    assert all(is_valid_uid(u) for u in first)
    other_weights = AlgorithmInfo(
        name=ALGORITHM.name, version=ALGORITHM.version, weights_sha256="00" * 32, threshold=0.5
    )
    changed = cam_sc_uids(src.SOPInstanceUID, other_weights, STUDY_UID)
    assert changed[0] != first[0] and changed[1] != first[1]
    # One series per study and model; one instance per source image and result version.
    other_image = cam_sc_uids(make_dx_mg("R", "MLO").SOPInstanceUID, ALGORITHM, STUDY_UID)
    assert other_image[0] == first[0] and other_image[1] != first[1]
    assert cam_sc_uids(src.SOPInstanceUID, ALGORITHM, STUDY_UID, result_version=2) != first


def test_rebuilding_gives_the_same_instance_uid() -> None:
    src = make_dx_mg("L", "MLO")
    overlay = _overlay(src)
    assert _build(src, overlay).SOPInstanceUID == _build(src, overlay).SOPInstanceUID


def test_lossy_source_makes_a_lossy_flagged_capture() -> None:
    src = make_dx_mg("R", "CC")
    src.LossyImageCompression = "01"
    src.LossyImageCompressionRatio = 10
    src.LossyImageCompressionMethod = "ISO_10918_1"
    sc = _build(src, _overlay(src))
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"


def test_bad_inputs_are_rejected() -> None:
    src = make_dx_mg("R", "CC")
    overlay = _overlay(src)
    series_uid, sop_uid = cam_sc_uids(src.SOPInstanceUID, ALGORITHM, STUDY_UID)
    common = {
        "algorithm": ALGORITHM,
        "series_number": 901,
        "instance_number": 1,
        "probability": 0.5,
        "display_factor": 1,
    }
    with pytest.raises(ValueError, match="uint8"):
        build_cam_sc(
            src, overlay.astype(np.uint16), series_instance_uid=series_uid, sop_instance_uid=sop_uid, **common
        )
    with pytest.raises(ValueError, match="invalid"):
        build_cam_sc(src, overlay, series_instance_uid="../../x", sop_instance_uid=sop_uid, **common)
    with pytest.raises(ValueError, match="new series"):
        build_cam_sc(
            src, overlay, series_instance_uid=src.SeriesInstanceUID, sop_instance_uid=sop_uid, **common
        )
    hostile = make_dx_mg("R", "CC")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value itself
        hostile.SOPInstanceUID = "../../x"
    with pytest.raises(InputError):
        build_cam_sc(hostile, overlay, series_instance_uid=series_uid, sop_instance_uid=sop_uid, **common)
    with pytest.raises(ValueError):
        cam_sc_uids("../../x", ALGORITHM, STUDY_UID)


@pytest.mark.parametrize("plugin", ["pylibjpeg", "pydicom"])
def test_every_safe_rle_encoder_gives_the_same_pixels(plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture's bytes do not depend on which safe RLE encoder a machine has installed, so a
    resend from a node without pylibjpeg-rle still carries the very same object (invariant 6).
    Odd-sized overlays are covered in child processes by test_codecs_odd_sizes.py."""
    from inference.writers import sc as sc_module

    src = make_dx_mg("R", "MLO")
    overlay = _overlay(src)
    reference = _build(src, overlay)
    monkeypatch.setattr(sc_module, "RLE_ENCODER_PLUGINS", (plugin,))
    assert sc_module.rle_encoder_plugin() == plugin
    rebuilt = _build(src, overlay)
    assert rebuilt.file_meta.TransferSyntaxUID == RLELossless
    assert rebuilt.PixelData == reference.PixelData
    assert rebuilt.SOPInstanceUID == reference.SOPInstanceUID


# --------------------------------------------------------------------------------------------
# Patient and study, view, geometry: what a hanging protocol and a ruler need
# --------------------------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _rich_source() -> Dataset:
    """A DX mammogram whose Patient and Study modules carry much more than highdicom copies."""
    src = make_dx_mg("L", "CC", index=3)
    src.IssuerOfPatientID = "HOSP-A"
    src.TypeOfPatientID = "TEXT"
    other = Dataset()
    other.PatientID = "NHS-123"
    other.IssuerOfPatientID = "NHS"
    other.TypeOfPatientID = "TEXT"
    src.OtherPatientIDsSequence = [other]
    src.PatientBirthTime = "081500"
    src.PatientComments = "synthetic"
    src.EthnicGroup = "X"
    src.StudyDescription = "MG screening bilateral"
    src.PhysiciansOfRecord = "Doe^Jane"
    src.NameOfPhysiciansReadingStudy = "Roe^Richard"
    src.ConsultingPhysicianName = "Poe^Ann"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-1"
    src.IssuerOfAccessionNumberSequence = [issuer]
    src.ProcedureCodeSequence = [_code("24623002", "SCT", "Screening mammography")]
    src.RequestingService = "Breast screening"
    src.PatientAge = "054Y"
    src.PatientSize = "1.65"
    src.PatientWeight = "62"
    src.AdditionalPatientHistory = "none"
    src.AdmissionID = "ADM-9"
    src.ClinicalTrialTimePointID = "T0"
    return src


def test_every_patient_and_study_attribute_of_the_source_is_copied(tmp_path: Path) -> None:
    src = _rich_source()
    path = tmp_path / "cam.dcm"
    _build(src, _overlay(src)).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    present = [k for k in PATIENT_AND_STUDY_KEYWORDS if k in src]
    for keyword in ("IssuerOfPatientID", "OtherPatientIDsSequence", "StudyDescription", "PatientAge"):
        assert keyword in present
    assert len(present) >= 25
    assert {k: ds[k].value for k in present} == {k: src[k].value for k in present}
    assert ds.OtherPatientIDsSequence[0].PatientID == "NHS-123"
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_patient_attributes_with_invalid_values_are_left_out() -> None:
    src = _rich_source()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src.PatientAge = "fifty-four"  # not an AS value
    sc = _build(src, _overlay(src))
    assert "PatientAge" not in sc
    assert sc.IssuerOfPatientID == "HOSP-A"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (("399162004", "SCT", "cranio-caudal"), ("399162004", "SCT", "cranio-caudal")),
        (("R-10242", "SRT", "cranio-caudal"), ("399162004", "SCT", "cranio-caudal")),  # legacy -> SCT
        (("X-1", "99LOCAL", "Cranio-caudal rolled"), ("X-1", "99LOCAL", "Cranio-caudal rolled")),
    ],
)
def test_view_laterality_and_modality_from_a_dx_source_with_a_view_code(
    code: tuple[str, str, str], expected: tuple[str, str, str]
) -> None:
    src = make_dx_mg("L", "CC")
    view_item = _code(*code)
    view_item.ViewModifierCodeSequence = [_code("399161006", "SCT", "Cleavage")]
    src.ViewCodeSequence = [view_item]
    del src.ViewPosition
    sc = _build(src, _overlay(src))
    assert sc.Modality == "MG"
    assert sc.ImageLaterality == "L"
    (item,) = sc.ViewCodeSequence
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == expected
    # The SC's view macro wants content items as modifiers, not the mammography module's codes.
    assert "ViewModifierCodeSequence" not in item


@pytest.mark.parametrize(("view", "code"), [("MLO", "399368009"), ("XCCL", "399192008"), ("FB", "399196006")])
def test_film_style_source_gets_its_view_from_the_callers_reading(view: str, code: str) -> None:
    """CBIS-DDSM-like: a Secondary Capture with Modality MG, no ViewPosition, no view code; the
    view is known only to the caller (read from free text into its ImageMeta)."""
    src = make_sc_mg("R")
    assert "ViewPosition" not in src and "ViewCodeSequence" not in src
    sc = _build(src, _overlay(src), view=view, laterality="R")
    assert sc.Modality == "MG"
    assert sc.ImageLaterality == "R"
    assert sc.ViewCodeSequence[0].CodeValue == code
    assert sc.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert "Laterality" not in sc


def test_an_unknown_view_is_left_out() -> None:
    src = make_sc_mg("L")
    for view in (None, "unknown", "AT"):
        assert "ViewCodeSequence" not in _build(src, _overlay(src), view=view)


def test_view_position_of_the_source_is_used_when_the_caller_gives_none() -> None:
    src = make_dx_mg("R", "MLO")
    assert _build(src, _overlay(src)).ViewCodeSequence[0].CodeValue == "399368009"


def _sized(source: Dataset, rows: int, columns: int) -> Dataset:
    """``source`` claiming another size (build_cam_sc reads the header only)."""
    source.Rows, source.Columns = rows, columns
    return source


@pytest.mark.parametrize(
    ("rows", "columns", "factor"), [(4463, 2847, 3), (4672, 2632, 3), (2013, 1169, 1), (4097, 10, 3)]
)
def test_pixel_spacing_is_the_source_spacing_times_the_display_factor(
    rows: int, columns: int, factor: int
) -> None:
    src = _sized(make_dx_mg("L", "CC"), rows, columns)  # ImagerPixelSpacing 0.1
    overlay = np.zeros((rows // factor, columns // factor, 3), dtype=np.uint8)
    sc = _build(src, overlay, display_factor=factor)
    assert (sc.Rows, sc.Columns) == (rows // factor, columns // factor)
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([0.1 * factor] * 2, abs=1e-12)
    assert "PixelSpacingCalibrationType" not in sc  # detector-plane numbers: nothing was calibrated
    assert "ImagerPixelSpacing" in sc.DerivationDescription and f"x {factor}" in sc.DerivationDescription


def test_calibrated_pixel_spacing_is_preferred_and_keeps_its_calibration() -> None:
    src = _sized(make_dx_mg("R", "CC"), 4096, 3328)
    src.PixelSpacing = [0.0941, 0.0941]
    src.PixelSpacingCalibrationType = "GEOMETRY"
    src.PixelSpacingCalibrationDescription = "Magnification corrected"
    sc = _build(src, np.zeros((2048, 1664, 3), dtype=np.uint8), display_factor=2)
    assert [str(v) for v in sc.PixelSpacing] == ["0.1882", "0.1882"]
    assert sc.PixelSpacingCalibrationType == "GEOMETRY"
    assert "Magnification corrected" in sc.PixelSpacingCalibrationDescription


def test_film_spacing_is_scaled_too() -> None:
    src = _sized(make_sc_mg("L"), 4600, 2800)
    src.NominalScannedPixelSpacing = [0.05, 0.05]
    sc = _build(src, np.zeros((2300, 1400, 3), dtype=np.uint8), display_factor=2)
    assert [float(v) for v in sc.NominalScannedPixelSpacing] == [0.1, 0.1]
    assert "PixelSpacing" not in sc  # no patient or detector spacing was known


def test_without_a_display_factor_no_geometry_is_claimed() -> None:
    src = make_dx_mg("L", "CC")
    sc = _build(src, np.zeros((100, 60, 3), dtype=np.uint8), display_factor=None)
    assert "PixelSpacing" not in sc
    assert sc.Rows == 100


@pytest.mark.parametrize(("shape", "factor"), [((128, 96), 1), ((129, 96), 2), ((128, 96), 0)])
def test_an_overlay_that_is_not_the_source_grid_is_refused(shape: tuple[int, int], factor: int) -> None:
    src = make_dx_mg("L", "CC")  # 256 x 192
    with pytest.raises(ValueError, match="display_factor"):
        _build(src, np.zeros((*shape, 3), dtype=np.uint8), display_factor=factor)


@pytest.mark.dcmtk
@needs_dciodvfy
@pytest.mark.parametrize("kind", ["dx-view-code", "film-view-from-meta", "calibrated"])
def test_described_captures_pass_dciodvfy(kind: str, tmp_path: Path) -> None:
    if kind == "dx-view-code":
        src = make_dx_mg("L", "MLO")
        view_item = _code("R-10226", "SRT", "medio-lateral oblique")
        view_item.ViewModifierCodeSequence = [_code("399161006", "SCT", "Cleavage")]
        src.ViewCodeSequence = [view_item]
        sc = _build(_sized(src, 4463, 2847), np.zeros((1487, 949, 3), dtype=np.uint8), display_factor=3)
    elif kind == "film-view-from-meta":
        src = make_sc_mg("R")
        sc = _build(src, _overlay(src), view="MLO", laterality="R")
    else:
        src = _sized(_rich_source(), 4096, 3328)
        src.PixelSpacing = [0.0941, 0.0941]
        src.PixelSpacingCalibrationType = "GEOMETRY"
        src.PixelSpacingCalibrationDescription = "Magnification corrected"
        sc = _build(src, np.zeros((2048, 1664, 3), dtype=np.uint8), display_factor=2)
    path = tmp_path / "cam.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
