"""Study scores and CAM marks as a DICOM Mammography CAD SR (PS3.3 A.35.5, root TID 4000).

A mammography workstation draws CAD marks only from this SOP class
(1.2.840.10008.5.1.4.1.1.88.50); the TID 1500 report of :mod:`inference.writers.sr` is for
software. highdicom has no TID 4000 class and its SR document classes are fixed to other SOP
classes, so the document is assembled here from highdicom's generic content items
(:mod:`inference.writers.cad_tree`), codes from :mod:`inference.writers.cad_codes`. The tree is::

    CONTAINER Mammography CAD Report (TID 4000)
      HAS CONCEPT MOD  Language = en-US (TID 1204)
      CONTAINS  CONTAINER Image Library
        CONTAINS  IMAGE (TID 4020) per source image: laterality (CID 6022), view (CID 4014, left
                  out when unknown), patient orientation, study/content date and time, spacing
      CONTAINS  CODE CAD Processing and Findings Summary = CID 6047 (TID 4001)
        HAS PROPERTIES  TEXT Impression Description: exam probability, threshold, decision,
                        breast probabilities, the research notice and what is missing (TID 4002)
        HAS PROPERTIES  CODE Recommended Follow-up = Evaluation procedure | Normal interval (CID 6028)
        HAS PROPERTIES  TEXT Algorithm Name / Version / Parameters (TID 4019)
        INFERRED FROM  CONTAINER Individual Impression/Recommendation, one per breast (TID 4003)
          HAS CONCEPT MOD  Rendering Intent
          CONTAINS  CODE Composite Feature = Selected region (TID 4004/4005), when the breast has a
                    mark on a cranio-caudal and on a lateral/oblique view: the two rank-1 marks
                    (composite type "related spatially", scope "multiple images", the breast's
                    probability), each an INFERRED FROM single-image finding
          CONTAINS  CODE Single Image Finding = Selected region (TID 4006), every other mark
      CONTAINS  CODE Summary of Detections = Succeeded | Partially Succeeded (TID 4015/4017)
      CONTAINS  CODE Summary of Analyses = Succeeded (TID 4016/4018: individual and overall
                impression analyses)

A single-image finding holds its Rendering Intent (Presentation Required when the image's
probability reaches the model's threshold, else Presentation Optional), the algorithm (TID 4019),
the image's "Probability of cancer" in %, a "Selected Region Description" (the model localises
where its class-activation map peaks; it does not type the lesion, hence the standard finding
"Selected region" rather than a mass or calcification code), and its geometry (TID 4021): a
"Center" SCOORD POINT at the CAM peak and an "Outline" SCOORD POLYLINE (closed) around the region,
both in the source image's pixel space (:mod:`inference.marks`), each SELECTED FROM its image's
library entry by reference. A composite feature or individual impression is Presentation Required
when its breast's probability reaches the threshold or any finding under it is required, so a
renderer that stops at the first optional item still reaches every required mark.

The templates are non-extensible, so the research notice and the gaps (images not analysed,
expected views missing; :func:`inference.writers.sr.incompleteness_comments`) are lines of the one
Impression Description; an incomplete study is also CompletionFlag PARTIAL with a
CompletionFlagDescription. Images that could not be analysed are in the Image Library, and under
"Failed Detections", when their header is among ``sources``; else only the text names them. No
private code is used. UIDs are derived (design invariant 6), see :func:`cad_sr_uids`.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping, Sequence

from highdicom.sr import ContainerContentItem
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MammographyCADSRStorage

from inference.marks import CamMark
from inference.types import AlgorithmInfo, ImageFailure, InputError, StudyScore
from inference.uids import is_valid_uid
from inference.writers import cad_codes as c
from inference.writers import cad_tree as t
from inference.writers.common import check_sources, fit, study_document_uids
from inference.writers.sr import completion_description, incompleteness_comments

logger = logging.getLogger(__name__)

MANUFACTURER = "MammoNode"
SERIES_DESCRIPTION = "MammoNode CAD SR (RESEARCH USE)"
TEMPLATE_ROOT = "4000"
_UID_NAMESPACE = "mammonode/cad-sr/v1"
_LO_MAX = 64
_CC_VIEWS = frozenset({"CC", "XCCL", "XCCM", "FB"})
_LATERAL_VIEWS = frozenset({"MLO", "ML", "LM", "LMO", "SIO", "ISO"})
_SIDE_NAMES = {"L": "Left", "R": "Right"}


def cad_sr_uids(
    study_instance_uid: str,
    algorithm: AlgorithmInfo,
    source_uids: Sequence[str],
    result_version: int = 1,
) -> tuple[str, str]:
    """Series and SOP Instance UID of the CAD SR of a study (their own namespace, apart from the
    TID 1500 report's). The instance UID depends on the *set* of source images, so a late arrival
    gives a new document; the same inputs and model always give the same UIDs."""
    return study_document_uids(
        _UID_NAMESPACE, study_instance_uid, algorithm, source_uids, result_version, what="a CAD SR"
    )


def build_cad_sr(
    study: StudyScore,
    sources: Sequence[Dataset],
    *,
    marks: Mapping[str, Sequence[CamMark]],
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    not_analysed: Sequence[ImageFailure] = (),
    missing_views: Sequence[str] = (),
) -> Dataset:
    """Build the Mammography CAD SR of one scored study (layout in the module docstring).

    ``sources`` are the headers of the scored images (pixels are never read), optionally plus
    those of images in ``not_analysed``; all must belong to the study's patient and study.
    ``marks`` are the CAM marks (:func:`inference.marks.cam_marks`) by SOP Instance UID; an image
    without marks gets no finding. ``not_analysed`` and ``missing_views`` (``L-CC`` form) make the
    document PARTIAL and are named in it. Returns a dataset ready for ``save_as``.
    """
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} {uid!r}")
    _check_probabilities(study)
    entries = _library_entries(study, check_sources(study, sources, "build_cad_sr"), not_analysed)
    by_uid = {e.sop_instance_uid: e for e in entries}
    findings = _findings(study, marks, by_uid, algorithm.threshold)
    aggregation = next((b.method for b in study.breasts if b.method), "")
    impressions = _impressions(study, findings, algorithm, aggregation)
    scored = [by_uid[i.meta.sop_instance_uid] for i in study.images]
    failed = [e for e in entries if e.sop_instance_uid not in {s.sop_instance_uid for s in scored}]
    root = ContainerContentItem(
        name=c.MAMMOGRAPHY_CAD_REPORT, is_content_continuous=False, template_id=TEMPLATE_ROOT
    )
    t.add_children(
        root,
        [
            t.code(c.LANGUAGE_OF_CONTENT, c.ENGLISH_US, t.HAS_CONCEPT_MOD),
            t.image_library(entries),
            _overall(study, algorithm, aggregation, impressions, not_analysed, missing_views),
            t.detections_summary(scored, failed, bool(not_analysed), algorithm, aggregation),
            t.analyses_summary(scored, algorithm, aggregation),
        ],
    )
    complete = not (not_analysed or missing_views)
    ds = _document(
        root, entries, algorithm, series_instance_uid, sop_instance_uid, series_number, instance_number
    )
    ds.CompletionFlag = "COMPLETE" if complete else "PARTIAL"
    if not complete:
        ds.CompletionFlagDescription = fit(completion_description(not_analysed, missing_views), _LO_MAX)
    logger.debug(
        "built CAD SR %s for study %s: %d images, %d findings, exam p=%.4f",
        sop_instance_uid,
        study.study_instance_uid,
        len(study.images),
        len(findings),
        study.exam_probability,
    )
    return ds


def _check_probabilities(study: StudyScore) -> None:
    values = [study.exam_probability, *(b.probability for b in study.breasts)]
    values += [i.probability for i in study.images]
    if not all(math.isfinite(float(p)) and 0.0 <= float(p) <= 1.0 for p in values):
        raise ValueError("every image, breast and exam probability must be in [0, 1]")


def _library_entries(
    study: StudyScore, by_uid: dict[str, Dataset], not_analysed: Sequence[ImageFailure]
) -> list[t.LibraryEntry]:
    """The scored images in score order, then the not-analysed ones whose header was given."""
    rows = [(i.meta.sop_instance_uid, i.meta.laterality, i.meta.view) for i in study.images]
    scored = {uid for uid, _, _ in rows}
    failures = {f.sop_instance_uid: f for f in not_analysed}
    both = scored & set(failures)
    if both:
        raise ValueError(f"images both scored and not analysed: {sorted(both)[:3]!r}")
    rows += [(u, f.laterality, f.view) for u, f in failures.items() if u in by_uid]
    extra = set(by_uid) - {uid for uid, _, _ in rows}
    if extra:
        raise ValueError(f"sources neither scored nor reported as not analysed: {sorted(extra)[:3]!r}")
    return [
        t.LibraryEntry(uid, str(by_uid[uid].SOPClassUID), by_uid[uid], side, view, position)
        for position, (uid, side, view) in enumerate(rows, start=1)
    ]


def _findings(
    study: StudyScore,
    marks: Mapping[str, Sequence[CamMark]],
    by_uid: dict[str, t.LibraryEntry],
    threshold: float,
) -> list[t.Finding]:
    """One finding per mark, in score order then rank; marks must lie on their image."""
    images = {i.meta.sop_instance_uid: i for i in study.images}
    unknown = sorted(set(marks) - set(images))
    if unknown:
        raise ValueError(f"marks for images that were not scored: {unknown[:3]!r}")
    findings: list[t.Finding] = []
    for uid, image in images.items():
        image_marks = sorted(marks.get(uid, ()), key=lambda m: m.rank)
        entry = by_uid[uid]
        rows = int(entry.dataset.get("Rows", 0) or image.meta.rows)
        columns = int(entry.dataset.get("Columns", 0) or image.meta.columns)
        for mark in image_marks:
            points = [mark.center, *mark.outline]
            if not all(0.0 <= x <= columns and 0.0 <= y <= rows for x, y in points):
                raise ValueError(f"a mark of image {uid} lies outside its {columns}x{rows} pixels")
            required = float(image.probability) >= float(threshold)
            findings.append(t.Finding(image, mark, len(image_marks), entry, required))
    return findings


def _impressions(
    study: StudyScore, findings: Sequence[t.Finding], algorithm: AlgorithmInfo, aggregation: str
) -> list[Dataset]:
    """One Individual Impression/Recommendation per breast with marks (right, left, unknown)."""
    breast_p = {b.laterality: b.probability for b in study.breasts}
    impressions: list[Dataset] = []
    for side in ("R", "L", *sorted({f.image.meta.laterality for f in findings} - {"L", "R"})):
        mine = [f for f in findings if f.image.meta.laterality == side]
        if not mine:
            continue
        pair = _composite_pair(mine) if side in ("L", "R") else None
        p = breast_p.get(side)
        items: list[Dataset] = []
        if pair is not None:
            items.append(_composite(pair, p, algorithm, aggregation))
        items += [
            t.single_image_finding(f, algorithm, aggregation, t.CONTAINS)
            for f in mine
            if pair is None or all(f is not q for q in pair)
        ]
        required = any(f.required for f in mine) or (p is not None and p >= algorithm.threshold)
        container = ContainerContentItem(name=c.INDIVIDUAL_IMPRESSION, relationship_type=t.INFERRED_FROM)
        t.add_children(container, [t.rendering_intent(required), *items])
        impressions.append(container)
    return impressions


def _composite_pair(findings: Sequence[t.Finding]) -> tuple[t.Finding, t.Finding] | None:
    """The rank-1 findings of the most probable cranio-caudal and lateral/oblique image."""
    firsts = [f for f in findings if f.mark.rank == 1]
    cc = [f for f in firsts if f.image.meta.view in _CC_VIEWS]
    lateral = [f for f in firsts if f.image.meta.view in _LATERAL_VIEWS]
    if not cc or not lateral:
        return None
    return (
        max(cc, key=lambda f: f.image.probability),
        max(lateral, key=lambda f: f.image.probability),
    )


def _composite(
    pair: tuple[t.Finding, t.Finding], breast_p: float | None, algorithm: AlgorithmInfo, aggregation: str
) -> Dataset:
    """TID 4004 with its TID 4005 body: the breast's finding seen on two views."""
    required = any(f.required for f in pair) or (breast_p is not None and breast_p >= algorithm.threshold)
    item = t.code(c.COMPOSITE_FEATURE, c.SELECTED_REGION, t.CONTAINS)
    t.add_children(
        item,
        [
            t.rendering_intent(required),
            t.code(c.COMPOSITE_TYPE, c.RELATED_SPATIALLY, t.HAS_PROPERTIES),
            t.code(c.SCOPE_OF_FEATURE, c.ON_MULTIPLE_IMAGES, t.HAS_PROPERTIES),
            *t.algorithm_items(algorithm, aggregation, t.HAS_PROPERTIES),
            *([t.probability(breast_p)] if breast_p is not None else []),
            *(t.single_image_finding(f, algorithm, aggregation, t.INFERRED_FROM) for f in pair),
        ],
    )
    return item


def _overall(
    study: StudyScore,
    algorithm: AlgorithmInfo,
    aggregation: str,
    impressions: Sequence[Dataset],
    not_analysed: Sequence[ImageFailure],
    missing_views: Sequence[str],
) -> Dataset:
    """TID 4001 with its TID 4002 body: the recall decision and what the scores rest on."""
    found = bool(impressions)
    if not_analysed:
        summary = c.NOT_ALL_SUCCEEDED_WITH_FINDINGS if found else c.NOT_ALL_SUCCEEDED_WITHOUT_FINDINGS
    else:
        summary = c.ALL_SUCCEEDED_WITH_FINDINGS if found else c.ALL_SUCCEEDED_WITHOUT_FINDINGS
    item = t.code(c.CAD_PROCESSING_AND_FINDINGS_SUMMARY, summary, t.CONTAINS)
    t.add_children(
        item,
        [
            t.text(
                c.IMPRESSION_DESCRIPTION,
                _impression_text(study, algorithm, not_analysed, missing_views),
                t.HAS_PROPERTIES,
                1 << 16,
            ),
            t.code(c.RECOMMENDED_FOLLOW_UP, c.follow_up(study.recall_recommended), t.HAS_PROPERTIES),
            *t.algorithm_items(algorithm, aggregation, t.HAS_PROPERTIES),
            *impressions,
        ],
    )
    return item


def _impression_text(
    study: StudyScore,
    algorithm: AlgorithmInfo,
    not_analysed: Sequence[ImageFailure],
    missing_views: Sequence[str],
) -> str:
    """The Impression Description: one statement per line (CR LF)."""
    decision = "recall for further evaluation" if study.recall_recommended else "normal interval follow-up"
    lines = [
        f"Exam probability of cancer {study.exam_probability:.4f} (maximum over breasts), "
        f"threshold {study.threshold:.4f}: {decision}"
    ]
    for breast in study.breasts:
        side = _SIDE_NAMES.get(breast.laterality, "Unknown side")
        lines.append(f"{side} breast probability of cancer {breast.probability:.4f} ({breast.method})")
    if algorithm.notice:
        lines.append(algorithm.notice)
    lines += incompleteness_comments(not_analysed, missing_views, ())
    return "\r\n".join(lines)


_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)


