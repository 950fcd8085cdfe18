"""Study scores as a DICOM Comprehensive 3D SR with a TID 1500 Measurement Report.

The SR is the machine-readable result: the secondary capture is for eyes, this is for software
(RIS worklists, audit, a later evaluation). Hence everything is coded where a code exists and
every number says which image(s), which model and which weights it came from (design
invariant 5). The content tree is:

* TID 1500 "Imaging Measurement Report", observer = the MammoNode algorithm as a device
  (TID 1004: name, model and version, a UID derived from the weights), procedure reported
  SCT 24623002 "Screening mammography";
* one TID 1501 measurement group per scored image: tracking identifier and UID, the source image
  reference, finding site breast with SCT laterality, algorithm identification (TID 4019: name,
  version, parameters incl. weights SHA-256, threshold, aggregation), and the NUM
  DCM 111047 "Probability of cancer" in UCUM ``1`` (a probability is dimensionless);
* one group per breast: the selected aggregate only (one unambiguous number per breast; the other
  aggregates stay in the database for evaluation), with the aggregation named as the coded
  measurement method: SCT Mean / Maximum / Median where a standard code exists, else a code of
  the private scheme ``99MAMMONODE`` (seed-003 ``pagg`` = ``PAGG``), declared in
  CodingSchemeIdentificationSequence;
* one exam group: the exam probability (derivation SCT 56851009 "Maximum" over the breasts), the
  decision threshold (DCM 122411 "Threshold Value") and the recall decision as the qualitative
  evaluation DCM 111053 "Recommended Follow-up" = DCM 111591 "Recall for imaging findings" or
  DCM 111140 "Normal interval follow-up" (both from the mammography context groups; there is no
  standard yes/no concept for "recall recommended", and these two say yes/no *and* what it means);
* when the model carries a notice (synthetic training data), a TID 1500 "Qualitative Evaluations"
  container (UMLS C0034375) with a TEXT DCM 121106 "Comment" holding it;
* when the study is incomplete -- images that could not be analysed (undecodable, a codec that
  died), expected views that never arrived, CAM captures that could not be made -- a TEXT
  "Comment" per fact in the same container naming the images (SOP Instance UID, side, view) and
  why, and the document's CompletionFlag is PARTIAL with a short CompletionFlagDescription. A
  study with one view is therefore never reported COMPLETE.

UIDs are derived (design invariant 6), see :func:`sr_uids`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from copy import deepcopy

import highdicom
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.types import AlgorithmInfo, ImageFailure, ImageScore, InputError, StudyScore
from inference.uids import derive_uid, is_valid_uid
from inference.writers.common import algorithm_key, fit

logger = logging.getLogger(__name__)

MANUFACTURER = "MammoNode"
SERIES_DESCRIPTION = "MammoNode scores SR (RESEARCH USE)"

# --- Coded concepts (see module docstring for why each was chosen) -------------------------------
PROCEDURE_SCREENING_MAMMOGRAPHY = Code("24623002", "SCT", "Screening mammography")
PROBABILITY_OF_CANCER: Code = codes.DCM.ProbabilityOfCancer  # 111047
UNIT_NO_UNITS: Code = codes.UCUM.NoUnits  # "1"
THRESHOLD_VALUE: Code = codes.DCM.ThresholdValue  # 122411
RECOMMENDED_FOLLOW_UP: Code = codes.DCM.RecommendedFollowUp  # 111053
RECALL_FOR_IMAGING_FINDINGS: Code = codes.DCM.RecallForImagingFindings  # 111591
NORMAL_INTERVAL_FOLLOW_UP: Code = codes.DCM.NormalIntervalFollowUp  # 111140
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT: Code = codes.DCM.Comment  # 121106
BREAST: Code = codes.SCT.Breast  # 76752008
LATERALITY_CODES: dict[str, Code] = {"L": codes.SCT.Left, "R": codes.SCT.Right}  # 7771000, 24028007
BILATERAL: Code = codes.SCT.Bilateral  # 51440002
MAXIMUM: Code = codes.SCT.Maximum  # 56851009

PRIVATE_SCHEME = "99MAMMONODE"
"""Private coding scheme (PS3.16 section 8: designators starting with 99) for aggregation methods
that have no standard code, i.e. the seed-003 ``pagg`` = ``1 - (1 - mean(p^2))^n``."""

_STANDARD_AGGREGATIONS: dict[str, Code] = {
    "mean": codes.SCT.Mean,
    "max": codes.SCT.Maximum,
    "maximum": codes.SCT.Maximum,
    "median": codes.SCT.Median,
}

# Methods of :mod:`inference.aggregation` without a standard code.
_PRIVATE_AGGREGATIONS: dict[str, Code] = {
    "pagg": Code("PAGG", PRIVATE_SCHEME, "Seed 003 P_agg = 1 - (1 - mean(p^2))^n"),
}

_UID_NAMESPACE = "mammonode/score-sr/v1"
_SH_MAX = 16
_LO_MAX = 64
_UT_MAX = 1024  # a TEXT item's value is UT; kept short enough to read


def sr_uids(
    study_uid: str,
    algorithm: AlgorithmInfo,
    source_sop_uids: Sequence[str],
    result_version: int = 1,
) -> tuple[str, str]:
    """Series and SOP Instance UID of the score report of a study.

    The instance UID depends on the *set* of source images (order does not matter), so a late
    arrival that changes the inputs yields a new report rather than silently replacing the old
    one; the same inputs and model always yield the same UIDs.
    """
    if not is_valid_uid(study_uid):
        raise ValueError(f"invalid Study Instance UID {study_uid!r}")
    if result_version < 1:
        raise ValueError(f"result_version must be >= 1, got {result_version}")
    uids = sorted(set(source_sop_uids))
    if not uids:
        raise ValueError("a score report needs at least one source image")
    bad = [u for u in uids if not is_valid_uid(u)]
    if bad:
        raise ValueError(f"invalid source SOP Instance UID(s): {bad[:3]!r}")
    key = algorithm_key(algorithm)
    series_uid = derive_uid(_UID_NAMESPACE, "series", study_uid, *key, str(result_version))
    sop_uid = derive_uid(_UID_NAMESPACE, "instance", study_uid, *key, str(result_version), *uids)
    return series_uid, sop_uid


def aggregation_method_code(method: str) -> Code:
    """Coded measurement method for an aggregation name (standard where one exists)."""
    name = method.strip().lower()
    if name in _STANDARD_AGGREGATIONS:
        return _STANDARD_AGGREGATIONS[name]
    if name in _PRIVATE_AGGREGATIONS:
        return _PRIVATE_AGGREGATIONS[name]
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", method.strip())[:_SH_MAX] or "unnamed"
    return Code(value, PRIVATE_SCHEME, fit(f"MammoNode aggregation {method.strip() or 'unnamed'}", _LO_MAX))


def _finding_site(laterality: str | None) -> FindingSite:
    """Breast with SCT laterality; an unknown side is omitted rather than guessed."""
    if laterality in LATERALITY_CODES:
        return FindingSite(anatomic_location=BREAST, laterality=LATERALITY_CODES[laterality])
    if laterality == "B":
        return FindingSite(anatomic_location=BREAST, laterality=BILATERAL)
    return FindingSite(anatomic_location=BREAST)


def _probability(value: float, *, method: Code | None = None, derivation: Code | None = None) -> Measurement:
    p = float(value)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"probability must be in [0, 1], got {value}")
    return Measurement(
        name=PROBABILITY_OF_CANCER, value=p, unit=UNIT_NO_UNITS, method=method, derivation=derivation
    )


_TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _evidence_header(ds: Dataset) -> Dataset:
    """A copy of a source's header without pixel or overlay data, for highdicom's evidence.

    highdicom copies the Patient and Study modules from the first evidence dataset and reads their
    Type 2 attributes by attribute access; modalities omit some of them, so missing ones are
    added empty here. Pixel data is never copied (a mammogram is tens of megabytes).
    """
    header = Dataset()
    for elem in ds:
        group = elem.tag.group
        if group >= 0x7FE0 or 0x6000 <= group <= 0x60FF:
            continue
        header.add(deepcopy(elem))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _check_sources(study: StudyScore, sources: Sequence[Dataset]) -> dict[str, Dataset]:
    if not sources:
        raise ValueError("build_score_sr needs the source image datasets")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not is_valid_uid(uid) or not is_valid_uid(str(ds.get("SOPClassUID", ""))):
            raise InputError(f"source has a missing or invalid SOP Instance/Class UID: {uid!r}")
        if str(ds.get("StudyInstanceUID", "")) != study.study_instance_uid:
            raise ValueError(f"source {uid} is not in study {study.study_instance_uid}")
        if "PatientID" in ds and str(ds.get("PatientID", "")) != study.patient_id:
            raise ValueError(f"source {uid} belongs to another patient than the study score")
        by_uid[uid] = ds
    missing = [img.meta.sop_instance_uid for img in study.images if img.meta.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"scored images without a source dataset: {missing[:3]!r}")
    return by_uid


def _image_label(index: int, image: ImageScore) -> str:
    lat = image.meta.laterality if image.meta.laterality in LATERALITY_CODES else "unknown side"
    view = image.meta.view if image.meta.view != "unknown" else "unknown view"
    return f"Image {index}: {lat} {view}"


def build_score_sr(
    study: StudyScore,
    sources: Sequence[pydicom.Dataset],
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    aggregation: str,
    not_analysed: Sequence[ImageFailure] = (),
    missing_views: Sequence[str] = (),
    captures_missing: Sequence[ImageFailure] = (),
) -> highdicom.sr.Comprehensive3DSR:
    """Build the TID 1500 score report of one study (see the module docstring for its layout).

    ``sources`` are the datasets of the scored images (headers suffice; pixels are never read);
    every ``study.images[i].meta.sop_instance_uid`` must be among them and all must belong to the
    study's patient and study. ``aggregation`` names the per-breast method the study was scored
    with; each breast group is coded with its own ``BreastScore.method`` (falling back to it).
    ``not_analysed`` (images of the study that could not be scored), ``missing_views`` (expected
    views, ``L-CC`` form, that are absent) and ``captures_missing`` (scored images without a CAM
    capture) make the report PARTIAL and are listed in it.
    """
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} {uid!r}")
    by_uid = _check_sources(study, sources)
    if abs(float(study.threshold) - float(algorithm.threshold)) > 1e-12:
        logger.warning(
            "study %s was decided at threshold %s but the algorithm says %s; recording both",
            study.study_instance_uid,
            study.threshold,
            algorithm.threshold,
        )

    algorithm_id = _algorithm_identification(algorithm, aggregation)
    key = algorithm_key(algorithm)
    breast_groups, private_codes = _breast_groups(study, by_uid, algorithm_id, key, aggregation)
    groups = [
        *_image_groups(study, by_uid, algorithm_id, key),
        *breast_groups,
        _exam_group(study, by_uid, algorithm_id, key),
    ]
    comments = ([algorithm.notice] if algorithm.notice else []) + incompleteness_comments(
        not_analysed, missing_views, captures_missing
    )
    report = _measurement_report(algorithm, groups, comments)
    complete = not (not_analysed or missing_views)

    evidence = [_evidence_header(by_uid[u]) for u in by_uid]
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=complete,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=fit(algorithm.name, _LO_MAX),
        software_versions=[
            fit(f"{algorithm.name} {algorithm.version}", _LO_MAX),
            fit(f"sha256:{algorithm.weights_sha256}", _LO_MAX - 1),  # odd total length is padded to 65
        ],
        coding_schemes=_coding_schemes(private_codes),
    )
    if not complete:
        sr.CompletionFlagDescription = fit(completion_description(not_analysed, missing_views), _LO_MAX)
    logger.debug(
        "built score SR %s for study %s: %d images, %d breasts, exam p=%.4f",
        sop_instance_uid,
        study.study_instance_uid,
        len(study.images),
        len(study.breasts),
        study.exam_probability,
    )
    return sr


def _algorithm_identification(algorithm: AlgorithmInfo, aggregation: str) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"weights_sha256={algorithm.weights_sha256}",
            f"threshold={float(algorithm.threshold)!r}",
            f"aggregation={aggregation}",
        ],
        manufacturer=MANUFACTURER,
    )


def _coding_schemes(private_codes: list[Code]) -> list[CodingSchemeIdentificationItem] | None:
    """The private coding scheme's identification, when the report uses one of its codes."""
    if not private_codes:
        return None
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="MammoNode aggregation methods",
            responsible_organization=MANUFACTURER,
        )
    ]


