"""CAM secondary capture: valid IOD, same patient and study, references the source, lossless."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

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
        caption_lines=["MammoNode 0.1.0 efficientnet_b0", "P(malignancy) image 0.83  breast 0.91"],
    )


def _build(source: Dataset, overlay: np.ndarray) -> pydicom.Dataset:
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
