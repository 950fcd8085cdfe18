"""Mammography CAD SR (TID 4000): valid, its marks land on their images where the CAM peaks, and
everything a workstation draws refers back to a source image.

Written, re-read with pydicom in strict mode (highdicom has no reader for this SOP class), validated
with dciodvfy, dumped with dsrdump. The content tree is walked here directly, following by-reference
relationships (``ReferencedContentItemIdentifier``) the way a workstation does.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from mg_source_factory import PATIENT_ID, STUDY_UID, dciodvfy_output, make_dx_mg, make_sc_mg
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MammographyCADSRStorage, SecondaryCaptureImageStorage
from test_writer_sr import ALGORITHM, SHA, _sources, _study, needs_dciodvfy

from inference.cam import cam_to_original
from inference.marks import CamMark, cam_marks
from inference.types import (
    RESEARCH_NOTICE,
    SCREENING_VIEWS,
    AlgorithmInfo,
    ImageFailure,
    InputError,
    StudyScore,
    view_key,
)
from inference.uids import is_valid_uid
from inference.writers import cad_codes as c
from inference.writers.cad_sr import SERIES_DESCRIPTION, build_cad_sr, cad_sr_uids
from inference.writers.sr import sr_uids

if TYPE_CHECKING:
    from inference.pipeline import Pipeline

needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk dsrdump not on PATH")
STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "RFC5646"}

Path_ = tuple[int, ...]


# --- Walking the content tree ---------------------------------------------------------------------


def _items(root: Dataset) -> Iterator[tuple[Path_, Dataset]]:
    """Every content item with its position path (root = (1,)), depth first, in document order."""

    def walk(item: Dataset, path: Path_) -> Iterator[tuple[Path_, Dataset]]:
        yield path, item
        for index, child in enumerate(item.get("ContentSequence", []), start=1):
            yield from walk(child, (*path, index))

    yield from walk(root, (1,))


def _at(root: Dataset, path: Sequence[int]) -> Dataset:
    assert path[0] == 1, "a content item path starts at the root"
    item = root
    for index in path[1:]:
        item = item.ContentSequence[index - 1]
    return item


def _name(item: Dataset) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None


def _value(item: Dataset) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def _named(root: Dataset, concept: object) -> list[tuple[Path_, Dataset]]:
    value = concept.value  # type: ignore[attr-defined]
    return [(p, i) for p, i in _items(root) if _name(i) == value]


def _children(item: Dataset, concept: object) -> list[Dataset]:
    value = concept.value  # type: ignore[attr-defined]
    return [i for i in item.get("ContentSequence", []) if _name(i) == value]


def _child(item: Dataset, concept: object) -> Dataset:
    (found,) = _children(item, concept)
    return found


def _selected_image(root: Dataset, scoord: Dataset) -> Dataset:
    """The library IMAGE a SCOORD is SELECTED FROM (by reference, as TID 4021 requires)."""
    (rel,) = scoord.ContentSequence
    assert rel.RelationshipType == "SELECTED FROM"
    assert "ValueType" not in rel, "the image is referenced, not repeated"
    target = _at(root, [int(v) for v in rel.ReferencedContentItemIdentifier])
    assert target.ValueType == "IMAGE"
    return target


def _image_uid(image_item: Dataset) -> str:
    return str(image_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _library(root: Dataset) -> dict[str, Dataset]:
    (_, library), *_ = _named(root, c.IMAGE_LIBRARY)
    return {_image_uid(item): item for item in library.ContentSequence}


def _rank(finding: Dataset) -> int:
    description = str(_child(finding, c.SELECTED_REGION_DESCRIPTION).TextValue)
    assert description.startswith("Region ")
    return int(description.split()[1])


def _probability(item: Dataset) -> float:
    (num,) = _children(item, c.PROBABILITY_OF_CANCER)
    unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("%", "UCUM")
    return float(num.MeasuredValueSequence[0].NumericValue) / 100.0


def _findings(root: Dataset) -> list[Dataset]:
    return [i for _, i in _named(root, c.SINGLE_IMAGE_FINDING)]


def _finding_image(root: Dataset, finding: Dataset) -> str:
    return _image_uid(_selected_image(root, _child(finding, c.CENTER)))


# --- Inputs -----------------------------------------------------------------------------------------


def _peaked_cam(peaks: Sequence[tuple[int, int, float]]) -> np.ndarray:
    cam = np.zeros((8, 6), np.float32)
    for row, col, value in peaks:
        cam[row, col] = value
    return cam


def _scored_with_cams(
    probabilities: Sequence[float] = (0.12, 0.64, 0.71, 0.93),
) -> tuple[list[Dataset], StudyScore]:
    """The TID 1500 tests' four sources (R CC, R MLO, L CC, L secondary capture without a view),
    each with a CAM that peaks somewhere else; the R CC one has a second, weaker region."""
    sources = _sources()
    study = _study(sources, list(probabilities))
    cams = [
        _peaked_cam([(1, 1, 4.0), (6, 4, 3.0)]),
        _peaked_cam([(3, 2, 5.0)]),
        _peaked_cam([(5, 3, 2.0)]),
        _peaked_cam([(1, 4, 6.0)]),
    ]
    for image, cam in zip(study.images, cams, strict=True):
        image.cam = cam
    return sources, study


def _marks(study: StudyScore) -> dict[str, tuple[CamMark, ...]]:
    return {image.meta.sop_instance_uid: cam_marks(image) for image in study.images}


def _build(
    study: StudyScore,
    sources: Sequence[Dataset],
    *,
    marks: dict[str, tuple[CamMark, ...]] | None = None,
    algorithm: AlgorithmInfo = ALGORITHM,
    not_analysed: Sequence[ImageFailure] = (),
    missing_views: Sequence[str] = (),
) -> Dataset:
    series_uid, sop_uid = cad_sr_uids(STUDY_UID, algorithm, [d.SOPInstanceUID for d in sources])
    return build_cad_sr(
        study,
        sources,
        marks=_marks(study) if marks is None else marks,
        algorithm=algorithm,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=903,
        not_analysed=not_analysed,
        missing_views=missing_views,
    )


def _write_and_read(ds: Dataset, tmp_path: Path, name: str = "cad.dcm") -> tuple[Path, Dataset]:
    """Write, then read back with pydicom raising on any invalid value."""
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    before = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        reread = pydicom.dcmread(path)
        for _ in reread.iterall():  # every element decoded and validated
            pass
    finally:
        pydicom.config.settings.reading_validation_mode = before
    return path, reread


def _dciodvfy_problems(path: Path) -> list[str]:
    return [line for line in dciodvfy_output(path).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.fixture
def scored() -> tuple[list[Dataset], StudyScore]:
    return _scored_with_cams()


# --- Validity ---------------------------------------------------------------------------------------


@pytest.mark.dcmtk
@needs_dciodvfy
def test_written_cad_sr_passes_dciodvfy_without_errors_or_warnings(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    path, reread = _write_and_read(_build(study, sources), tmp_path)
    assert dciodvfy_output(path).splitlines()[0].strip() == "MammographyCADSR"
    assert _dciodvfy_problems(path) == []
    schemes = {str(e.value) for e in reread.iterall() if e.keyword == "CodingSchemeDesignator"}
    assert schemes <= STANDARD_SCHEMES, schemes
    assert "CodingSchemeIdentificationSequence" not in reread


@pytest.mark.dcmtk
@needs_dsrdump
def test_dsrdump_shows_the_tid_4000_tree(scored: tuple[list[Dataset], StudyScore], tmp_path: Path) -> None:
    sources, study = scored
    path, _ = _write_and_read(_build(study, sources), tmp_path)
    proc = subprocess.run(
        ["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    out = proc.stdout
    assert out.startswith("Mammography CAD SR Document"), out[:300]
    assert '<CONTAINER:(,,"Mammography CAD Report")=SEPARATE>  # TID 4000 (DCMR)' in out
    for concept in (
        "Image Library",
        "CAD Processing and Findings Summary",
        "Individual Impression/Recommendation",
    ):
        assert f'"{concept}"' in out
    assert "Summary of Detections" in out and "Summary of Analyses" in out
    assert '"Composite Feature")=(111099,DCM,"Selected region")' in out
    assert '"Single Image Finding")=(111099,DCM,"Selected region")' in out
    assert "(POINT," in out and "(POLYLINE," in out and "<selected from 1.2." in out
    # dcmtk checks the IOD's relationship constraints (PS3.3 Table A.35.5-2) while reading (a
    # violation is an "E:" line and a failed read); its only remark is that it skips templates.
    remarks = {line for line in proc.stderr.splitlines() if line.strip()}
    assert remarks <= {"W: Check for template constraints not yet supported"}, remarks


def test_reread_document_is_a_mammography_cad_sr_of_the_source_study(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, ds = _write_and_read(_build(study, sources), tmp_path)
    assert ds.SOPClassUID == MammographyCADSRStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.StudyInstanceUID == STUDY_UID and ds.PatientID == PATIENT_ID
    assert ds.PatientName == sources[0].PatientName and ds.AccessionNumber == sources[0].AccessionNumber
    assert ds.Modality == "SR" and ds.SeriesDescription == SERIES_DESCRIPTION
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert ds.Manufacturer == "MammoNode" and ds.DeviceSerialNumber == SHA
    assert "efficientnet_b0 0.1.0" in list(ds.SoftwareVersions)
    assert (ds.ValueType, _name(ds), ds.ContinuityOfContent) == ("CONTAINER", "111036", "SEPARATE")
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "4000")
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study_item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in sources} == set(_library(ds))
    assert ds.CompletionFlag == "COMPLETE" and "PixelData" not in ds


def test_image_library_describes_every_source_and_invents_no_view(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, ds = _write_and_read(_build(study, sources), tmp_path)
    library = _library(ds)
    expected_view = {"CC": codes.SCT.CranioCaudal, "MLO": codes.SCT.MedioLateralObliqueProjection}
    for source in sources:
        entry = library[source.SOPInstanceUID]
        assert entry.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert all(i.RelationshipType == "HAS ACQ CONTEXT" for i in entry.ContentSequence)
        side = _value(_child(entry, c.IMAGE_LATERALITY))
        assert side == {"L": "80248007", "R": "73056007"}[source.get("ImageLaterality") or source.Laterality]
        views = _children(entry, c.IMAGE_VIEW)
        if "ViewPosition" in source:
            assert [_value(v) for v in views] == [expected_view[source.ViewPosition].value]
            spacing = [
                float(_child(entry, x).MeasuredValueSequence[0].NumericValue)
                for x in (c.HORIZONTAL_PIXEL_SPACING, c.VERTICAL_PIXEL_SPACING)
            ]
            assert spacing == [0.1, 0.1]
            row = str(_child(entry, c.PATIENT_ORIENTATION_ROW).TextValue)
            column = str(_child(entry, c.PATIENT_ORIENTATION_COLUMN).TextValue)
            assert [row, column] == list(source.PatientOrientation)
        else:  # the secondary capture names no view: none is made up
            assert source.SOPClassUID == SecondaryCaptureImageStorage and views == []
            assert _children(entry, c.PATIENT_ORIENTATION_ROW) == []
        assert str(_child(entry, c.STUDY_DATE).Date) == source.StudyDate


def test_view_comes_from_the_view_code_sequence_with_legacy_codes_mapped() -> None:
    sources = _sources()
    del sources[1].ViewPosition
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "R-10226", "SRT", "medio-lateral oblique"
    modifier = Dataset()
    modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning = (
        "399055006",
        "SCT",
        "spot compression",
    )
    view.ViewModifierCodeSequence = [modifier]
    sources[1].ViewCodeSequence = [view]
    study = _study(sources, [0.1, 0.2, 0.3, 0.4])
    ds = _build(study, sources, marks={})
    entry = _library(ds)[sources[1].SOPInstanceUID]
    image_view = _child(entry, c.IMAGE_VIEW)
    assert image_view.ConceptCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert _value(image_view) == codes.SCT.MedioLateralObliqueProjection.value
    assert [_value(m) for m in _children(image_view, c.IMAGE_VIEW_MODIFIER)] == ["399055006"]


# --- Marks --------------------------------------------------------------------------------------------


def test_every_scoord_lies_on_its_referenced_source_and_the_point_on_the_cam_peak(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, ds = _write_and_read(_build(study, sources), tmp_path)
    by_uid = {s.SOPInstanceUID: s for s in sources}
    scores = {i.meta.sop_instance_uid: i for i in study.images}
    points_per_image: dict[str, int] = {}
    for finding in _findings(ds):
        for concept, graphic_type in ((c.CENTER, "POINT"), (c.OUTLINE, "POLYLINE")):
            scoord = _child(finding, concept)
            assert scoord.RelationshipType == "HAS PROPERTIES" and scoord.GraphicType == graphic_type
            uid = _image_uid(_selected_image(ds, scoord))
            assert uid in by_uid, "every SCOORD refers to a source image"
            points = np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2)
            rows, columns = by_uid[uid].Rows, by_uid[uid].Columns
            assert ((points[:, 0] >= 0) & (points[:, 0] <= columns)).all()
            assert ((points[:, 1] >= 0) & (points[:, 1] <= rows)).all()
            if graphic_type == "POLYLINE":
                assert len(points) >= 4 and (points[0] == points[-1]).all(), "a closed outline"
        uid = _finding_image(ds, finding)
        points_per_image[uid] = points_per_image.get(uid, 0) + 1
        if _rank(finding) == 1:
            column, row = np.asarray(_child(finding, c.CENTER).GraphicData, dtype=np.float64)
            on_source = cam_to_original(scores[uid].cam, scores[uid].transform)
            assert on_source[int(row), int(column)] >= 0.99 * on_source.max()
    assert points_per_image == {uid: len(m) for uid, m in _marks(study).items() if m}
    assert points_per_image[sources[0].SOPInstanceUID] == 2, "the R CC CAM has two regions"


def test_rendering_intent_and_probability_of_each_finding_follow_its_image(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, ds = _write_and_read(_build(study, sources), tmp_path)
    scores = {i.meta.sop_instance_uid: i for i in study.images}
    for finding in _findings(ds):
        image = scores[_finding_image(ds, finding)]
        assert _value(finding) == c.SELECTED_REGION.value
        assert _probability(finding) == pytest.approx(image.probability, abs=1e-9)
        intent = _value(_child(finding, c.RENDERING_INTENT))
        required = image.probability >= ALGORITHM.threshold
        assert intent == ("111150" if required else "111151")
        assert str(_child(finding, c.ALGORITHM_NAME).TextValue) == ALGORITHM.name
        assert str(_child(finding, c.ALGORITHM_VERSION).TextValue) == ALGORITHM.version
        parameters = [str(p.TextValue) for p in _children(finding, c.ALGORITHM_PARAMETERS)]
        assert f"weights_sha256={SHA}" in parameters and "threshold=0.5" in parameters


def test_composite_feature_links_the_cc_and_mlo_marks_of_one_breast(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, ds = _write_and_read(_build(study, sources), tmp_path)
    ((_, composite),) = _named(ds, c.COMPOSITE_FEATURE)
    linked = [i for i in composite.ContentSequence if _name(i) == c.SINGLE_IMAGE_FINDING.value]
    assert all(i.RelationshipType == "INFERRED FROM" for i in linked)
    assert {_finding_image(ds, f) for f in linked} == {sources[0].SOPInstanceUID, sources[1].SOPInstanceUID}
    assert {_rank(f) for f in linked} == {1}
    right = next(b for b in study.breasts if b.laterality == "R")
    assert _probability(composite) == pytest.approx(right.probability, abs=1e-9)
    assert _value(_child(composite, c.COMPOSITE_TYPE)) == c.RELATED_SPATIALLY.value
    assert _value(_child(composite, c.SCOPE_OF_FEATURE)) == c.ON_MULTIPLE_IMAGES.value
    # One Individual Impression per breast; the left one (CC + a view-less capture) has no composite.
    impressions = [i for _, i in _named(ds, c.INDIVIDUAL_IMPRESSION)]
    assert len(impressions) == 2 and all(_children(i, c.RENDERING_INTENT) for i in impressions)


def test_overall_impression_codes_the_recall_decision(tmp_path: Path) -> None:
    for recall, probabilities in ((True, (0.12, 0.64, 0.71, 0.93)), (False, (0.01, 0.02, 0.03, 0.04))):
        sources, study = _scored_with_cams(probabilities)
        study.recall_recommended = recall
        _, ds = _write_and_read(_build(study, sources), tmp_path, f"cad-{recall}.dcm")
        ((_, summary),) = _named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)
        assert _value(summary) == c.ALL_SUCCEEDED_WITH_FINDINGS.value
        assert _value(_child(summary, c.RECOMMENDED_FOLLOW_UP)) == c.follow_up(recall).value
        text = str(_child(summary, c.IMPRESSION_DESCRIPTION).TextValue)
        assert f"{study.exam_probability:.4f}" in text and RESEARCH_NOTICE in text
        assert str(_child(summary, c.ALGORITHM_NAME).TextValue) == ALGORITHM.name
        ((_, detections),) = _named(ds, c.SUMMARY_OF_DETECTIONS)
        assert _value(detections) == c.SUCCEEDED.value
        performed = _child(_child(detections, c.SUCCESSFUL_DETECTIONS), c.DETECTION_PERFORMED)
        refs = [i for i in performed.ContentSequence if "ReferencedContentItemIdentifier" in i]
        assert {_image_uid(_at(ds, [int(v) for v in r.ReferencedContentItemIdentifier])) for r in refs} == {
            s.SOPInstanceUID for s in sources
        }
        ((_, analyses),) = _named(ds, c.SUMMARY_OF_ANALYSES)
        kinds = {_value(i) for i in _child(analyses, c.SUCCESSFUL_ANALYSES).ContentSequence}
        assert kinds == {c.INDIVIDUAL_ANALYSIS.value, c.OVERALL_ANALYSIS.value}


def test_no_marks_means_no_findings_and_no_notice_without_one(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.01, 0.02, 0.03, 0.04], recall=False)
    clean = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5)
    _, ds = _write_and_read(_build(study, sources, marks={}, algorithm=clean), tmp_path)
    ((_, summary),) = _named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)
    assert _value(summary) == c.ALL_SUCCEEDED_WITHOUT_FINDINGS.value
    assert _findings(ds) == [] and _named(ds, c.INDIVIDUAL_IMPRESSION) == []
    assert RESEARCH_NOTICE not in str(_child(summary, c.IMPRESSION_DESCRIPTION).TextValue)


# --- Incomplete studies ---------------------------------------------------------------------------------


@pytest.mark.dcmtk
@needs_dciodvfy
def test_a_study_with_gaps_is_partial_and_names_them(tmp_path: Path) -> None:
    sources, study = _scored_with_cams()
    broken = make_dx_mg("L", "MLO", index=7)
    failure = ImageFailure(broken.SOPInstanceUID, broken.SOPClassUID, "L", "MLO", "cannot decode pixel data")
    unseen = ImageFailure("1.2.3.999", broken.SOPClassUID, "R", "XCCL", "codec child died")
    ds = _build(study, [*sources, broken], not_analysed=[failure, unseen], missing_views=["L-MLO"])
    path, ds = _write_and_read(ds, tmp_path)
    assert _dciodvfy_problems(path) == []
    assert ds.CompletionFlag == "PARTIAL"
    assert (
        "2 image(s) not analysed" in ds.CompletionFlagDescription and "L-MLO" in ds.CompletionFlagDescription
    )
    ((_, summary),) = _named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)
    assert _value(summary) == c.NOT_ALL_SUCCEEDED_WITH_FINDINGS.value
    text = str(_child(summary, c.IMPRESSION_DESCRIPTION).TextValue)
    for needle in (broken.SOPInstanceUID, "cannot decode pixel data", "1.2.3.999", "L-MLO"):
        assert needle in text
    ((_, detections),) = _named(ds, c.SUMMARY_OF_DETECTIONS)
    assert _value(detections) == c.PARTIALLY_SUCCEEDED.value
    failed = _child(_child(detections, c.FAILED_DETECTIONS), c.DETECTION_PERFORMED)
    refs = [i for i in failed.ContentSequence if "ReferencedContentItemIdentifier" in i]
    assert [_image_uid(_at(ds, [int(v) for v in r.ReferencedContentItemIdentifier])) for r in refs] == [
        broken.SOPInstanceUID
    ], "a failed image is referenced when its header is given, else only named"
    assert broken.SOPInstanceUID in _library(ds) and "1.2.3.999" not in _library(ds)


def test_one_secondary_capture_film_is_partial_with_the_missing_views_named(tmp_path: Path) -> None:
    film = make_sc_mg("L")
    study = _study([film], [0.3])
    present = {view_key(i.meta.laterality, i.meta.view) for i in study.images}
    missing = [v for v in SCREENING_VIEWS if v not in present]
    _, ds = _write_and_read(_build(study, [film], missing_views=missing), tmp_path)
    assert ds.CompletionFlag == "PARTIAL"
    text = str(
        _child(_named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)[0][1], c.IMPRESSION_DESCRIPTION).TextValue
    )
    assert all(v in text and v in ds.CompletionFlagDescription for v in missing) and len(missing) == 4


# --- UIDs and inputs ----------------------------------------------------------------------------------


def test_cad_sr_uids_are_deterministic_and_apart_from_the_score_report() -> None:
    uids = [s.SOPInstanceUID for s in _sources()]
    first = cad_sr_uids(STUDY_UID, ALGORITHM, uids)
    assert all(is_valid_uid(u) for u in first)
    assert cad_sr_uids(STUDY_UID, ALGORITHM, list(reversed(uids))) == first
    assert set(first).isdisjoint(sr_uids(STUDY_UID, ALGORITHM, uids))
    late = cad_sr_uids(STUDY_UID, ALGORITHM, uids[:3])
    assert late[0] == first[0] and late[1] != first[1]
    assert cad_sr_uids(STUDY_UID, ALGORITHM, uids, result_version=2)[1] != first[1]
    other = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256="0" * 64, threshold=0.5)
    assert cad_sr_uids(STUDY_UID, other, uids)[1] != first[1]
    for bad in ([], ["../../x"]):
        with pytest.raises(ValueError):
            cad_sr_uids(STUDY_UID, ALGORITHM, bad)


def test_rebuilding_gives_identical_content(scored: tuple[list[Dataset], StudyScore]) -> None:
    sources, study = scored
    a, b = _build(study, sources), _build(study, sources)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.ContentSequence == b.ContentSequence


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_inconsistent_inputs_are_rejected(scored: tuple[list[Dataset], StudyScore]) -> None:
    sources, study = scored
    with pytest.raises(ValueError, match="without a source"):
        _build(study, sources[:2])
    with pytest.raises(ValueError, match="not in study"):
        _build(study, [*sources, make_dx_mg("R", "CC", study_uid="1.2.3.4", index=9)])
    with pytest.raises(ValueError, match="not scored"):
        _build(
            study,
            sources,
            marks={"1.2.3.4.5": (CamMark(1, (1.0, 1.0), ((0, 0), (1, 0), (1, 1), (0, 0)), 1.0),)},
        )
    off_image = CamMark(1, (500.0, 10.0), ((499, 9), (501, 9), (501, 11), (499, 9)), 1.0)
    with pytest.raises(ValueError, match="outside"):
        _build(study, sources, marks={sources[0].SOPInstanceUID: (off_image,)})
    with pytest.raises(ValueError, match="probability"):
        bad = _scored_with_cams()[1]
        bad.images[3].probability = 1.5
        _build(bad, sources)
    hostile = _sources()
    hostile[0].SOPInstanceUID = "../../x"
    series_uid, sop_uid = cad_sr_uids(STUDY_UID, ALGORITHM, [s.SOPInstanceUID for s in sources])
    with pytest.raises(InputError):
        build_cad_sr(
            _study(hostile, [0.1, 0.2, 0.3, 0.4]),
            hostile,
            marks={},
            algorithm=ALGORITHM,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=903,
        )


# --- Scored by the bundled demo model -------------------------------------------------------------------

LESION_TOLERANCE_CELLS = 0.5
"""How far (in CAM cells) a rank-1 point may lie outside its lesion's box. The CAM has one cell per
32 x 32 model pixels (EfficientNet's stride); half a cell is the rounding of a peak to a cell."""


def _bundled_pipeline() -> Pipeline:
    pytest.importorskip("onnxruntime")
    from inference.backends.loader import load_backend
    from inference.bundled import bundled_model_dir
    from inference.pipeline import Pipeline

    return Pipeline(load_backend("onnxruntime", bundled_model_dir()))


def _score_files(pipeline: Pipeline, files: Sequence[Path]) -> tuple[list[Dataset], StudyScore]:
    """Decode, preprocess and score as the node does; the sources are the copyable headers."""
    from inference.dicom_header import read_dataset, read_meta

    prepared = []
    for path in files:
        ds = read_dataset(path)
        prepared.append(pipeline.prepare(ds, read_meta(ds)))
    (study,) = pipeline.score(prepared)
    return [p.dataset for p in prepared], study


def _build_for(
    pipeline: Pipeline, study: StudyScore, sources: Sequence[Dataset], missing_views: Sequence[str] = ()
) -> Dataset:
    algorithm = pipeline.algorithm
    series_uid, sop_uid = cad_sr_uids(
        study.study_instance_uid, algorithm, [s.SOPInstanceUID for s in sources]
    )
    return build_cad_sr(
        study,
        sources,
        marks=_marks(study),
        algorithm=algorithm,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=903,
        missing_views=missing_views,
    )


@pytest.mark.slow
def test_the_rank_1_point_lands_on_the_synthetic_lesion(tmp_path: Path) -> None:
    from training.datasets.rsna import load_lesions
    from training.synth.synthesise import synthesise_studies

    pipeline = _bundled_pipeline()
    studies = synthesise_studies(tmp_path / "synth", seed=101)
    cancer = next(s for s in studies if s.cancer_sides)
    boxes = load_lesions(cancer.files[0].parents[2])  # ROOT/train_images/<patient>/<image>.dcm
    sources, study = _score_files(pipeline, cancer.files)
    path, ds = _write_and_read(_build_for(pipeline, study, sources), tmp_path)
    if shutil.which("dciodvfy"):
        assert _dciodvfy_problems(path) == []

    image_ids = {s.SOPInstanceUID: int(p.stem) for s, p in zip(sources, cancer.files, strict=True)}
    scores = {i.meta.sop_instance_uid: i for i in study.images}
    rank1 = {_finding_image(ds, f): f for f in _findings(ds) if _rank(f) == 1}
    lesion_images = [uid for uid, iid in image_ids.items() if boxes.get(iid)]
    assert len(lesion_images) >= 2, "the cancer breast is seen on CC and MLO"
    for uid in lesion_images:
        column, row = np.asarray(_child(rank1[uid], c.CENTER).GraphicData, dtype=np.float64)
        tolerance = LESION_TOLERANCE_CELLS * 32 / scores[uid].transform.scale
        assert any(
            b.x0 - tolerance <= column <= b.x1 + tolerance and b.y0 - tolerance <= row <= b.y1 + tolerance
            for b in boxes[image_ids[uid]]
        ), (uid, (column, row), boxes[image_ids[uid]])
        assert _value(_child(rank1[uid], c.RENDERING_INTENT)) == c.PRESENTATION_REQUIRED.value
    # The cancer breast's CC and MLO marks are one composite feature, required, with its probability.
    (side,) = cancer.cancer_sides
    breast = next(b for b in study.breasts if b.laterality == side)
    composites = [i for _, i in _named(ds, c.COMPOSITE_FEATURE)]
    linked = [
        comp
        for comp in composites
        if {_finding_image(ds, f) for f in _children(comp, c.SINGLE_IMAGE_FINDING)} == set(lesion_images)
    ]
    assert len(linked) == 1 and _probability(linked[0]) == pytest.approx(breast.probability, abs=1e-9)
    assert _value(_child(linked[0], c.RENDERING_INTENT)) == c.PRESENTATION_REQUIRED.value
    ((_, summary),) = _named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)
    assert _value(_child(summary, c.RECOMMENDED_FOLLOW_UP)) == c.follow_up(True).value
    assert study.exam_probability >= study.threshold


