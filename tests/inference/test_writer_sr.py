"""Score SR: valid TID 1500, and every number can be read back with its source and its model.

Written, re-read with highdicom (strict), validated with dciodvfy, dumped with dsrdump and
rendered with dsr2html; each measurement group is placed on a source image (an SR viewport needs
that), the CAM captures are referenced and in the evidence, recall decisions are coded from one
value set (CID 6028) and stated per breast.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept, MeasurementReport, PlanarROIMeasurementsAndQualitativeEvaluations
from highdicom.sr.utils import find_content_items
from mg_source_factory import PATIENT_ID, STUDY_UID, dciodvfy_errors, dciodvfy_output, make_dx_mg, make_sc_mg
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage

from inference.marks import CamMark
from inference.types import (
    RESEARCH_NOTICE,
    SCREENING_VIEWS,
    AlgorithmInfo,
    BreastScore,
    GeometricTransform,
    ImageMeta,
    ImageScore,
    StudyScore,
    view_key,
)
from inference.uids import derive_uid, is_valid_uid
from inference.writers.sr import CaptureReference, build_score_sr, sr_uids
from inference.writers.sr_codes import (
    NORMAL_INTERVAL_FOLLOW_UP,
    PROBABILITY_OF_CANCER,
    QUALITATIVE_EVALUATIONS,
    RECALL_FOLLOW_UP,
    RECOMMENDED_FOLLOW_UP,
    THRESHOLD_VALUE,
    VISUAL_EXPLANATION,
)
from inference.writers.sr_text import distinct

SHA = "c0ffee" + "12" * 29
ALGORITHM = AlgorithmInfo(
    name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5, notice=RESEARCH_NOTICE
)
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not on PATH")
needs_dsr_tools = pytest.mark.skipif(
    shutil.which("dsrdump") is None or shutil.which("dsr2html") is None, reason="dcmtk dsr tools not on PATH"
)
STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "UMLS", "RFC5646"}  # RFC5646: highdicom's language tag

_TRANSFORM = GeometricTransform(
    original_shape=(256, 192),
    crop_box=(0, 256, 0, 192),
    flipped=False,
    scale=1.0,
    pad_top=0,
    pad_left=0,
    input_shape=(256, 192),
)


def _meta(ds: Dataset, laterality: str | None = None) -> ImageMeta:
    return ImageMeta(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        patient_id=ds.PatientID,
        laterality=laterality or ds.get("ImageLaterality") or ds.get("Laterality") or "unknown",
        view=ds.get("ViewPosition") or "unknown",
        modality="MG",
        rows=ds.Rows,
        columns=ds.Columns,
    )


def _score(ds: Dataset, p: float, laterality: str | None = None) -> ImageScore:
    return ImageScore(
        meta=_meta(ds, laterality),
        logit=float(np.log(p / (1 - p))),
        probability=p,
        cam=np.zeros((8, 6), np.float32),
        transform=_TRANSFORM,
    )


def _study(
    sources: Sequence[Dataset],
    probabilities: Sequence[float],
    *,
    recall: bool = True,
    method: str = "pagg",
    laterality_override: dict[int, str] | None = None,
    breast_probability: dict[str, float] | None = None,
    threshold: float = 0.5,
) -> StudyScore:
    overrides = laterality_override or {}
    images = [
        _score(ds, p, overrides.get(i)) for i, (ds, p) in enumerate(zip(sources, probabilities, strict=True))
    ]
    breasts: list[BreastScore] = []
    for side in ("R", "L", "unknown"):
        members = {s.meta.sop_instance_uid: s.probability for s in images if s.meta.laterality == side}
        if members:
            p = (breast_probability or {}).get(side, float(np.mean(list(members.values())) * 1.05))
            breasts.append(
                BreastScore(
                    patient_id=PATIENT_ID,
                    study_instance_uid=STUDY_UID,
                    laterality=side,
                    probability=p,
                    method=method,
                    image_probabilities=members,
                )
            )
    return StudyScore(
        patient_id=PATIENT_ID,
        study_instance_uid=STUDY_UID,
        exam_probability=max(b.probability for b in breasts),
        breasts=breasts,
        images=images,
        threshold=threshold,
        recall_recommended=recall,
    )


def _sources() -> list[Dataset]:
    return [
        make_dx_mg("R", "CC", index=1),
        make_dx_mg("R", "MLO", index=2),
        make_dx_mg("L", "CC", index=3),
        make_sc_mg("L"),
    ]


def _mark(column: float, row: float, half: float = 10.0) -> CamMark:
    outline = ((column - half, row - half), (column + half, row - half), (column + half, row + half))
    return CamMark(1, (column, row), (*outline, (column - half, row + half), outline[0]), 1.0)


def _marks(sources: Sequence[Dataset]) -> dict[str, tuple[CamMark, ...]]:
    """Rank-1 marks on all images but the last (whose CAM marks nothing)."""
    return {ds.SOPInstanceUID: (_mark(40.0 + 20 * i, 100.0 + 10 * i),) for i, ds in enumerate(sources[:-1])}


def _capture(ds: Dataset) -> CaptureReference:
    return CaptureReference(
        sop_class_uid=SecondaryCaptureImageStorage,
        sop_instance_uid=derive_uid("tests", "cam-sc", ds.SOPInstanceUID),
        series_instance_uid=derive_uid("tests", "cam-sc-series", ds.StudyInstanceUID),
    )


def _build(
    study: StudyScore,
    sources: Sequence[Dataset],
    algorithm: AlgorithmInfo = ALGORITHM,
    *,
    with_marks: bool = True,
    with_captures: bool = True,
    missing_views: Sequence[str] = (),
) -> Dataset:
    series_uid, sop_uid = sr_uids(STUDY_UID, algorithm, [d.SOPInstanceUID for d in sources])
    return build_score_sr(
        study,
        sources,
        algorithm=algorithm,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=902,
        instance_number=1,
        aggregation="pagg",
        missing_views=missing_views,
        marks=_marks(sources) if with_marks else None,
        captures={ds.SOPInstanceUID: _capture(ds) for ds in sources} if with_captures else None,
    )


def _write_and_read(sr: Dataset, tmp_path: Path) -> tuple[Path, hd.sr.Comprehensive3DSR]:
    path = tmp_path / "scores.dcm"
    sr.save_as(path, enforce_file_format=True)
    reread = hd.sr.srread(path)
    assert isinstance(reread, hd.sr.Comprehensive3DSR)
    return path, reread


def _report(sr: hd.sr.Comprehensive3DSR) -> MeasurementReport:
    content = sr.content
    assert isinstance(content, MeasurementReport), "re-read SR must parse as TID 1500"
    return content


Group = PlanarROIMeasurementsAndQualitativeEvaluations


def _groups(sr: hd.sr.Comprehensive3DSR) -> dict[str, Group]:
    report = _report(sr)
    assert report.get_image_measurement_groups() == [], "every group is a TID 1410 group with a region"
    groups = report.get_planar_roi_measurement_groups()
    by_label = {str(g.tracking_identifier): g for g in groups}
    assert len(by_label) == len(groups), "tracking identifiers must be unique"
    return by_label


def _probability(group: Group) -> float:
    (measurement,) = group.get_measurements(name=PROBABILITY_OF_CANCER)
    assert measurement.unit == CodedConcept("1", "UCUM", "no units")
    return float(measurement.value)


def _laterality(group: Group) -> CodedConcept | None:
    (site,) = group.finding_sites
    assert site.value == codes.SCT.Breast
    return site.laterality


def _region(group: Group) -> tuple[str, str, np.ndarray]:
    """(graphic type, referenced SOP Instance UID, (column, row) points) of a group's region."""
    roi = group.roi
    assert roi is not None and roi.relationship_type == hd.sr.RelationshipTypeValues.CONTAINS
    (selected_from,) = roi.ContentSequence
    assert selected_from.RelationshipType == "SELECTED FROM"
    ref = selected_from.ReferencedSOPSequence[0]
    return str(roi.GraphicType), str(ref.ReferencedSOPInstanceUID), np.asarray(roi.value).reshape(-1, 2)


