"""CAD-marks presentation state: valid GSPS, references the source, marks and text inside the image,
and the source displayed as it is without the presentation state."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from mg_source_factory import breast_pixels, dciodvfy_output
from pydicom.dataset import Dataset
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from inference.dicom_header import read_meta
from inference.marks import CamMark, cam_marks
from inference.types import RESEARCH_NOTICE, AlgorithmInfo, GeometricTransform, ImageScore, InputError
from inference.uids import derive_uid, is_valid_uid
from inference.writers.common import copyable_header
from inference.writers.gsps import (
    CONTENT_LABEL,
    MARKS_LAYER,
    RESEARCH_USE_TEXT,
    TEXT_LAYER,
    build_marks_gsps,
    decision_text,
    gsps_uids,
)
from training.synth.dicom_writer import make_dicom, write_dicom

SHA = "5e" * 32
ALGORITHM = AlgorithmInfo(
    name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5, notice=RESEARCH_NOTICE
)
STUDY_UID = derive_uid("tests", "gsps-study")
ROWS, COLUMNS = 256, 191  # an odd width, as real scaled mammograms have

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not on PATH")
needs_dcmp2pgm = pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="dcmp2pgm not on PATH")

SOURCES: dict[str, tuple[dict[str, Any], str]] = {
    # name: (make_dicom keyword arguments, laterality)
    "dx-mono2-window": ({"photometric": "MONOCHROME2", "voi": "linear", "bits_stored": 14}, "L"),
    "dx-mono1-window": ({"photometric": "MONOCHROME1", "voi": "sigmoid", "bits_stored": 12}, "R"),
    "dx-mono1-lut": ({"photometric": "MONOCHROME1", "voi": "lut", "bits_stored": 12}, "L"),
    "sc-film": ({"film": True, "bits_stored": 16}, "R"),
}


def _source_file(name: str, tmp_path: Path) -> Path:
    options, side = SOURCES[name]
    bits = int(options.get("bits_stored", 12))
    pixels = breast_pixels(side, ROWS, COLUMNS, bits=bits)
    ds = make_dicom(
        pixels,
        patient_id="GSPS-1",
        study_uid=STUDY_UID,
        laterality=side,
        view="MLO",
        series_uid=derive_uid("tests", "gsps-source-series", name),
        sop_instance_uid=derive_uid("tests", "gsps-source", name),
        **options,
    )
    path = tmp_path / f"{name}.dcm"
    write_dicom(ds, path)
    return path


def _header(path: Path) -> Dataset:
    """What the pipeline hands the writers: the copyable header, no pixel data."""
    header, _ = copyable_header(pydicom.dcmread(path, stop_before_pixels=True))
    return header


def _score(header: Dataset, cam: np.ndarray, probability: float = 0.83) -> ImageScore:
    """A score whose crop box is the breast's half of the image (the chest wall side of the side)."""
    rows, columns = int(header.Rows), int(header.Columns)
    meta = read_meta(header)
    x0, x1 = (0, columns * 3 // 4) if meta.laterality == "R" else (columns // 4, columns)
    transform = GeometricTransform(
        (rows, columns), (0, rows, x0, x1), meta.laterality == "L", 1.0, 0, 0, (rows, x1 - x0)
    )
    return ImageScore(meta, float(np.log(probability / (1 - probability))), probability, cam, transform)


def _two_peak_cam() -> np.ndarray:
    cam = np.zeros((16, 12), np.float32)
    cam[4, 3], cam[4, 4] = 3.0, 2.0
    cam[11, 8] = 2.5
    return cam


def _build(
    header: Dataset,
    score: ImageScore,
    marks: tuple[CamMark, ...],
    *,
    breast_probability: float = 0.91,
    threshold: float = 0.5,
    display_window: tuple[float, float] | None = None,
) -> Dataset:
    series_uid, sop_uid = gsps_uids(
        header.SOPInstanceUID, ALGORITHM, header.StudyInstanceUID, laterality=score.meta.laterality
    )
    return build_marks_gsps(
        header,
        score,
        marks,
        breast_probability=breast_probability,
        threshold=threshold,
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=903,
        instance_number=1,
        display_window=display_window,
    )


def _write(gsps: Dataset, path: Path) -> Dataset:
    gsps.save_as(path, enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict: any invalid value pydicom notices fails the test
        return pydicom.dcmread(path)


@pytest.fixture(params=list(SOURCES))
def written(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Path, Dataset, tuple[CamMark, ...], Path]:
    """(source file, its header, the marks, the written presentation state)."""
    source_path = _source_file(request.param, tmp_path)
    header = _header(source_path)
    score = _score(header, _two_peak_cam())
    marks = cam_marks(score)
    assert len(marks) == 2
    path = tmp_path / "gsps.dcm"
    _write(_build(header, score, marks), path)
    return source_path, header, marks, path


def _texts(ds: Dataset, layer: str | None = None) -> list[Dataset]:
    return [
        text
        for annotation in ds.GraphicAnnotationSequence
        if layer is None or annotation.GraphicLayer == layer
        for text in annotation.get("TextObjectSequence", [])
    ]


def _graphics(ds: Dataset, kind: str | None = None) -> list[Dataset]:
    return [
        graphic
        for annotation in ds.GraphicAnnotationSequence
        for graphic in annotation.get("GraphicObjectSequence", [])
        if kind is None or graphic.GraphicType == kind
    ]


def _all_points(ds: Dataset) -> np.ndarray:
    """Every coordinate pair of the presentation state: graphics, text boxes, anchors."""
    points = [np.asarray(g.GraphicData, dtype=np.float64).reshape(-1, 2) for g in _graphics(ds)]
    for text in _texts(ds):
        if "BoundingBoxTopLeftHandCorner" in text:
            points.append(
                np.asarray([text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner])
            )
        if "AnchorPoint" in text:
            points.append(np.asarray([text.AnchorPoint]))
    return np.concatenate(points)


def _assert_inside(ds: Dataset, rows: int, columns: int) -> None:
    for graphic in _graphics(ds):
        assert graphic.GraphicAnnotationUnits == "PIXEL"
    for text in _texts(ds):
        assert text.BoundingBoxAnnotationUnits == "PIXEL"
        left, top = text.BoundingBoxTopLeftHandCorner
        right, bottom = text.BoundingBoxBottomRightHandCorner
        assert left < right and top < bottom
    points = _all_points(ds)
    assert points.min() >= 0.0
    assert points[:, 0].max() <= columns and points[:, 1].max() <= rows


@pytest.mark.dcmtk
@needs_dciodvfy
def test_written_gsps_passes_dciodvfy_without_warnings(written: tuple[Path, Dataset, tuple, Path]) -> None:
    *_, path = written
    output = dciodvfy_output(path)
    assert "GrayscaleSoftcopyPresentationState" in output
    assert [line for line in output.splitlines() if "Error" in line or "Warning" in line] == []


def test_reread_gsps_references_the_source(written: tuple[Path, Dataset, tuple, Path]) -> None:
    _, header, _, path = written
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert ds.Modality == "PR"
    assert ds.StudyInstanceUID == header.StudyInstanceUID and ds.PatientID == header.PatientID
    assert ds.PatientName == header.PatientName
    assert ds.SeriesInstanceUID != header.SeriesInstanceUID and ds.SOPInstanceUID != header.SOPInstanceUID
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == header.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert image.ReferencedSOPClassUID == header.SOPClassUID
    assert image.ReferencedSOPInstanceUID == header.SOPInstanceUID
    for annotation in ds.GraphicAnnotationSequence:
        (ref,) = annotation.ReferencedImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            header.SOPClassUID,
            header.SOPInstanceUID,
        )
    (area,) = ds.DisplayedAreaSelectionSequence
    assert list(area.DisplayedAreaBottomRightHandCorner) == [COLUMNS, ROWS]
    assert ds.Laterality == read_meta(header).laterality


def test_reread_gsps_header_says_what_made_it(written: tuple[Path, Dataset, tuple, Path]) -> None:
    *_, path = written
    ds = pydicom.dcmread(path)
    assert ds.ContentLabel == CONTENT_LABEL
    assert "RESEARCH USE" in ds.ContentDescription and "RESEARCH USE" in ds.SeriesDescription
    assert str(ds.ContentCreatorName) == "MammoNode^CAD"
    assert ds.Manufacturer == "MammoNode"
    assert ds.ManufacturerModelName == "efficientnet_b0"
    assert "efficientnet_b0 0.1.0" in list(ds.SoftwareVersions)
    assert {layer.GraphicLayer for layer in ds.GraphicLayerSequence} == {MARKS_LAYER, TEXT_LAYER}


def test_every_coordinate_lies_inside_the_source(written: tuple[Path, Dataset, tuple, Path]) -> None:
    *_, path = written
    _assert_inside(pydicom.dcmread(path), ROWS, COLUMNS)


def test_marks_are_drawn_where_the_cam_marks_are(written: tuple[Path, Dataset, tuple, Path]) -> None:
    _, _, marks, path = written
    ds = pydicom.dcmread(path)
    (marks_annotation,) = [a for a in ds.GraphicAnnotationSequence if a.GraphicLayer == MARKS_LAYER]
    by_group: dict[int, dict[str, np.ndarray]] = {}
    for graphic in marks_annotation.GraphicObjectSequence:
        data = np.asarray(graphic.GraphicData, dtype=np.float64).reshape(-1, 2)
        by_group.setdefault(int(graphic.GraphicGroupID), {})[graphic.GraphicType] = data
    groups = {int(g.GraphicGroupID): g.GraphicGroupLabel for g in ds.GraphicGroupSequence}
    assert groups == {1: "CAM mark 1", 2: "CAM mark 2"}
    for group_id, mark in zip((1, 2), marks, strict=True):
        assert by_group[group_id]["POINT"] == pytest.approx(np.asarray([mark.center]), abs=1e-3)
        outline = by_group[group_id]["POLYLINE"]
        assert outline == pytest.approx(np.asarray(mark.outline), abs=1e-3)
        assert np.array_equal(outline[0], outline[-1])  # closed
    (rank1_point,) = by_group[1]["POINT"]
    assert tuple(rank1_point) == pytest.approx(marks[0].center, abs=1e-3)
    labels = {str(t.UnformattedTextValue): t for t in marks_annotation.TextObjectSequence}
    assert set(labels) == {"CAM 1", f"CAM 2 ({marks[1].relative_activation:.0%})"}
    assert tuple(labels["CAM 1"].AnchorPoint) == pytest.approx(marks[0].center, abs=1e-3)


def test_text_carries_notice_probabilities_and_decision(written: tuple[Path, Dataset, tuple, Path]) -> None:
    *_, path = written
    texts = [str(t.UnformattedTextValue) for t in _texts(pydicom.dcmread(path), TEXT_LAYER)]
    assert texts[0] == RESEARCH_NOTICE
    assert any("image 0.830" in t and "breast 0.910" in t for t in texts)
    assert decision_text(0.91, 0.5) in texts
    assert any("RECALL (0.910 >= threshold 0.500)" in t for t in texts)
    assert not any("NO RECALL" in t for t in texts)
    assert any(SHA[:12] in t for t in texts)


@pytest.mark.parametrize(
    ("breast_probability", "threshold", "recall"),
    [(0.91, 0.5, True), (0.31, 0.5, False), (0.5, 0.5, True), (0.4999, 0.5, False), (0.2, 0.1, True)],
)
def test_decision_text_follows_probability_and_threshold(
    breast_probability: float, threshold: float, recall: bool, tmp_path: Path
) -> None:
    header = _header(_source_file("dx-mono2-window", tmp_path))
    score = _score(header, _two_peak_cam())
    gsps = _build(header, score, cam_marks(score), breast_probability=breast_probability, threshold=threshold)
    texts = [str(t.UnformattedTextValue) for t in _texts(_write(gsps, tmp_path / "ps.dcm"), TEXT_LAYER)]
    (decision,) = [t for t in texts if t.startswith("Breast decision")]
    assert decision == decision_text(breast_probability, threshold)
    assert ("NO RECALL" not in decision) is recall
    assert f"threshold {threshold:.3f}" in decision


@pytest.mark.dcmtk
@needs_dcmp2pgm
def test_source_is_displayed_as_without_the_presentation_state(
    written: tuple[Path, Dataset, tuple, Path], tmp_path: Path
) -> None:
    """dcmtk renders the source with our presentation state and with the one it derives from the
    image itself (its VOI, MONOCHROME1 polarity): the pictures agree (a VOI LUT rescaled to 16
    bits may round one grey level off)."""
    source_path, header, _, path = written
    with_ps, without = tmp_path / "with.pgm", tmp_path / "without.pgm"
    subprocess.run(["dcmp2pgm", "-p", str(path), str(source_path), str(with_ps)], check=True, timeout=60)
    subprocess.run(["dcmp2pgm", str(source_path), str(without)], check=True, timeout=60)
    a, b = _read_pgm(with_ps), _read_pgm(without)
    assert a.shape == b.shape == (ROWS, COLUMNS)
    assert np.abs(a - b).max() <= 1
    assert a.std() > 10  # a picture, not a flat field
    ds = pydicom.dcmread(path)
    assert ds.PresentationLUTShape == (
        "INVERSE" if header.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    )


def _read_pgm(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    header = re.match(rb"P5\s+(\d+)\s+(\d+)\s+255\s", raw)
    assert header is not None, "an 8-bit binary PGM"
    width, height = int(header.group(1)), int(header.group(2))
    return np.frombuffer(raw[header.end() :], dtype=np.uint8).reshape(height, width).astype(np.int32)


def test_voi_is_the_one_the_model_saw(tmp_path: Path) -> None:
    """The first window (with its function) as inference.voi reads it; the LUT only without one."""
    header = _header(_source_file("dx-mono1-window", tmp_path))
    (voi,) = _build(header, _score(header, _two_peak_cam()), ()).SoftcopyVOILUTSequence
    assert float(voi.WindowCenter) == float(header.WindowCenter)
    assert float(voi.WindowWidth) == float(header.WindowWidth)
    assert voi.VOILUTFunction == "SIGMOID"
    lut_header = _header(_source_file("dx-mono1-lut", tmp_path))
    (lut_voi,) = _build(lut_header, _score(lut_header, _two_peak_cam()), ()).SoftcopyVOILUTSequence
    assert lut_voi.VOILUTSequence[0].LUTDescriptor[2] == 16
    both = _header(_source_file("dx-mono1-lut", tmp_path))
    both.WindowCenter, both.WindowWidth = 1000, 2000  # allowed by the standard, refused by highdicom
    (both_voi,) = _build(both, _score(both, _two_peak_cam()), ()).SoftcopyVOILUTSequence
    assert float(both_voi.WindowCenter) == 1000 and "VOILUTSequence" not in both_voi


def test_display_window_is_used_only_when_the_source_has_no_voi(tmp_path: Path) -> None:
    film = _header(_source_file("sc-film", tmp_path))
    assert "SoftcopyVOILUTSequence" not in _build(film, _score(film, _two_peak_cam()), ())
    (voi,) = _build(
        film, _score(film, _two_peak_cam()), (), display_window=(30000, 40000)
    ).SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (30000, 40000)
    dx = _header(_source_file("dx-mono2-window", tmp_path))
    (dx_voi,) = _build(dx, _score(dx, _two_peak_cam()), (), display_window=(1, 2)).SoftcopyVOILUTSequence
    assert float(dx_voi.WindowCenter) == float(dx.WindowCenter)


@pytest.mark.dcmtk
@needs_dciodvfy
def test_image_without_marks_still_gets_the_text(tmp_path: Path) -> None:
    header = _header(_source_file("sc-film", tmp_path))
    score = _score(header, np.ones((16, 12), np.float32), probability=0.12)
    marks = cam_marks(score)
    assert marks == ()
    path = tmp_path / "ps.dcm"
    ds = _write(_build(header, score, marks, breast_probability=0.2), path)
    assert [a.GraphicLayer for a in ds.GraphicAnnotationSequence] == [TEXT_LAYER]
    assert "GraphicGroupSequence" not in ds
    texts = [str(t.UnformattedTextValue) for t in _texts(ds)]
    assert RESEARCH_NOTICE in texts and decision_text(0.2, 0.5) in texts
    assert any("No CAM region" in t for t in texts)
    assert [line for line in dciodvfy_output(path).splitlines() if "Error" in line or "Warning" in line] == []


def test_a_model_without_notice_still_says_research_use(tmp_path: Path) -> None:
    header = _header(_source_file("dx-mono2-window", tmp_path))
    plain = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5)
    series_uid, sop_uid = gsps_uids(header.SOPInstanceUID, plain, STUDY_UID)
    gsps = build_marks_gsps(
        header,
        _score(header, _two_peak_cam()),
        (),
        breast_probability=0.4,
        threshold=0.5,
        algorithm=plain,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=903,
        instance_number=2,
    )
    assert str(_texts(gsps, TEXT_LAYER)[0].UnformattedTextValue) == RESEARCH_USE_TEXT


def _resized_header(tmp_path: Path, rows: int, columns: int) -> Dataset:
    """A real source header claiming another size (headers are all the writer reads)."""
    header = _header(_source_file("dx-mono2-window", tmp_path))
    header.Rows, header.Columns = rows, columns
    return header


@pytest.mark.dcmtk
@needs_dciodvfy
def test_full_size_odd_mammogram_keeps_everything_inside_and_legible(tmp_path: Path) -> None:
    rows, columns = 4463, 2847
    header = _resized_header(tmp_path, rows, columns)
    score = _score(header, _two_peak_cam())
    marks = cam_marks(score)
    path = tmp_path / "ps.dcm"
    ds = _write(_build(header, score, marks), path)
    _assert_inside(ds, rows, columns)
    heights = [
        t.BoundingBoxBottomRightHandCorner[1] - t.BoundingBoxTopLeftHandCorner[1]
        for t in _texts(ds, TEXT_LAYER)
    ]
    assert min(heights) > 40  # about 1/40 of the height unless the width limits it
    assert max(c for g in _graphics(ds, "POLYLINE") for c in g.GraphicData[0::2]) > columns / 2
    assert [line for line in dciodvfy_output(path).splitlines() if "Error" in line or "Warning" in line] == []


@pytest.mark.dcmtk
@needs_dciodvfy
@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (2, 3), (7, 1)])
def test_tiny_images_do_not_crash(rows: int, columns: int, tmp_path: Path) -> None:
    header = _resized_header(tmp_path, rows, columns)
    cam = np.zeros((2, 2), np.float32)
    cam[0, 0] = 1.0
    transform = GeometricTransform((rows, columns), (0, rows, 0, columns), False, 1.0, 0, 0, (rows, columns))
    score = ImageScore(read_meta(header), 0.0, 0.5, cam, transform)
    path = tmp_path / "ps.dcm"
    marks = cam_marks(score)
    assert len(marks) == 1
    ds = _write(_build(header, score, marks), path)
    _assert_inside(ds, rows, columns)
    assert RESEARCH_NOTICE in [str(t.UnformattedTextValue) for t in _texts(ds, TEXT_LAYER)]
    assert len(_graphics(ds, "POINT")) == 1
    output = dciodvfy_output(path)
    assert [line for line in output.splitlines() if "Error" in line or "Warning" in line] == []