def _image_groups(
    study: StudyScore,
    by_uid: dict[str, pydicom.Dataset],
    algorithm_id: AlgorithmIdentification,
    key: tuple[str, ...],
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One measurement group per scored image: its probability, side and source image."""
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for index, image in enumerate(study.images, start=1):
        uid = image.meta.sop_instance_uid
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=derive_uid(_UID_NAMESPACE, "track-image", study.study_instance_uid, uid, *key),
                    identifier=_image_label(index, image),
                ),
                finding_sites=[_finding_site(image.meta.laterality)],
                algorithm_id=algorithm_id,
                measurements=[_probability(image.probability)],
                source_images=[SourceImageForMeasurementGroup.from_source_image(by_uid[uid])],
            )
        )
    return groups


def _breast_groups(
    study: StudyScore,
    by_uid: dict[str, pydicom.Dataset],
    algorithm_id: AlgorithmIdentification,
    key: tuple[str, ...],
    aggregation: str,
) -> tuple[list[MeasurementsAndQualitativeEvaluations], list[Code]]:
    """One group per breast (coded with its aggregation method), and the private codes used."""
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    private_codes: list[Code] = []
    for breast in study.breasts:
        method_code = aggregation_method_code(breast.method or aggregation)
        if method_code.scheme_designator == PRIVATE_SCHEME:
            private_codes.append(method_code)
        breast_sources = [by_uid[u] for u in breast.image_probabilities if u in by_uid]
        label = {"L": "Left breast", "R": "Right breast"}.get(breast.laterality, "Breast of unknown side")
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=derive_uid(
                        _UID_NAMESPACE, "track-breast", study.study_instance_uid, breast.laterality, *key
                    ),
                    identifier=label,
                ),
                method=method_code,
                finding_sites=[_finding_site(breast.laterality)],
                algorithm_id=algorithm_id,
                measurements=[_probability(breast.probability)],
                source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in breast_sources]
                or None,
            )
        )
    return groups, private_codes


def _exam_group(
    study: StudyScore,
    by_uid: dict[str, pydicom.Dataset],
    algorithm_id: AlgorithmIdentification,
    key: tuple[str, ...],
) -> MeasurementsAndQualitativeEvaluations:
    """The exam group: exam probability, threshold and the recommended follow-up."""
    sides = {b.laterality for b in study.breasts if b.laterality in LATERALITY_CODES}
    exam_side = "B" if sides == {"L", "R"} else (next(iter(sides)) if sides else None)
    scored = [by_uid[img.meta.sop_instance_uid] for img in study.images]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid(_UID_NAMESPACE, "track-exam", study.study_instance_uid, *key),
            identifier="Exam",
        ),
        finding_sites=[_finding_site(exam_side)],
        algorithm_id=algorithm_id,
        measurements=[
            _probability(study.exam_probability, derivation=MAXIMUM),
            Measurement(name=THRESHOLD_VALUE, value=float(study.threshold), unit=UNIT_NO_UNITS),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=RECOMMENDED_FOLLOW_UP,
                value=RECALL_FOR_IMAGING_FINDINGS if study.recall_recommended else NORMAL_INTERVAL_FOLLOW_UP,
            )
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in scored] or None,
    )


def _measurement_report(
    algorithm: AlgorithmInfo,
    groups: list[MeasurementsAndQualitativeEvaluations],
    comments: list[str],
) -> MeasurementReport:
    """TID 1500 with the device observer, the groups and any document-level comments."""
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid(
                _UID_NAMESPACE, "device", algorithm.name, algorithm.version, algorithm.weights_sha256
            ),
            name=algorithm.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_SCREENING_MAMMOGRAPHY,
        imaging_measurements=groups,
    )
    if comments:
        # TID 1500 row "Qualitative Evaluations": document-level statements (notice, gaps).
        container = ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = ContentSequence(
            [
                TextContentItem(
                    name=COMMENT, value=fit(text, _UT_MAX), relationship_type=RelationshipTypeValues.CONTAINS
                )
                for text in comments
            ]
        )
        report[0].ContentSequence.append(container)
    return report


def _image_text(failure: ImageFailure) -> str:
    side = failure.laterality if failure.laterality in LATERALITY_CODES else "unknown side"
    view = failure.view if failure.view and failure.view != "unknown" else "unknown view"
    return f"image {failure.sop_instance_uid} ({side} {view})"


def incompleteness_comments(
    not_analysed: Sequence[ImageFailure],
    missing_views: Sequence[str],
    captures_missing: Sequence[ImageFailure],
) -> list[str]:
    """The report's statements about what its scores leave out, one per fact."""
    lines = [f"Not analysed: {_image_text(f)}: {f.reason}" for f in not_analysed]
    if missing_views:
        lines.append(
            "Expected views missing from the study: "
            + ", ".join(missing_views)
            + "; breast and exam scores use only the views analysed"
        )
    lines += [f"No CAM image could be made for {_image_text(f)}: {f.reason}" for f in captures_missing]
    return lines


def completion_description(not_analysed: Sequence[ImageFailure], missing_views: Sequence[str]) -> str:
    """CompletionFlagDescription (LO) of a PARTIAL report: what is missing, in brief."""
    parts = []
    if not_analysed:
        parts.append(f"{len(not_analysed)} image(s) not analysed")
    if missing_views:
        parts.append("missing " + " ".join(missing_views))
    return "; ".join(parts)