@pytest.mark.slow
def test_a_real_shaped_single_film_is_partial_and_names_the_missing_views(tmp_path: Path) -> None:
    from corpus import real_shaped_corpus

    pipeline = _bundled_pipeline()
    (path,) = real_shaped_corpus(tmp_path / "film", n=1)
    sources, study = _score_files(pipeline, [path])
    (film,) = sources
    assert film.SOPClassUID == SecondaryCaptureImageStorage and film.Modality == "MG"
    assert "ViewPosition" not in film and "ViewCodeSequence" not in film
    present = {view_key(i.meta.laterality, i.meta.view) for i in study.images}
    missing = [v for v in SCREENING_VIEWS if v not in present]
    assert len(missing) == 3
    out, ds = _write_and_read(_build_for(pipeline, study, sources, missing), tmp_path)
    if shutil.which("dciodvfy"):
        assert _dciodvfy_problems(out) == []
    assert ds.CompletionFlag == "PARTIAL"
    assert all(v in ds.CompletionFlagDescription for v in missing)
    ((_, summary),) = _named(ds, c.CAD_PROCESSING_AND_FINDINGS_SUMMARY)
    text = str(_child(summary, c.IMPRESSION_DESCRIPTION).TextValue)
    assert "Expected views missing from the study: " + ", ".join(missing) in text
    # The film's side and view come from its Laterality and its text (the view is not made up).
    (meta,) = [i.meta for i in study.images]
    entry = _library(ds)[film.SOPInstanceUID]
    assert _value(_child(entry, c.IMAGE_LATERALITY)) == c.SIDE_CODES[meta.laterality].value
    assert [_value(v) for v in _children(entry, c.IMAGE_VIEW)] == [c.VIEW_FOR_MAMMOGRAPHY[meta.view].value]
    for finding in _findings(ds):
        points = np.asarray(_child(finding, c.OUTLINE).GraphicData, dtype=np.float64).reshape(-1, 2)
        assert (points[:, 0] <= film.Columns).all() and (points[:, 1] <= film.Rows).all()
