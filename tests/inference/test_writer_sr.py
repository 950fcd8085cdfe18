"""Score SR: valid TID 1500, and every number can be read back with its source and its model."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept, MeasurementReport, MeasurementsAndQualitativeEvaluations
from highdicom.sr.utils import find_content_items
from mg_source_factory import PATIENT_ID, STUDY_UID, dciodvfy_errors, make_dx_mg, make_sc_mg
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.types import (
    RESEARCH_NOTICE,
    AlgorithmInfo,
    BreastScore,
    GeometricTransform,
    ImageMeta,
    ImageScore,
    StudyScore,
)
from inference.uids import is_valid_uid
from inference.writers.sr import (
    NORMAL_INTERVAL_FOLLOW_UP,
    PRIVATE_SCHEME,
    PROBABILITY_OF_CANCER,
    QUALITATIVE_EVALUATIONS,
    RECALL_FOR_IMAGING_FINDINGS,
    RECOMMENDED_FOLLOW_UP,
    THRESHOLD_VALUE,
    aggregation_method_code,
    build_score_sr,
    sr_uids,
)

SHA = "c0ffee" + "12" * 29
ALGORITHM = AlgorithmInfo(
    name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5, notice=RESEARCH_NOTICE
)
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not on PATH")

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
) -> StudyScore:
    overrides = laterality_override or {}
    images = [
        _score(ds, p, overrides.get(i)) for i, (ds, p) in enumerate(zip(sources, probabilities, strict=True))
    ]
    breasts: list[BreastScore] = []
    for side in ("R", "L", "unknown"):
        members = {s.meta.sop_instance_uid: s.probability for s in images if s.meta.laterality == side}
        if members:
            breasts.append(
                BreastScore(
                    patient_id=PATIENT_ID,
                    study_instance_uid=STUDY_UID,
                    laterality=side,
                    probability=float(np.mean(list(members.values())) * 1.05),
                    method=method,
                    image_probabilities=members,
                )
            )
    exam = max(b.probability for b in breasts)
    return StudyScore(
        patient_id=PATIENT_ID,
        study_instance_uid=STUDY_UID,
        exam_probability=exam,
        breasts=breasts,
        images=images,
        threshold=0.5,
        recall_recommended=recall,
    )


def _sources() -> list[Dataset]:
    return [
        make_dx_mg("R", "CC", index=1),
        make_dx_mg("R", "MLO", index=2),
        make_dx_mg("L", "CC", index=3),
        make_sc_mg("L"),
    ]


def _build(study: StudyScore, sources: Sequence[Dataset], algorithm: AlgorithmInfo = ALGORITHM) -> Dataset:
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


def _groups(sr: hd.sr.Comprehensive3DSR) -> dict[str, MeasurementsAndQualitativeEvaluations]:
    groups = _report(sr).get_image_measurement_groups()
    by_label = {str(g.tracking_identifier): g for g in groups}
    assert len(by_label) == len(groups), "tracking identifiers must be unique"
    return by_label


def _probability(group: MeasurementsAndQualitativeEvaluations) -> float:
    (measurement,) = group.get_measurements(name=PROBABILITY_OF_CANCER)
    assert measurement.unit == CodedConcept("1", "UCUM", "no units")
    return float(measurement.value)


def _laterality(group: MeasurementsAndQualitativeEvaluations) -> CodedConcept | None:
    (site,) = group.finding_sites
    assert site.value == codes.SCT.Breast
    return site.laterality


@pytest.fixture
def scored() -> tuple[list[Dataset], StudyScore]:
    sources = _sources()
    return sources, _study(sources, [0.12, 0.34, 0.71, 0.93])


@pytest.mark.dcmtk
@needs_dciodvfy
def test_written_sr_passes_dciodvfy(scored: tuple[list[Dataset], StudyScore], tmp_path: Path) -> None:
    sources, study = scored
    path, _ = _write_and_read(_build(study, sources), tmp_path)
    assert dciodvfy_errors(path) == []


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
    evidence = {uid for (_, _, uid, _) in sr.get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in sources}
    assert "PixelData" not in sr


def test_per_image_probabilities_and_references_read_back(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    for image in study.images:
        matches = _report(sr).get_image_measurement_groups(
            referenced_sop_instance_uid=image.meta.sop_instance_uid
        )
        per_image = [g for g in matches if str(g.tracking_identifier).startswith("Image ")]
        assert len(per_image) == 1
        group = per_image[0]
        assert _probability(group) == pytest.approx(image.probability, abs=1e-12)
        (ref,) = group.source_images
        assert ref.referenced_sop_instance_uid == image.meta.sop_instance_uid
        assert ref.referenced_sop_class_uid == image.meta.sop_class_uid
        expected = {"L": codes.SCT.Left, "R": codes.SCT.Right}[image.meta.laterality]
        assert _laterality(group) == expected
        assert group.tracking_uid is not None and is_valid_uid(str(group.tracking_uid))
    assert set(groups) >= {"Right breast", "Left breast", "Exam"}


def test_per_breast_probabilities_and_method_read_back(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    for breast in study.breasts:
        label = {"L": "Left breast", "R": "Right breast"}[breast.laterality]
        group = groups[label]
        assert _probability(group) == pytest.approx(breast.probability, abs=1e-12)
        assert group.method == aggregation_method_code("pagg")
        assert group.method is not None and group.method.scheme_designator == PRIVATE_SCHEME
        refs = {r.referenced_sop_instance_uid for r in group.source_images}
        assert refs == set(breast.image_probabilities)
    # The private scheme is declared, as PS3.3 C.12.1.1.2 asks.
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]


def test_exam_probability_threshold_and_recall_read_back(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    exam = _groups(sr)["Exam"]
    assert _probability(exam) == pytest.approx(study.exam_probability, abs=1e-12)
    (threshold,) = exam.get_measurements(name=THRESHOLD_VALUE)
    assert threshold.value == pytest.approx(0.5)
    (decision,) = exam.get_qualitative_evaluations(name=RECOMMENDED_FOLLOW_UP)
    assert decision.value == RECALL_FOR_IMAGING_FINDINGS
    assert _laterality(exam) == codes.SCT.Bilateral
    assert {r.referenced_sop_instance_uid for r in exam.source_images} == {s.SOPInstanceUID for s in sources}


def test_no_recall_is_coded_as_normal_interval_follow_up(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.01, 0.02, 0.03, 0.04], recall=False, method="mean")
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    (decision,) = groups["Exam"].get_qualitative_evaluations(name=RECOMMENDED_FOLLOW_UP)
    assert decision.value == NORMAL_INTERVAL_FOLLOW_UP
    assert groups["Left breast"].method == codes.SCT.Mean
    assert "CodingSchemeIdentificationSequence" not in sr


def test_algorithm_version_sha256_and_threshold_are_in_every_group(
    scored: tuple[list[Dataset], StudyScore], tmp_path: Path
) -> None:
    sources, study = scored
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    for group in _report(sr).get_image_measurement_groups():
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

    clean = AlgorithmInfo(name="efficientnet_b0", version="0.1.0", weights_sha256=SHA, threshold=0.5)
    _, sr2 = _write_and_read(_build(study, sources, clean), tmp_path)
    assert find_content_items(sr2.content[0], name=QUALITATIVE_EVALUATIONS) == []


def test_unknown_laterality_has_no_laterality_code(tmp_path: Path) -> None:
    sources = _sources()
    study = _study(sources, [0.2, 0.3, 0.4, 0.5], laterality_override={3: "unknown"})
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    groups = _groups(sr)
    assert _laterality(groups["Image 4: unknown side unknown view"]) is None
    assert _laterality(groups["Breast of unknown side"]) is None
    assert _laterality(groups["Left breast"]) == codes.SCT.Left


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


def test_headers_without_pixels_suffice(tmp_path: Path) -> None:
    sources = []
    for i, ds in enumerate(_sources()):
        path = tmp_path / f"src{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sources.append(pydicom.dcmread(path, stop_before_pixels=True))
    study = _study(sources, [0.1, 0.2, 0.3, 0.4])
    _, sr = _write_and_read(_build(study, sources), tmp_path)
    assert len(_report(sr).get_image_measurement_groups()) == 4 + 2 + 1