def _document(
    root: Dataset,
    entries: Sequence[t.LibraryEntry],
    algorithm: AlgorithmInfo,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    """Patient and Study copied from the first source, a new SR series, equipment, SR Document
    General and Content, SOP Common."""
    first = entries[0].dataset
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MammographyCADSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    charset = first.get("SpecificCharacterSet", None)
    if charset:
        ds.SpecificCharacterSet = charset
    elif not all(str(v).isascii() for v in (algorithm.name, algorithm.version, algorithm.notice or "")):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MammographyCADSRStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = first.StudyInstanceUID
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, first.get(keyword, None) or None)
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if first.get(keyword, None) not in (None, ""):
            setattr(ds, keyword, first.get(keyword))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = fit(algorithm.name, _LO_MAX)
    ds.DeviceSerialNumber = fit(algorithm.weights_sha256, _LO_MAX)
    ds.SoftwareVersions = [
        fit(f"{algorithm.name} {algorithm.version}", _LO_MAX),
        fit(f"sha256:{algorithm.weights_sha256}", _LO_MAX - 1),
    ]
    now = datetime.datetime.now()
    ds.InstanceNumber = instance_number
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.PerformedProcedureCodeSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(entries)
    for elem in root:
        ds.add(elem)
    return ds


def _evidence(entries: Sequence[t.LibraryEntry]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference of every library image, by study and series."""
    by_series: dict[tuple[str, str], list[t.LibraryEntry]] = {}
    for entry in entries:
        key = (str(entry.dataset.StudyInstanceUID), str(entry.dataset.get("SeriesInstanceUID", "")))
        by_series.setdefault(key, []).append(entry)
    studies: dict[str, Dataset] = {}
    for (study_uid, series_uid), members in by_series.items():
        if not is_valid_uid(series_uid):
            raise InputError(f"source {members[0].sop_instance_uid} has no valid Series Instance UID")
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = [_sop_reference(e) for e in members]
        study_item = studies.setdefault(study_uid, Dataset())
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = [*study_item.get("ReferencedSeriesSequence", []), series]
    return list(studies.values())


def _sop_reference(entry: t.LibraryEntry) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = entry.sop_class_uid
    item.ReferencedSOPInstanceUID = entry.sop_instance_uid
    return item
