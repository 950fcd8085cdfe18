"""Study scores as a DICOM Comprehensive 3D SR with a TID 1500 Measurement Report.

The SR is the machine-readable result: the secondary capture is for eyes, this is for software
(RIS worklists, audit, a later evaluation, an SR viewport such as OHIF's). Hence everything is
coded with standard codes (:mod:`inference.writers.sr_codes`, no private coding scheme), every
number says which image(s), which model and which weights it came from (design invariant 5), and
every decision is also stated in words (:mod:`inference.writers.sr_text`). The content tree:

* TID 1500 "Imaging Measurement Report", observer = the MammoNode algorithm as a device
  (TID 1004: name, model and version, a UID derived from the weights), procedure reported
  SCT 24623002 "Screening mammography";
* under "Imaging Measurements", one TID 1410 planar-ROI measurement group per scored image, one
  per breast and one for the exam. Every group has, besides its tracking identifier and UID,
  finding site (SCT Breast with laterality) and algorithm identification (TID 4019: name,
  version, parameters incl. weights SHA-256, threshold and aggregation), an **Image Region**
  (SCOORD, SELECTED FROM a source image): viewers such as OHIF place each group by it and fail on
  a group without one. The region is the CAM mark of rank 1 (:func:`inference.marks.cam_marks`)
  as a closed POLYLINE outline; on an image whose CAM marks nothing it is a closed POLYLINE
  along the image's border (the whole image, which is what an image-level probability measures);
* image group: NUM DCM 111047 "Probability of cancer" in UCUM ``1``, its region on its own image,
  and an IMAGE DCM 130401 "Visual explanation" referencing the image's CAM secondary capture when
  one was made;
* breast group: the selected aggregate only (one number per breast; the others stay in the
  database), its NUM INFERRED FROM every image of the breast; the aggregation as the coded
  measurement method where SCT has a code (Mean, Maximum, Median) and always as an algorithm
  parameter stating its formula (seed-003 ``pagg`` has no standard code); the region on the
  breast's highest-probability image; the decision threshold (DCM 122411 "Threshold Value"), the
  breast's decision as DCM 111053 "Recommended Follow-up" from CID 6028 (SCT 386053000
  "Evaluation procedure" = recall, DCM 111140 "Normal interval follow-up" = no recall) and a TEXT
  "Comment" saying it in words, e.g. that an image above the threshold does not recall a breast
  whose aggregate is below it;
* exam group: the exam probability (derivation SCT "Maximum" over the breasts, INFERRED FROM
  every scored image), threshold, Recommended Follow-up (CID 6028) and a Comment naming the
  breasts that decide; its region is that of the deciding breast;
* when the model carries a notice (synthetic training data), a TID 1500 "Qualitative Evaluations"
  container (UMLS C0034375) with a TEXT DCM 121106 "Comment" holding it;
* when the study is incomplete -- images that could not be analysed, expected views that never
  arrived, CAM captures that could not be made -- a "Comment" per fact in the same container naming
  the images (SOP Instance UID, side, view) and why, and the document's CompletionFlag is PARTIAL
  with a short CompletionFlagDescription. A study with one view is therefore never COMPLETE.

Every CONTAINER is SEPARATE (continuity of content), so generic renderers (``dsr2html``) print
each value with its concept name. The evidence (CurrentRequestedProcedureEvidenceSequence) lists
the scored images and the CAM captures the content references: both are instances of the study
made to satisfy its reading. UIDs are derived (design invariant 6), see :func:`sr_uids`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import highdicom
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.marks import CamMark
from inference.types import AlgorithmInfo, BreastScore, ImageFailure, ImageScore, StudyScore
from inference.uids import derive_uid, is_valid_uid
from inference.writers.common import algorithm_key, check_sources, fit, study_document_uids
from inference.writers.sr_codes import (
    BILATERAL,
    BREAST,
    COMMENT,
    LATERALITY_CODES,
    MAXIMUM,
    PROBABILITY_OF_CANCER,
    PROCEDURE_SCREENING_MAMMOGRAPHY,
    QUALITATIVE_EVALUATIONS,
    RECOMMENDED_FOLLOW_UP,
    THRESHOLD_VALUE,
    UNIT_NO_UNITS,
    VISUAL_EXPLANATION,
    aggregation_method_code,
    aggregation_parameter,
    follow_up,
)
from inference.writers.sr_text import (
    breast_label,
    breast_statement,
    completion_description,
    exam_statement,
    incompleteness_comments,
    view_label,
)

logger = logging.getLogger(__name__)

MANUFACTURER = "MammoNode"
SERIES_DESCRIPTION = "MammoNode scores SR (RESEARCH USE)"

_UID_NAMESPACE = "mammonode/score-sr/v1"
_CONTENT_VERSION = "content-2"
"""Part of the document's SOP Instance UID; bumped whenever the same inputs give other content
(2: TID 1410 groups with image regions, CID 6028 follow-up, CAM capture references), so a node
that is upgraded and resends never puts a different document under a UID PACS already holds."""
_LO_MAX = 64
_UT_MAX = 1024  # a TEXT item's value is UT; kept short enough to read


@dataclass(frozen=True)
class CaptureReference:
    """The CAM secondary capture made of one source image, as the report references it (the
    series is needed for the evidence sequence, which lists instances by study and series)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


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
    return study_document_uids(
        _UID_NAMESPACE,
        study_uid,
        algorithm,
        source_sop_uids,
        result_version,
        what="a score report",
        content=(_CONTENT_VERSION,),
    )


