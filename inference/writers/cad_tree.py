"""Content items of the Mammography CAD SR (:mod:`inference.writers.cad_sr`): the Image Library
(TID 4020), the single-image findings with their geometry (TID 4006, TID 4021), the composite
features (TID 4004/4005), the individual impressions (TID 4003) and the summaries of detections and
analyses (TID 4015-4018).

Items are highdicom's generic content items (plain pydicom datasets underneath), except the two
kinds highdicom has no class for: an IMAGE without a concept name (an Image Library entry) and a
by-reference relationship (``ReferencedContentItemIdentifier``). Mammography CAD SR points at its
images by reference: every SCOORD is SELECTED FROM, and every detection or analysis performed
refers to, an IMAGE item of the Image Library (PS3.16 TID 4017, TID 4021).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    DateContentItem,
    NumContentItem,
    ScoordContentItem,
    TextContentItem,
    TimeContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from inference.marks import CamMark
from inference.types import AlgorithmInfo, ImageScore
from inference.writers import cad_codes as c
from inference.writers.common import fit
from inference.writers.sr_codes import aggregation_parameter

CONTAINS = "CONTAINS"
HAS_ACQ_CONTEXT = "HAS ACQ CONTEXT"
HAS_CONCEPT_MOD = "HAS CONCEPT MOD"
HAS_PROPERTIES = "HAS PROPERTIES"
INFERRED_FROM = "INFERRED FROM"
SELECTED_FROM = "SELECTED FROM"

LIBRARY_PATH = (1, 2)
"""Position of the Image Library container: the root is 1, the library is its second child (after
the language). Entry ``k`` (1-based) is therefore ``(1, 2, k)``."""

_UT_MAX = 1024
_LO_MAX = 64


@dataclass(frozen=True)
class LibraryEntry:
    """One image of the Image Library and what its entry says."""

    sop_instance_uid: str
    sop_class_uid: str
    dataset: Dataset
    laterality: str  # as read (L, R, unknown), used when the header has no laterality
    view: str  # as read (CC, MLO, ..., unknown), used when the header has no ViewCodeSequence
    position: int  # 1-based position in the library

    @property
    def path(self) -> tuple[int, ...]:
        return (*LIBRARY_PATH, self.position)


def code(name: Code, value: Code, relationship: str) -> CodeContentItem:
    return CodeContentItem(name=name, value=value, relationship_type=relationship)


def text(name: Code, value: str, relationship: str, limit: int = _UT_MAX) -> TextContentItem:
    return TextContentItem(name=name, value=fit(value, limit), relationship_type=relationship)


def by_reference(relationship: str, path: Sequence[int]) -> Dataset:
    """A by-reference relationship to the content item at ``path`` (PS3.3 C.17.3.2.5)."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ReferencedContentItemIdentifier = [int(p) for p in path]
    return item


def add_children(parent: Dataset, children: Sequence[Dataset]) -> None:
    """Append to the parent's ContentSequence as a plain pydicom sequence: highdicom's own would
    reject the items it has no class for (unnamed IMAGE, by-reference)."""
    if children:
        existing = list(parent.get("ContentSequence", []))
        Dataset.__setattr__(parent, "ContentSequence", PydicomSequence([*existing, *children]))


def algorithm_items(algorithm: AlgorithmInfo, aggregation: str, relationship: str) -> list[Dataset]:
    """TID 4019 Algorithm Identification: name, version and the parameters that change results."""
    parameters = [
        f"weights_sha256={algorithm.weights_sha256}",
        f"threshold={float(algorithm.threshold)!r}",
        *([aggregation_parameter(aggregation)] if aggregation else []),
    ]
    return [
        text(c.ALGORITHM_NAME, algorithm.name, relationship),
        text(c.ALGORITHM_VERSION, algorithm.version, relationship),
        *(text(c.ALGORITHM_PARAMETERS, p, relationship) for p in parameters),
    ]


def rendering_intent(required: bool) -> CodeContentItem:
    """DCM 111056 with CID 6034: Presentation Required or Presentation Optional."""
    value = c.PRESENTATION_REQUIRED if required else c.PRESENTATION_OPTIONAL
    return code(c.RENDERING_INTENT, value, HAS_CONCEPT_MOD)


# --- TID 4020 CAD Image Library Entry ---------------------------------------------------------------


def image_library(entries: Sequence[LibraryEntry]) -> ContainerContentItem:
    library = ContainerContentItem(name=c.IMAGE_LIBRARY, relationship_type=CONTAINS)
    add_children(library, [_library_entry(e) for e in entries])
    return library