def _comments(group: Group) -> list[str]:
    return [
        str(i.TextValue)
        for i in group[0].ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]


def _follow_up(group: Group) -> CodedConcept:
    (decision,) = group.get_qualitative_evaluations(name=RECOMMENDED_FOLLOW_UP)
    return decision.value


@pytest.fixture
def scored() -> tuple[list[Dataset], StudyScore]:
    sources = _sources()
    return sources, _study(sources, [0.12, 0.34, 0.71, 0.93])


# --- Validity ---------------------------------------------------------------------------------


@pytest.mark.dcmtk
@needs_dciodvfy
def test_written_sr_passes_dciodvfy_and_it_knows_every_code(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    path, _ = _write_and_read(_build(study, sources), tmp_path)
    assert dciodvfy_errors(path) == []
    warnings = [line for line in dciodvfy_output(path).splitlines() if line.startswith("Warning")]
    about_codes = [w for w in warnings if "Cod" in w or "Unrecognized" in w]
    assert about_codes == [], about_codes


def test_only_standard_coding_schemes_are_used(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    path, sr = _write_and_read(_build(study, sources), tmp_path)
    assert "CodingSchemeIdentificationSequence" not in sr
    schemes = {
        str(elem.value)
        for elem in pydicom.dcmread(path).iterall()
        if elem.keyword == "CodingSchemeDesignator"
    }
    assert schemes <= STANDARD_SCHEMES, schemes


@pytest.mark.dcmtk
@needs_dsr_tools
def test_dsrdump_shows_the_tid_1500_template(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    path, _ = _write_and_read(_build(study, sources), tmp_path)
    proc = subprocess.run(
        ["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    assert "Comprehensive 3D SR Document" in proc.stdout
    assert re.search(r"TID 1500 \(DCMR\)", proc.stdout), proc.stdout[:2000]
    assert "TID 1410 (DCMR)" in proc.stdout
    assert "Imaging Measurement Report" in proc.stdout


@pytest.mark.dcmtk
@needs_dsr_tools
def test_dsr2html_labels_every_value_with_its_concept_name(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    path, sr = _write_and_read(_build(study, sources), tmp_path)
    containers = [i for i in sr.iterall() if i.keyword == "ContinuityOfContent"]
    assert containers and {str(e.value) for e in containers} == {"SEPARATE"}
    proc = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(re.sub(r"<[^>]+>", " ", proc.stdout).split())
    shown = [float(v) for v in re.findall(r"Probability of cancer: ([0-9.]+) 1\b", text)]
    expected = [i.probability for i in study.images] + [b.probability for b in study.breasts]
    assert shown == pytest.approx([*expected, study.exam_probability]), text[:3000]
    assert text.count("Threshold Value: 0.5 1") == len(study.breasts) + 1
    assert "Recommended Follow-up: Evaluation procedure (386053000, SCT)" in text
    assert "Recommended Follow-up: Normal interval follow-up (111140, DCM)" in text
    # Each group's region, and again under its probability (OHIF builds measurements from that).
    assert text.count("Image Region: Polyline") == 2 * (len(study.images) + len(study.breasts) + 1)
    assert text.count("Visual explanation: SC image") == len(study.images)
    assert "Comment: Right breast: P(cancer)" in text


# --- References back to the sources and to the CAM captures -----------------------------------


def test_reread_sr_belongs_to_source_patient_and_study(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.PatientID == PATIENT_ID
    assert sr.PatientName == sources[0].PatientName
    assert sr.Manufacturer == "MammoNode"
    assert "RESEARCH USE" in sr.SeriesDescription
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    captures = {_capture(s).sop_instance_uid for s in sources}
    evidence = {uid for (_, _, uid, _) in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {s.SOPInstanceUID for s in sources} | captures
    assert "PertinentOtherEvidenceSequence" not in sr
    assert "PixelData" not in sr


def test_every_group_has_a_region_on_a_source_image_inside_that_image(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    by_uid = {s.SOPInstanceUID: s for s in sources}
    groups = _groups(sr)
    assert len(groups) == 4 + 2 + 1
    for label, group in groups.items():
        graphic_type, uid, points = _region(group)
        assert graphic_type == "POLYLINE", label
        assert uid in by_uid, f"{label}: region not on a source image"
        ds = by_uid[uid]
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == ds.SOPClassUID
        assert (points[:, 0] >= 0).all() and (points[:, 0] <= ds.Columns).all(), label
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= ds.Rows).all(), label
        assert np.array_equal(points[0], points[-1]), f"{label}: outline not closed"


def test_image_regions_are_the_rank_1_cam_mark_or_the_whole_image(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    marks = _marks(sources)
    for index, image in enumerate(study.images, start=1):
        uid = image.meta.sop_instance_uid
        label = next(k for k in _groups(sr) if k.startswith(f"Image {index}:"))
        _, ref, points = _region(_groups(sr)[label])
        assert ref == uid
        if uid in marks:  # the box around the rank-1 mark (here the mark is a square already)
            np.testing.assert_allclose(points, np.asarray(marks[uid][0].outline), atol=1e-3)
        else:  # no CAM mark: the border of the whole image
            rows, columns = image.meta.rows, image.meta.columns
            assert {tuple(p) for p in points} == {(0, 0), (columns, 0), (columns, rows), (0, rows)}


def test_breast_and_exam_regions_are_on_the_image_that_drives_them(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored  # R: 0.12, 0.34; L: 0.71, 0.93 (the last has no mark)
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    assert _region(groups["Right breast"])[1] == sources[1].SOPInstanceUID
    assert _region(groups["Left breast"])[1] == sources[3].SOPInstanceUID
    assert _region(groups["Exam"])[1] == sources[3].SOPInstanceUID  # the left breast decides
    np.testing.assert_allclose(_region(groups["Right breast"])[2], _region(groups["Image 2: R MLO"])[2])


def test_each_image_group_references_its_cam_capture_and_the_evidence_resolves_it(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    series_uid, sop_uid = sr_uids(STUDY_UID, ALGORITHM, [d.SOPInstanceUID for d in sources])
    captures = {ds.SOPInstanceUID: _capture(ds) for ds in sources[:3]}  # the 4th capture failed
    built = build_score_sr(
        study,
        sources,
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=902,
        instance_number=1,
        aggregation="pagg",
        captures=captures,
    )
    _, sr = _write_and_read(built, tmp_path)
    evidence = {(cls, uid): series for (_, series, uid, cls) in sr.get_evidence()}
    for index, image in enumerate(study.images, start=1):
        label = next(k for k in _groups(sr) if k.startswith(f"Image {index}:"))
        items = find_content_items(_groups(sr)[label][0], name=VISUAL_EXPLANATION)
        expected = captures.get(image.meta.sop_instance_uid)
        if expected is None:
            assert items == []
            continue
        (item,) = items
        assert item.ValueType == "IMAGE" and item.RelationshipType == "CONTAINS"
        ref = item.ReferencedSOPSequence[0]
        key = (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
        assert key == (expected.sop_class_uid, expected.sop_instance_uid)
        assert evidence[key] == expected.series_instance_uid


def test_per_image_probabilities_read_back(scored: tuple[list[Dataset], StudyScore], tmp_path: Path) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    for image in study.images:
        matches = _report(sr).get_planar_roi_measurement_groups(
            referenced_sop_instance_uid=image.meta.sop_instance_uid
        )
        (group,) = [g for g in matches if str(g.tracking_identifier).startswith("Image ")]
        assert _probability(group) == pytest.approx(image.probability, abs=1e-12)
        expected = {"L": codes.SCT.Left, "R": codes.SCT.Right}[image.meta.laterality]
        assert _laterality(group) == expected
        assert group.tracking_uid is not None and is_valid_uid(str(group.tracking_uid))


def test_per_breast_probabilities_method_and_sources_read_back(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    for breast in study.breasts:
        group = groups[{"L": "Left breast", "R": "Right breast"}[breast.laterality]]
        assert _probability(group) == pytest.approx(breast.probability, abs=1e-12)
        assert group.method is None  # pagg has no standard code: its formula is a parameter
        params = [i.TextValue for i in find_content_items(group[0], name=codes.DCM.AlgorithmParameters)]
        assert any(p.startswith("breast_aggregation=pagg: 1 - (1 - mean(p_i^2))^n") for p in params), params
        (measurement,) = group.get_measurements(name=PROBABILITY_OF_CANCER)
        refs = {r.referenced_sop_instance_uid for r in measurement.referenced_images}
        assert refs == set(breast.image_probabilities)


def test_standard_aggregations_are_coded_as_the_measurement_method(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.01, 0.02, 0.03, 0.04], recall=False, method="mean")
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    assert _groups(sr)["Left breast"].method == codes.SCT.Mean


# --- Decisions ----------------------------------------------------------------------------------


def test_exam_probability_threshold_and_recall_read_back(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    exam = _groups(sr)["Exam"]
    assert _probability(exam) == pytest.approx(study.exam_probability, abs=1e-12)
    (threshold,) = exam.get_measurements(name=THRESHOLD_VALUE)
    assert threshold.value == pytest.approx(0.5)
    assert _follow_up(exam) == RECALL_FOLLOW_UP
    assert _laterality(exam) == codes.SCT.Bilateral
    (measurement,) = exam.get_measurements(name=PROBABILITY_OF_CANCER)
    assert {r.referenced_sop_instance_uid for r in measurement.referenced_images} == {
        s.SOPInstanceUID for s in sources
    }
    (statement,) = _comments(exam)
    assert statement.startswith("Exam: recall") and "Left breast" in statement and "0.500" in statement


def test_no_recall_is_coded_as_normal_interval_follow_up(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.01, 0.02, 0.03, 0.04], recall=False, method="mean")
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    for label in ("Exam", "Left breast", "Right breast"):
        assert _follow_up(groups[label]) == NORMAL_INTERVAL_FOLLOW_UP
    (statement,) = _comments(groups["Exam"])
    assert statement.startswith("Exam: no recall") and "0.500" in statement


def test_every_recommended_follow_up_is_from_cid_6028(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    cid_6028 = {(c.value, c.scheme_designator) for c in codes.CID6028.concepts.values()}
    values = [
        (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        for item in find_content_items(sr.content[0], name=RECOMMENDED_FOLLOW_UP, recursive=True)
    ]
    assert len(values) == 1 + 2  # exam and both breasts
    assert set(values) <= cid_6028, values
    assert {(RECALL_FOLLOW_UP.value, "SCT"), (NORMAL_INTERVAL_FOLLOW_UP.value, "DCM")} <= cid_6028


def test_the_breast_decision_is_stated_when_an_image_is_above_and_its_breast_below(tmp_path: Path) -> None:
    """The review's case: image P 0.85 above threshold 0.77, its breast 0.73 (pagg) below it."""
    sources = _sources()
    study = _study(
        sources,
        [0.85, 0.10, 0.80, 0.80],
        recall=True,
        threshold=0.77,
        breast_probability={"R": 0.73, "L": 0.92},
    )
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    right, left = groups["Right breast"], groups["Left breast"]
    assert _follow_up(right) == NORMAL_INTERVAL_FOLLOW_UP and _follow_up(left) == RECALL_FOLLOW_UP
    (threshold,) = right.get_measurements(name=THRESHOLD_VALUE)
    assert threshold.value == pytest.approx(0.77)
    (said,) = _comments(right)
    assert "0.730" in said and "below the threshold 0.770" in said and "not recalled" in said
    assert "R CC has P 0.850" in said and "decision is made per breast" in said
    (said_left,) = _comments(left)
    assert "at or above the threshold 0.770" in said_left and ": recalled" in said_left
    (exam,) = _comments(groups["Exam"])
    assert "Left breast P 0.920" in exam and "Right breast" not in exam


def test_a_probability_just_below_the_threshold_never_prints_as_equal() -> None:
    assert distinct(0.7699, 0.77) == ("0.7699", "0.7700")
    assert distinct(0.73, 0.77) == ("0.730", "0.770")
    assert distinct(0.5, 0.5) == ("0.500", "0.500")


# --- Model identity, notice, completeness -------------------------------------------------------


def test_algorithm_version_sha256_and_threshold_are_in_every_group(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    for group in _groups(sr).values():
        root = group[0]
        names = find_content_items(root, name=codes.DCM.AlgorithmName)
        versions = find_content_items(root, name=codes.DCM.AlgorithmVersion)
        params = [item.TextValue for item in find_content_items(root, name=codes.DCM.AlgorithmParameters)]
        assert [n.TextValue for n in names] == ["efficientnet_b0"]
        assert [v.TextValue for v in versions] == ["0.1.0"]
        assert f"weights_sha256={SHA}" in params
        assert "threshold=0.5" in params
    observer = _report(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer, "the algorithm must be the device observer"
    attrs = observer[0].observer_identifying_attributes
    assert isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attrs.name == "efficientnet_b0"
    assert attrs.model_name == "efficientnet_b0 0.1.0"
    assert "efficientnet_b0 0.1.0" in list(sr.SoftwareVersions)


def test_procedure_reported_is_screening_mammography(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    procedures = find_content_items(sr.content[0], name=codes.DCM.ProcedureReported)
    assert [p.ConceptCodeSequence[0].CodeValue for p in procedures] == ["24623002"]


def test_notice_is_present_when_set_and_absent_otherwise(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    (container,) = find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    texts = [item.TextValue for item in find_content_items(container, name=codes.DCM.Comment)]
    assert texts == [RESEARCH_NOTICE]
    assert sr.CompletionFlag == "COMPLETE"

    clean = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5)
    _, sr2 = _write_and_read(_build(study, sources, clean), tmp_path)
    assert find_content_items(sr2.content[0], name=QUALITATIVE_EVALUATIONS) == []


@pytest.mark.dcmtk
@needs_dciodvfy
def test_a_single_view_film_study_is_partial_and_names_the_missing_views(tmp_path: Path) -> None:
    """The real shape of digitised film: Secondary Capture, Modality MG, no ViewPosition, one
    image per study. Its view is unknown, so none of the expected views is known to be present."""
    film = make_sc_mg("R")
    assert film.SOPClassUID == SecondaryCaptureImageStorage and film.Modality == "MG"
    assert "ViewPosition" not in film
    study = _study([film], [0.64], recall=True)
    present = {view_key(i.meta.laterality, i.meta.view) for i in study.images}
    missing = [v for v in SCREENING_VIEWS if v not in present]  # as Pipeline.outputs computes it
    path, sr = _write_and_read(_build(study, [film], missing_views=missing), tmp_path)
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.CompletionFlagDescription == "missing L-CC L-MLO R-CC R-MLO"
    (container,) = find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    texts = [str(item.TextValue) for item in find_content_items(container, name=codes.DCM.Comment)]
    (statement,) = [t for t in texts if "missing" in t]
    assert all(view in statement for view in SCREENING_VIEWS), statement
    groups = _groups(sr)
    assert set(groups) == {"Image 1: R unknown view", "Right breast", "Exam"}
    assert {_region(g)[1] for g in groups.values()} == {film.SOPInstanceUID}
    assert dciodvfy_errors(path) == []


def test_unknown_laterality_has_no_laterality_code(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.2, 0.3, 0.4, 0.5], laterality_override={3: "unknown"})
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    assert _laterality(groups["Image 4: unknown side unknown view"]) is None
    assert _laterality(groups["Breast of unknown side"]) is None
    assert _laterality(groups["Left breast"]) == codes.SCT.Left


# --- UIDs, determinism, input checks ----------------------------------------------------------


def test_sr_uids_are_deterministic() -> None:
    uids = [s.SOPInstanceUID for s in _sources()]
    first = sr_uids(STUDY_UID, ALGORITHM, uids)
    assert all(is_valid_uid(u) for u in first)
    assert sr_uids(STUDY_UID, ALGORITHM, list(reversed(uids))) == first
    other = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256="0" * 64, threshold=0.5)
    assert sr_uids(STUDY_UID, other, uids)[1] != first[1]
    late = sr_uids(STUDY_UID, ALGORITHM, uids[:3])
    assert late[0] == first[0] and late[1] != first[1]
    assert sr_uids(STUDY_UID, ALGORITHM, uids, result_version=2)[1] != first[1]
    with pytest.raises(ValueError):
        sr_uids(STUDY_UID, ALGORITHM, [])
    with pytest.raises(ValueError):
        sr_uids(STUDY_UID, ALGORITHM, ["../../x"])


def test_rebuilding_gives_identical_content(scored: tuple[list[Dataset], StudyScore]) -> None:
    sources, study = scored
    a, b = _build(study, sources), _build(study, sources)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.ContentSequence == b.ContentSequence


def test_inconsistent_inputs_are_rejected() -> None:
    sources = _sources()
    study = _study(sources, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="without a source"):
        _build(study, sources[:2])
    stranger = make_dx_mg("R", "CC", study_uid="1.2.3.4", index=9)
    with pytest.raises(ValueError, match="not in study"):
        _build(study, [*sources, stranger])
    with pytest.raises(ValueError, match="probability"):
        bad = _study(sources, [0.1, 0.2, 0.3, 0.4])
        bad.images[0].probability = 1.5
        _build(bad, sources)
    with pytest.raises(ValueError, match="not scored"):
        _build(_study(sources[:3], [0.1, 0.2, 0.3]), sources)  # marks and captures of a 4th image


def test_headers_without_pixels_suffice(tmp_path: Path) -> None:
    sources = []
    for i, ds in enumerate(_sources()):
        path = tmp_path / f"src{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sources.append(pydicom.dcmread(path, stop_before_pixels=True))
    study = _study(sources, [0.1, 0.2, 0.3, 0.4])
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    assert len(_groups(sr)) == 4 + 2 + 1


def test_without_marks_or_captures_every_group_still_has_a_region(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.1, 0.2, 0.3, 0.4])
    _, sr = _write_and_read(_build(study, sources, with_marks=False, with_captures=False), tmp_path)
    assert all(_region(g)[0] == "POLYLINE" for g in _groups(sr).values())
    assert find_content_items(sr.content[0], name=VISUAL_EXPLANATION, recursive=True) == []
    assert {uid for (_, _, uid, _) in sr.get_evidence()} == {s.SOPInstanceUID for s in sources}


def test_every_probability_carries_its_region_for_viewers(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    """OHIF turns a group into a listed measurement only when the NUM has its own SCOORD child."""
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    source_uids = {str(ds.SOPInstanceUID) for ds in sources}
    items, todo = [], list(sr.ContentSequence)
    while todo:
        item = todo.pop()
        items.append(item)
        todo.extend(item.get("ContentSequence", []))
    probabilities = [
        item
        for item in items
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111047"
    ]
    assert len(probabilities) == len(study.images) + len(study.breasts) + 1
    for num in probabilities:
        (region,) = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
        assert region.RelationshipType == "INFERRED FROM"
        (image,) = region.ContentSequence
        assert str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in source_uids