def test_geometry_outside_the_image_is_clamped_or_left_out_and_said(tmp_path: Path) -> None:
    header = _header(_source_file("dx-mono2-window", tmp_path))
    score = _score(header, _two_peak_cam())
    partly_out = CamMark(1, (50.0, 60.0), ((-5.0, 40.0), (80.0, 40.0), (80.0, 300.0), (-5.0, 40.0)), 1.0)
    all_out = CamMark(
        2, (500.0, 500.0), ((400.0, 400.0), (450.0, 400.0), (400.0, 450.0), (400.0, 400.0)), 0.7
    )
    ds = _write(_build(header, score, (partly_out, all_out)), tmp_path / "ps.dcm")
    _assert_inside(ds, ROWS, COLUMNS)
    texts = [str(t.UnformattedTextValue) for t in _texts(ds, TEXT_LAYER)]
    assert "Note: CAM mark 1 clamped to the image" in texts
    assert "Note: outline of CAM mark 2 does not fit the image" in texts
    assert len(_graphics(ds, "POLYLINE")) == 1 and len(_graphics(ds, "POINT")) == 2
    (first_point, _) = _graphics(ds, "POINT")
    assert tuple(first_point.GraphicData) == pytest.approx((50.0, 60.0))


@pytest.mark.parametrize(("breast_right", "beside"), [(700, True), (1400, False)])
def test_text_goes_beside_the_breast_only_where_it_stays_legible(
    breast_right: int, beside: bool, tmp_path: Path
) -> None:
    rows, columns = 4463, 2847
    header = _resized_header(tmp_path, rows, columns)
    crop = (0, rows, 0, breast_right)
    transform = GeometricTransform((rows, columns), crop, False, 1.0, 0, 0, (rows, breast_right))
    ds = _build(header, ImageScore(read_meta(header), 0.0, 0.5, _two_peak_cam(), transform), ())
    texts = _texts(ds, TEXT_LAYER)
    assert (min(t.BoundingBoxTopLeftHandCorner[0] for t in texts) >= breast_right) is beside
    heights = [t.BoundingBoxBottomRightHandCorner[1] - t.BoundingBoxTopLeftHandCorner[1] for t in texts]
    assert min(heights) > 50  # some 12 screen pixels when 4463 rows fill a 1080-pixel screen