def _library_entry(entry: LibraryEntry) -> Dataset:
    """An IMAGE item (no concept name: TID 4020 gives none) with its acquisition context."""
    item = Dataset()
    item.RelationshipType = CONTAINS
    item.ValueType = "IMAGE"
    reference = Dataset()
    reference.ReferencedSOPClassUID = entry.sop_class_uid
    reference.ReferencedSOPInstanceUID = entry.sop_instance_uid
    item.ReferencedSOPSequence = [reference]
    add_children(item, _acquisition_context(entry))
    return item


def _acquisition_context(entry: LibraryEntry) -> list[Dataset]:
    ds = entry.dataset
    items: list[Dataset] = []
    side = c.side_code(ds, entry.laterality)
    if side is not None:
        items.append(code(c.IMAGE_LATERALITY, side, HAS_ACQ_CONTEXT))
    view = c.view_code(ds, entry.view)
    if view is not None:
        view_item = code(c.IMAGE_VIEW, view, HAS_ACQ_CONTEXT)
        add_children(
            view_item, [code(c.IMAGE_VIEW_MODIFIER, m, HAS_CONCEPT_MOD) for m in c.view_modifier_codes(ds)]
        )
        items.append(view_item)
    orientation = [str(v).strip() for v in _values(ds.get("PatientOrientation", None))]
    if len(orientation) == 2 and all(orientation):
        items.append(text(c.PATIENT_ORIENTATION_ROW, orientation[0], HAS_ACQ_CONTEXT))
        items.append(text(c.PATIENT_ORIENTATION_COLUMN, orientation[1], HAS_ACQ_CONTEXT))
    items += _dates_and_times(ds)
    items += _pixel_spacing(ds)
    return items


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


def _dates_and_times(ds: Dataset) -> list[Dataset]:
    """Study and Content Date/Time, each when the image has a valid value (TID 4020 rows 7-10)."""
    items: list[Dataset] = []
    for keyword, concept in (("StudyDate", c.STUDY_DATE), ("ContentDate", c.CONTENT_DATE)):
        with contextlib.suppress(ValueError, TypeError):
            date = DA(str(ds.get(keyword, "") or "").strip())
            if date is not None:
                items.append(DateContentItem(name=concept, value=date, relationship_type=HAS_ACQ_CONTEXT))
    for keyword, concept in (("StudyTime", c.STUDY_TIME), ("ContentTime", c.CONTENT_TIME)):
        with contextlib.suppress(ValueError, TypeError):
            time = TM(str(ds.get(keyword, "") or "").strip())
            if time is not None:
                items.append(TimeContentItem(name=concept, value=time, relationship_type=HAS_ACQ_CONTEXT))
    return _in_template_order(items)


def _in_template_order(items: list[Dataset]) -> list[Dataset]:
    """Study Date, Study Time, Content Date, Content Time (TID 4020 rows 7-10 in order)."""
    order = [c.STUDY_DATE.value, c.STUDY_TIME.value, c.CONTENT_DATE.value, c.CONTENT_TIME.value]
    return sorted(items, key=lambda i: order.index(i.ConceptNameCodeSequence[0].CodeValue))


def _pixel_spacing(ds: Dataset) -> list[Dataset]:
    """Horizontal and vertical spacing in mm from ImagerPixelSpacing, else PixelSpacing (both are
    row spacing \\ column spacing, so vertical first)."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        values = _values(ds.get(keyword, None))
        try:
            vertical, horizontal = (float(v) for v in values)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if vertical > 0 and horizontal > 0 and np.isfinite([vertical, horizontal]).all():
            return [
                NumContentItem(
                    c.HORIZONTAL_PIXEL_SPACING, horizontal, c.MILLIMETER, relationship_type=HAS_ACQ_CONTEXT
                ),
                NumContentItem(
                    c.VERTICAL_PIXEL_SPACING, vertical, c.MILLIMETER, relationship_type=HAS_ACQ_CONTEXT
                ),
            ]
    return []


# --- TID 4006 Single Image Finding, TID 4021 Geometry -------------------------------------------------


@dataclass(frozen=True, eq=False)
class Finding:
    """One CAM mark of one scored image, placed in the content tree."""

    image: ImageScore
    mark: CamMark
    marks_on_image: int
    entry: LibraryEntry
    required: bool  # Rendering Intent: the image's probability reaches the model's threshold


def single_image_finding(
    finding: Finding, algorithm: AlgorithmInfo, aggregation: str, relationship: str
) -> CodeContentItem:
    """A "Selected region" finding at the mark: intent, algorithm, probability, description, and a
    center POINT and outline POLYLINE, each SELECTED FROM the image's library entry."""
    mark = finding.mark
    item = code(c.SINGLE_IMAGE_FINDING, c.SELECTED_REGION, relationship)
    description = (
        f"Region {mark.rank} of {finding.marks_on_image} where the model's class-activation map "
        f"(CAM) is highest on this image (peak {mark.relative_activation:.2f} of the image's "
        f"strongest); the probability is the image's"
    )
    children = [
        rendering_intent(finding.required),
        *algorithm_items(algorithm, aggregation, HAS_CONCEPT_MOD),
        probability(finding.image.probability),
        text(c.SELECTED_REGION_DESCRIPTION, description, HAS_PROPERTIES),
        _scoord(c.CENTER, "POINT", [mark.center], finding.entry),
        _scoord(c.OUTLINE, "POLYLINE", list(mark.outline), finding.entry),
    ]
    add_children(item, children)
    return item