def _finding_site(laterality: str | None) -> FindingSite:
    """Breast with SCT laterality; an unknown side is omitted rather than guessed."""
    if laterality in LATERALITY_CODES:
        return FindingSite(anatomic_location=BREAST, laterality=LATERALITY_CODES[laterality])
    if laterality == "B":
        return FindingSite(anatomic_location=BREAST, laterality=BILATERAL)
    return FindingSite(anatomic_location=BREAST)


def _probability(
    value: float,
    *,
    method: Code | None = None,
    derivation: Code | None = None,
    inferred_from: Sequence[Dataset] = (),
) -> Measurement:
    p = float(value)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"probability must be in [0, 1], got {value}")
    return Measurement(
        name=PROBABILITY_OF_CANCER,
        value=p,
        unit=UNIT_NO_UNITS,
        method=method,
        derivation=derivation,
        referenced_images=[SourceImageForMeasurement.from_source_image(ds) for ds in inferred_from] or None,
    )


def _threshold(value: float) -> Measurement:
    return Measurement(name=THRESHOLD_VALUE, value=float(value), unit=UNIT_NO_UNITS)


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


def _check_per_image(study: StudyScore, name: str, keys: Sequence[str]) -> None:
    scored = {img.meta.sop_instance_uid for img in study.images}
    unknown = [k for k in keys if k not in scored]
    if unknown:
        raise ValueError(f"{name} given for images that were not scored: {unknown[:3]!r}")


def _check_captures(study: StudyScore, captures: Mapping[str, CaptureReference]) -> None:
    _check_per_image(study, "captures", list(captures))
    for ref in captures.values():
        uids = (ref.sop_class_uid, ref.sop_instance_uid, ref.series_instance_uid)
        if not all(is_valid_uid(u) for u in uids):
            raise ValueError(f"invalid UID in the CAM capture reference {ref!r}")