def test_uids_are_deterministic_and_depend_on_image_side_weights_and_version() -> None:
    a, b = derive_uid("tests", "image-a"), derive_uid("tests", "image-b")
    first = gsps_uids(a, ALGORITHM, STUDY_UID, laterality="L")
    assert first == gsps_uids(a, ALGORITHM, STUDY_UID, 1, laterality="L")
    assert all(is_valid_uid(uid) for uid in first)
    same_side = gsps_uids(b, ALGORITHM, STUDY_UID, laterality="L")
    assert same_side[0] == first[0] and same_side[1] != first[1]
    other_side = gsps_uids(b, ALGORITHM, STUDY_UID, laterality="R")
    assert other_side[0] != first[0] and other_side[1] == same_side[1]
    other_weights = AlgorithmInfo(
        name="efficientnet_b0", version="0.1.0", weights_sha256="00" * 32, threshold=0.5
    )
    changed = gsps_uids(a, other_weights, STUDY_UID, laterality="L")
    assert changed[0] != first[0] and changed[1] != first[1]
    assert gsps_uids(a, ALGORITHM, STUDY_UID, 2, laterality="L") != first
    with pytest.raises(ValueError):
        gsps_uids("../../x", ALGORITHM, STUDY_UID)
    with pytest.raises(ValueError):
        gsps_uids(a, ALGORITHM, STUDY_UID, 0)