def probability(p: float) -> NumContentItem:
    """DCM 111047 "Probability of cancer" in UCUM % (0-100), as TID 4005 and TID 4006 require."""
    value = float(p)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return NumContentItem(c.PROBABILITY_OF_CANCER, 100.0 * value, c.PERCENT, relationship_type=HAS_PROPERTIES)


def _scoord(name: Code, graphic_type: str, points: list[tuple[float, float]], entry: LibraryEntry) -> Dataset:
    item = ScoordContentItem(
        name=name,
        graphic_type=graphic_type,
        graphic_data=np.asarray(points, dtype=np.float64),
        relationship_type=HAS_PROPERTIES,
    )
    add_children(item, [by_reference(SELECTED_FROM, entry.path)])
    return item


# --- TID 4015-4018 Summaries of detections and analyses ----------------------------------------------


def detections_summary(
    analysed: Sequence[LibraryEntry],
    failed: Sequence[LibraryEntry],
    any_failed: bool,
    algorithm: AlgorithmInfo,
    aggregation: str,
) -> CodeContentItem:
    """Summary of Detections: Succeeded, or Partially Succeeded when images could not be analysed,
    with the detection performed (a "Selected region" detector) on the images it ran on and, for
    failed images that the library holds, the ones it failed on."""
    summary = code(c.SUMMARY_OF_DETECTIONS, c.PARTIALLY_SUCCEEDED if any_failed else c.SUCCEEDED, CONTAINS)
    groups = [(c.SUCCESSFUL_DETECTIONS, analysed), (c.FAILED_DETECTIONS, failed)]
    containers = []
    for name, entries in groups:
        if not entries:
            continue
        container = ContainerContentItem(name=name, relationship_type=INFERRED_FROM)
        add_children(
            container,
            [_performed(c.DETECTION_PERFORMED, c.SELECTED_REGION, entries, algorithm, aggregation)],
        )
        containers.append(container)
    add_children(summary, containers)
    return summary


def analyses_summary(
    analysed: Sequence[LibraryEntry], algorithm: AlgorithmInfo, aggregation: str
) -> CodeContentItem:
    """Summary of Analyses: the per-breast (individual) and per-exam (overall) impression analyses
    (CID 6043) over the analysed images."""
    summary = code(c.SUMMARY_OF_ANALYSES, c.SUCCEEDED, CONTAINS)
    container = ContainerContentItem(name=c.SUCCESSFUL_ANALYSES, relationship_type=INFERRED_FROM)
    add_children(
        container,
        [
            _performed(c.ANALYSIS_PERFORMED, kind, analysed, algorithm, aggregation)
            for kind in (c.INDIVIDUAL_ANALYSIS, c.OVERALL_ANALYSIS)
        ],
    )
    add_children(summary, [container])
    return summary


def _performed(
    name: Code, value: Code, entries: Sequence[LibraryEntry], algorithm: AlgorithmInfo, aggregation: str
) -> CodeContentItem:
    """TID 4017 / TID 4018: what was done, by which algorithm, on which library images."""
    item = code(name, value, CONTAINS)
    add_children(
        item,
        [
            *algorithm_items(algorithm, aggregation, HAS_CONCEPT_MOD),
            *(by_reference(HAS_PROPERTIES, e.path) for e in entries),
        ],
    )
    return item


__all__ = [
    "LIBRARY_PATH",
    "Finding",
    "LibraryEntry",
    "add_children",
    "algorithm_items",
    "analyses_summary",
    "by_reference",
    "code",
    "detections_summary",
    "image_library",
    "probability",
    "rendering_intent",
    "single_image_finding",
    "text",
]