@dataclass
class _Inputs:
    """What every group builder reads: the study, its sources, marks and captures, the model."""

    study: StudyScore
    by_uid: dict[str, Dataset]
    algorithm: AlgorithmInfo
    aggregation: str
    marks: Mapping[str, Sequence[CamMark]] = field(default_factory=dict)
    captures: Mapping[str, CaptureReference] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, ...]:
        return algorithm_key(self.algorithm)

    @property
    def images(self) -> dict[str, ImageScore]:
        return {img.meta.sop_instance_uid: img for img in self.study.images}

    def tracking(self, kind: str, label: str, *parts: str) -> TrackingIdentifier:
        uid = derive_uid(_UID_NAMESPACE, f"track-{kind}", self.study.study_instance_uid, *parts, *self.key)
        return TrackingIdentifier(uid=uid, identifier=label)

    def algorithm_id(self, *extra: str) -> AlgorithmIdentification:
        algorithm = self.algorithm
        return AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=[
                f"weights_sha256={algorithm.weights_sha256}",
                f"threshold={float(algorithm.threshold)!r}",
                f"aggregation={self.aggregation}",
                *extra,
            ],
            manufacturer=MANUFACTURER,
        )

    def region(self, uid: str) -> ImageRegion:
        """The image region of a group on image ``uid``: the box around its rank-1 CAM mark, else
        the whole image, as a closed 4-corner POLYLINE.

        A box rather than the mark's outline (the CAD SR carries that): a closed rectangle is the
        region shape viewers can redraw as a measurement (OHIF 3.12 hydrates it as a rectangle
        ROI and skips a free polygon as "not rehydratable")."""
        ds = self.by_uid[uid]
        rows, columns = float(ds.Rows), float(ds.Columns)
        mark = next((m for m in self.marks.get(uid, ()) if m.rank == 1), None)
        x0, y0, x1, y1 = 0.0, 0.0, columns, rows
        if mark is not None and len(mark.outline) >= 4:
            outline = np.asarray(mark.outline, dtype=np.float64)
            x0, y0 = np.clip(outline.min(axis=0), 0.0, [columns, rows])
            x1, y1 = np.clip(outline.max(axis=0), 0.0, [columns, rows])
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        return ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=points.astype(np.float32),
            source_image=SourceImageForRegion.from_source_image(ds),
        )


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
    marks: Mapping[str, Sequence[CamMark]] | None = None,
    captures: Mapping[str, CaptureReference] | None = None,
) -> highdicom.sr.Comprehensive3DSR:
    """Build the TID 1500 score report of one study (see the module docstring for its layout).

    ``sources`` are the datasets of the scored images (headers suffice; pixels are never read);
    every ``study.images[i].meta.sop_instance_uid`` must be among them and all must belong to the
    study's patient and study. ``aggregation`` names the per-breast method the study was scored
    with; each breast group is coded with its own ``BreastScore.method`` (falling back to it).
    ``marks`` (:func:`inference.marks.cam_marks` of each scored image) and ``captures`` (the CAM
    capture made of each scored image), both keyed by source SOP Instance UID, place the groups'
    image regions and reference the captures; an image without either gets the whole-image region
    and no reference. ``not_analysed`` (images of the study that could not be scored),
    ``missing_views`` (expected views, ``L-CC`` form, that are absent) and ``captures_missing``
    (scored images without a CAM capture) are listed in the report; the first two make it PARTIAL.
    """
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} {uid!r}")
    by_uid = check_sources(study, sources, "build_score_sr")
    marks, captures = dict(marks or {}), dict(captures or {})
    _check_per_image(study, "marks", list(marks))
    _check_captures(study, captures)
    if abs(float(study.threshold) - float(algorithm.threshold)) > 1e-12:
        logger.warning(
            "study %s was decided at threshold %s but the algorithm says %s; recording both",
            study.study_instance_uid,
            study.threshold,
            algorithm.threshold,
        )
    inputs = _Inputs(study, by_uid, algorithm, aggregation, marks, captures)
    groups = [*_image_groups(inputs), *_breast_groups(inputs), _exam_group(inputs)]
    comments = ([algorithm.notice] if algorithm.notice else []) + incompleteness_comments(
        not_analysed, missing_views, captures_missing
    )
    report = _measurement_report(algorithm, groups, comments)
    _make_separate(report[0])
    complete = not (not_analysed or missing_views)
    sr = Comprehensive3DSR(
        evidence=[_evidence_header(by_uid[u]) for u in by_uid] + _capture_evidence(study, captures),
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


def _capture_evidence(study: StudyScore, captures: Mapping[str, CaptureReference]) -> list[Dataset]:
    """Minimal headers of the referenced CAM captures, for the evidence sequence."""
    headers = []
    for ref in captures.values():
        header = Dataset()
        header.StudyInstanceUID = study.study_instance_uid
        header.SeriesInstanceUID = ref.series_instance_uid
        header.SOPClassUID = ref.sop_class_uid
        header.SOPInstanceUID = ref.sop_instance_uid
        headers.append(header)
    return headers


def _make_separate(container: Dataset) -> None:
    """Set every CONTAINER of the tree to SEPARATE continuity: its items are separate statements,
    so renderers label each value with its concept name instead of running them into one text."""
    if container.get("ValueType") == "CONTAINER":
        container.ContinuityOfContent = "SEPARATE"
    for item in container.get("ContentSequence", []):
        _make_separate(item)


def _comment(text: str) -> TextContentItem:
    return TextContentItem(
        name=COMMENT, value=fit(text, _UT_MAX), relationship_type=RelationshipTypeValues.CONTAINS
    )


def _region_on_probability(group: PlanarROIMeasurementsAndQualitativeEvaluations) -> None:
    """Repeat the group's image region as an INFERRED FROM child of its probability NUM.

    TID 1410 puts the region at group level, which is enough for the standard; OHIF 3.12 (the
    viewer CI opens) builds a measurement only from a NUM that has its own SCOORD child, and
    otherwise lists nothing ("No spatial coordinates group found").
    """
    container = group[0]
    region = next(item for item in container.ContentSequence if item.ValueType == "SCOORD")
    for item in container.ContentSequence:
        names = item.get("ConceptNameCodeSequence", [])
        if item.ValueType == "NUM" and names and names[0].CodeValue == PROBABILITY_OF_CANCER.value:
            child = deepcopy(region)
            child.RelationshipType = RelationshipTypeValues.INFERRED_FROM.value
            if "ContentSequence" not in item:
                item.ContentSequence = ContentSequence(is_root=False, is_sr=True)
            item.ContentSequence.append(child)


def _image_groups(inputs: _Inputs) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One group per scored image: its probability, side, CAM region and CAM capture."""
    groups = []
    for index, image in enumerate(inputs.study.images, start=1):
        uid = image.meta.sop_instance_uid
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=inputs.tracking("image", f"Image {index}: {view_label(image)}", uid),
            referenced_region=inputs.region(uid),
            finding_sites=[_finding_site(image.meta.laterality)],
            algorithm_id=inputs.algorithm_id(),
            measurements=[_probability(image.probability)],
        )
        _region_on_probability(group)
        capture = inputs.captures.get(uid)
        if capture is not None:
            group[0].ContentSequence.append(
                ImageContentItem(
                    name=VISUAL_EXPLANATION,
                    referenced_sop_class_uid=capture.sop_class_uid,
                    referenced_sop_instance_uid=capture.sop_instance_uid,
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    return groups


def _driving_image(inputs: _Inputs, breast: BreastScore) -> str:
    """The breast's highest-probability image (the first of equals, in study order)."""
    order = {img.meta.sop_instance_uid: i for i, img in enumerate(inputs.study.images)}
    members = [u for u in breast.image_probabilities if u in order]
    if not members:
        raise ValueError(f"breast {breast.laterality} has no scored image")
    return min(members, key=lambda u: (-breast.image_probabilities[u], order[u]))


def _breast_groups(inputs: _Inputs) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One group per breast: its aggregate, threshold, decision and driving image."""
    groups = []
    for breast in inputs.study.breasts:
        method = breast.method or inputs.aggregation
        recalled = breast.probability >= float(inputs.study.threshold)
        members = [inputs.by_uid[u] for u in breast.image_probabilities if u in inputs.by_uid]
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=inputs.tracking("breast", breast_label(breast.laterality), breast.laterality),
            referenced_region=inputs.region(_driving_image(inputs, breast)),
            method=aggregation_method_code(method),
            finding_sites=[_finding_site(breast.laterality)],
            algorithm_id=inputs.algorithm_id(aggregation_parameter(method)),
            measurements=[
                _probability(breast.probability, inferred_from=members),
                _threshold(inputs.study.threshold),
            ],
            qualitative_evaluations=[
                QualitativeEvaluation(name=RECOMMENDED_FOLLOW_UP, value=follow_up(recalled))
            ],
        )
        _region_on_probability(group)
        group[0].ContentSequence.append(
            _comment(breast_statement(breast, float(inputs.study.threshold), method, inputs.images))
        )
        groups.append(group)
    return groups


def _exam_group(inputs: _Inputs) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """The exam group: exam probability, threshold, the recommended follow-up and why."""
    study = inputs.study
    sides = {b.laterality for b in study.breasts if b.laterality in LATERALITY_CODES}
    exam_side = "B" if sides == {"L", "R"} else (next(iter(sides)) if sides else None)
    deciding_breast = min(enumerate(study.breasts), key=lambda ib: (-ib[1].probability, ib[0]))[1]
    scored = [inputs.by_uid[img.meta.sop_instance_uid] for img in study.images]
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=inputs.tracking("exam", "Exam"),
        referenced_region=inputs.region(_driving_image(inputs, deciding_breast)),
        finding_sites=[_finding_site(exam_side)],
        algorithm_id=inputs.algorithm_id(),
        measurements=[
            _probability(study.exam_probability, derivation=MAXIMUM, inferred_from=scored),
            _threshold(study.threshold),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(name=RECOMMENDED_FOLLOW_UP, value=follow_up(study.recall_recommended))
        ],
    )
    _region_on_probability(group)
    group[0].ContentSequence.append(_comment(exam_statement(inputs.study)))
    return group


def _measurement_report(
    algorithm: AlgorithmInfo,
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations],
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
        container.ContentSequence = ContentSequence([_comment(text) for text in comments])
        report[0].ContentSequence.append(container)
    return report