def test_inconsistent_inputs_are_rejected(tmp_path: Path) -> None:
    header = _header(_source_file("dx-mono2-window", tmp_path))
    score = _score(header, _two_peak_cam())
    other = _header(_source_file("dx-mono1-window", tmp_path))
    with pytest.raises(ValueError, match="not the score of this source"):
        _build(other, score, ())
    with pytest.raises(ValueError, match="computed on a"):
        _build(_resized_header(tmp_path, ROWS + 1, COLUMNS), score, ())
    with pytest.raises(ValueError, match="breast_probability"):
        _build(header, score, (), breast_probability=1.5)
    with pytest.raises(ValueError, match="threshold"):
        _build(header, score, (), threshold=float("nan"))
    series_uid, sop_uid = gsps_uids(header.SOPInstanceUID, ALGORITHM, STUDY_UID)

    def build(source: Dataset, series_instance_uid: str) -> Dataset:
        return build_marks_gsps(
            source,
            score,
            (),
            breast_probability=0.5,
            threshold=0.5,
            algorithm=ALGORITHM,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_uid,
            series_number=1,
            instance_number=1,
        )

    with pytest.raises(ValueError, match="new series"):
        build(header, header.SeriesInstanceUID)
    with pytest.raises(ValueError, match="invalid series_instance_uid"):
        build(header, "../../x")
    rgb = _header(_source_file("dx-mono2-window", tmp_path))
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation = 3, "RGB"
    with pytest.raises(InputError, match="MONOCHROME"):
        build(rgb, series_uid)
    hostile = _header(_source_file("dx-mono2-window", tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value itself
        hostile.SOPInstanceUID = "../../x"
    with pytest.raises(InputError, match="SOPInstanceUID"):
        build(hostile, series_uid)


def test_building_leaves_the_source_header_as_it_was(tmp_path: Path) -> None:
    header = _header(_source_file("dx-mono1-lut", tmp_path))
    before = deepcopy(header)
    gsps = _build(header, _score(header, _two_peak_cam()), ())
    assert header == before
    gsps.PatientName = "Changed^Name"
    assert header.PatientName == before.PatientName  # no element shared with the source
