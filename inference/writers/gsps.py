"""CAD marks as a Grayscale Softcopy Presentation State (one object type per module, highdicom style).

For viewers that show neither a Mammography CAD SR nor colour secondary captures: a GSPS
(SOP class 1.2.840.10008.5.1.4.1.1.11.1) referencing one source image, displayed over the
original pixels, with

* layer ``CAD_MARKS``: per CAM mark (:mod:`inference.marks`) its outline as a closed POLYLINE, its
  peak as a POINT and a text label ``CAM 1`` whose anchor is the peak; all in PIXEL units,
  SCOORD convention ((0, 0) is the top left corner of the top left pixel), as the marks are;
* layer ``CAD_TEXT``: the research-use notice, the image and breast probabilities, the breast
  decision (recall / no recall at the threshold) and the model, one text box per line, stacked
  in the free strip beside the breast (the crop box of the score's transform) when there is one.

The presentation keeps the source's display (PS3.4 N.2): the Modality LUT is copied by highdicom
from the source header; the VOI is the one the model saw (:mod:`inference.voi`: the first valid
window with its VOI LUT Function, else the first VOI LUT), written as the Softcopy VOI LUT, and the
Presentation LUT Shape is INVERSE for MONOCHROME1 sources (a presentation state ignores the
Photometric Interpretation), IDENTITY otherwise. A source without any VOI (a digitised film)
gets ``display_window`` when the caller passes one, else no Softcopy VOI LUT (identity VOI).

Every coordinate lies inside the source's Columns x Rows: text boxes scale with the image (a
1 x 1 test image gets sub-pixel boxes rather than an error), mark points are clamped, and an
outline that collapses when clamped is left out; both are logged and said in a text line.

UIDs are derived, not random (design invariant 6), see :func:`gsps_uids`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
from highdicom import VOILUT, PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicGroup,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from pydicom.dataset import Dataset

from inference.marks import CamMark, Point
from inference.types import AlgorithmInfo, ImageScore, InputError
from inference.uids import derive_uid, is_valid_uid
from inference.voi import read_voi_lut, read_window
from inference.writers.common import algorithm_key, fit

logger = logging.getLogger(__name__)

MANUFACTURER = "MammoNode"
SERIES_DESCRIPTION = "MammoNode CAD marks (RESEARCH USE)"
CONTENT_LABEL = "MAMMONODE_CAD"
CONTENT_DESCRIPTION = "MammoNode CAM marks and scores - RESEARCH USE ONLY"
CONTENT_CREATOR = "MammoNode^CAD"
RESEARCH_USE_TEXT = "RESEARCH USE ONLY - not for diagnosis"
"""Shown when the model carries no notice of its own (the notice says research use already)."""
MARKS_LAYER = "CAD_MARKS"
TEXT_LAYER = "CAD_TEXT"

_UID_NAMESPACE = "mammonode/gsps/v1"
_LO_MAX = 64
_ST_MAX = 1024
_LINE_FRACTION = 1 / 40
"""Height of one text line as a fraction of the image height (about 110 pixels on a 4463-row
mammogram, so the text has the same size on screen whatever the detector)."""
_CHAR_ASPECT = 0.6
"""Width of a character over the line height, for sizing text boxes (a viewer picks the font)."""
_MARGIN_FRACTION = 0.02
_STRIP_MIN_SCALE = 0.6
"""The strip beside the breast is used for the text unless its lines would be smaller than this
fraction of the lines across the whole width: legible text over the breast (its layer can be
hidden) is better than unreadable text beside it."""
_MARK_COLOR = CIELabColor.from_rgb(255, 255, 0)  # yellow: visible on any grey level
_TEXT_COLOR = CIELabColor.from_rgb(255, 255, 255)

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in source pixels."""


def gsps_uids(
    source_sop_instance_uid: str,
    algorithm: AlgorithmInfo,
    study_instance_uid: str,
    result_version: int = 1,
    *,
    laterality: str = "unknown",
) -> tuple[str, str]:
    """Series and SOP Instance UID of the presentation state of ``source_sop_instance_uid``.

    Pass the image's ``laterality`` (``score.meta.laterality``): the presentation states of one
    study, model, result version and breast share a series, because the series carries the
    breast in its Laterality (Type 2C for a paired body part, and one value per series); images of
    unknown side share an ``unknown`` series. Each source image gets its own instance. Same inputs
    and weights give the same UIDs; any change of the algorithm
    (:func:`~inference.writers.common.algorithm_key`) or of the result version gives different ones.
    """
    if not is_valid_uid(source_sop_instance_uid):
        raise ValueError(f"invalid source SOP Instance UID {source_sop_instance_uid!r}")
    if not is_valid_uid(study_instance_uid):
        raise ValueError(f"invalid Study Instance UID {study_instance_uid!r}")
    if result_version < 1:
        raise ValueError(f"result_version must be >= 1, got {result_version}")
    key = algorithm_key(algorithm)
    side = _side(laterality) or "unknown"
    series_uid = derive_uid(_UID_NAMESPACE, "series", study_instance_uid, side, *key, str(result_version))
    sop_uid = derive_uid(
        _UID_NAMESPACE, "instance", study_instance_uid, source_sop_instance_uid, *key, str(result_version)
    )
    return series_uid, sop_uid


def _side(laterality: str) -> str | None:
    """``L`` or ``R``; anything else (``unknown``, ``B``, garbage) is ``None``."""
    side = str(laterality).strip().upper()
    return side if side in ("L", "R") else None


def recall_decision(breast_probability: float, threshold: float) -> bool:
    """Recall when the breast probability reaches the threshold (as :mod:`inference.aggregation`)."""
    return breast_probability >= threshold


def decision_text(breast_probability: float, threshold: float) -> str:
    """The breast decision as shown: ``Breast decision: RECALL (0.912 >= threshold 0.500)``."""
    if recall_decision(breast_probability, threshold):
        return f"Breast decision: RECALL ({breast_probability:.3f} >= threshold {threshold:.3f})"
    return f"Breast decision: NO RECALL ({breast_probability:.3f} < threshold {threshold:.3f})"


def build_marks_gsps(
    source: Dataset,
    score: ImageScore,
    marks: Sequence[CamMark],
    *,
    breast_probability: float,
    threshold: float,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    display_window: tuple[float, float] | None = None,
) -> Dataset:
    """A GSPS that shows ``source`` as its own VOI does, with ``marks`` and the scores drawn on it.

    ``source`` may be a header without pixel data
    (:func:`~inference.writers.common.copyable_header`): it needs its SOP, study and series UIDs,
    Rows, Columns, SamplesPerPixel 1 and PhotometricInterpretation; the VOI and Modality LUT
    attributes are used when present. ``marks`` come from :func:`inference.marks.cam_marks` on
    ``score`` (the strongest first). ``display_window`` (center, width in modality values) is used
    only for a source that carries no valid VOI of its own. Raises :class:`InputError` for an
    unusable source and ValueError for inconsistent arguments.
    """
    rows, columns = _check_source(source)
    _check_arguments(source, score, breast_probability, threshold, series_instance_uid, sop_instance_uid)
    reference = _reference_header(source)
    marks_layer = GraphicLayer(MARKS_LAYER, 1, "CAM regions of the classifier", _MARK_COLOR)
    text_layer = GraphicLayer(TEXT_LAYER, 2, "Scores, decision and notice", _TEXT_COLOR)

    drawn = _mark_annotation(reference, marks_layer, marks, rows, columns)
    lines = _text_lines(score, marks, drawn.problems, breast_probability, threshold, algorithm)
    annotations = [_text_annotation(reference, text_layer, lines, score)]
    if drawn.annotation is not None:
        annotations.insert(0, drawn.annotation)

    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[reference],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=fit(algorithm.name, _LO_MAX),
        software_versions=_software_versions(algorithm),
        device_serial_number=None,  # type: ignore[arg-type]  # a program has none; highdicom omits it
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        graphic_annotations=annotations,
        graphic_layers=[marks_layer, text_layer],
        graphic_groups=drawn.groups or None,
        content_creator_name=CONTENT_CREATOR,
        voi_lut_transformations=_voi(source, display_window),
        presentation_lut_transformation=_presentation_lut(source),
        series_description=SERIES_DESCRIPTION,
    )
    _widen_displayed_area(gsps, rows, columns)
    # General Series Laterality is Type 2C: a breast is a paired structure and a PR has no Image
    # Laterality. The series is per breast (gsps_uids); empty means the side is unknown.
    gsps.Laterality = _side(score.meta.laterality)
    logger.debug(
        "built GSPS %s for source %s (%dx%d, %d marks, model %s %s)",
        sop_instance_uid,
        source.SOPInstanceUID,
        columns,
        rows,
        len(drawn.groups),
        algorithm.name,
        algorithm.version,
    )
    return gsps


# --------------------------------------------------------------------------------------------
# Checks and the reference header
# --------------------------------------------------------------------------------------------

_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
"""Read by highdicom by attribute access; a modality (or copyable_header) may leave them out."""


def _check_source(source: Dataset) -> tuple[int, int]:
    """The source's (Rows, Columns); InputError when it cannot be referenced by a GSPS."""
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_valid_uid(str(source.get(keyword, ""))):
            raise InputError(f"source {keyword} is missing or invalid")
    try:
        rows, columns = int(source.Rows), int(source.Columns)
        samples = int(source.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError("source has no usable Rows/Columns/SamplesPerPixel") from exc
    if rows < 1 or columns < 1:
        raise InputError(f"invalid source size {rows}x{columns}")
    photometric = str(source.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"a grayscale presentation state needs a MONOCHROME source, not {photometric!r}")
    return rows, columns


def _check_arguments(
    source: Dataset,
    score: ImageScore,
    breast_probability: float,
    threshold: float,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> None:
    if score.meta.sop_instance_uid != str(source.SOPInstanceUID):
        raise ValueError("the score is not the score of this source image")
    if tuple(score.transform.original_shape) != (int(source.Rows), int(source.Columns)):
        raise ValueError(
            f"the score was computed on a {score.transform.original_shape} image, "
            f"the source is {source.Rows}x{source.Columns}"
        )
    for name, value in (
        ("probability", score.probability),
        ("breast_probability", breast_probability),
        ("threshold", threshold),
    ):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} {uid!r}")
    if series_instance_uid == str(source.SeriesInstanceUID):
        raise ValueError("the presentation state must be in a new series, not the source's series")
    if sop_instance_uid == str(source.SOPInstanceUID):
        raise ValueError("the presentation state must not reuse the source's SOP Instance UID")


def _reference_header(source: Dataset) -> Dataset:
    """What highdicom reads from the referenced image: a copy without pixel or overlay data.

    highdicom copies the Patient and Study modules, references SOP class and instance and series,
    sizes the displayed area from Rows/Columns, checks SamplesPerPixel and copies the Modality LUT
    (Rescale Slope/Intercept/Type). The VOI is handed to it explicitly (:func:`_voi`), so the VOI
    attributes are left out here: highdicom would refuse a source that has both a window and a
    VOI LUT Sequence, which the standard allows.
    """
    header = Dataset()
    for elem in source:
        group = elem.tag.group
        if group >= 0x7FE0 or 0x6000 <= group <= 0x60FF or elem.keyword in _VOI_KEYWORDS:
            continue
        header.add(deepcopy(elem))  # highdicom adds the elements it copies as they are
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    if "SamplesPerPixel" not in header:
        header.SamplesPerPixel = 1
    if ("RescaleSlope" in header) != ("RescaleIntercept" in header):
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            header.pop(keyword, None)
    return header


_VOI_KEYWORDS = frozenset(
    {"WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence"}
)


def _voi(
    source: Dataset, display_window: tuple[float, float] | None
) -> list[SoftcopyVOILUTTransformation] | None:
    """The VOI the model saw (:mod:`inference.voi`), else ``display_window``, else none."""
    window = read_window(source)
    if window is not None:
        return [
            SoftcopyVOILUTTransformation(
                window_center=window.center, window_width=window.width, voi_lut_function=window.function
            )
        ]
    lut = _first_voi_lut(source)
    if lut is not None:
        return [SoftcopyVOILUTTransformation(voi_luts=[lut])]
    if display_window is not None:
        center, width = (float(v) for v in display_window)
        if math.isfinite(center) and math.isfinite(width) and width >= 1:
            return [SoftcopyVOILUTTransformation(window_center=center, window_width=width)]
        logger.warning("ignoring invalid display window center=%s width=%s", center, width)
    return None


def _first_voi_lut(source: Dataset) -> VOILUT | None:
    """The source's first VOI LUT (:func:`inference.voi.read_voi_lut`) with 16-bit entries.

    A presentation state's LUT Descriptor allows 8 or 16 bits per entry only (dciodvfy flags the
    12 a mammography unit may write), so the entries are rescaled to 16 bits: the display is the
    same, as the Presentation LUT spans the VOI LUT's output range whatever its depth.
    """
    try:
        lut = read_voi_lut(source)
    except InputError as exc:
        logger.warning("presentation state without the source's VOI LUT: %s", exc)
        return None
    if lut is None:
        return None
    top = (1 << lut.bits) - 1
    data = np.rint(np.clip(lut.data, 0, top) * (65535.0 / top)).astype(np.uint16)
    try:
        return VOILUT(first_mapped_value=lut.first_mapped, lut_data=data)
    except (ValueError, TypeError) as exc:  # e.g. a negative first mapped value
        logger.warning("presentation state without the source's VOI LUT: %s", exc)
        return None


def _presentation_lut(source: Dataset) -> PresentationLUTTransformation:
    """INVERSE for MONOCHROME1 (minimum stored value white), IDENTITY otherwise."""
    photometric = str(source.get("PhotometricInterpretation", "")).strip().upper()
    shape = (
        PresentationLUTShapeValues.INVERSE
        if photometric == "MONOCHROME1"
        else PresentationLUTShapeValues.IDENTITY
    )
    return PresentationLUTTransformation(presentation_lut_shape=shape)


def _widen_displayed_area(gsps: Dataset, rows: int, columns: int) -> None:
    """A one-pixel-wide (or -high) image: highdicom's displayed area (1, 1)-(columns, rows) has
    coinciding corners, which the standard forbids; the area may extend beyond the image."""
    if rows > 1 and columns > 1:
        return
    (area,) = gsps.DisplayedAreaSelectionSequence
    area.DisplayedAreaBottomRightHandCorner = [max(columns, 2), max(rows, 2)]
    logger.warning("displayed area of a %d x %d image widened to 2 pixels", columns, rows)


def _software_versions(algorithm: AlgorithmInfo) -> tuple[str]:
    """Model and weights; a list, as pydicom warns on a tuple (highdicom's annotation says tuple)."""
    versions = [
        fit(f"{algorithm.name} {algorithm.version}", _LO_MAX),
        fit(f"sha256:{algorithm.weights_sha256}", _LO_MAX - 1),  # odd total length is padded to 65
    ]
    return versions  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The marks
# --------------------------------------------------------------------------------------------


@dataclass
class _DrawnMarks:
    annotation: GraphicAnnotation | None
    groups: list[GraphicGroup]
    problems: list[str]
    """What could not be drawn as computed (said in a text line)."""


def _clamp(point: Point, rows: int, columns: int) -> Point:
    return (min(max(float(point[0]), 0.0), float(columns)), min(max(float(point[1]), 0.0), float(rows)))


def _mark_annotation(
    reference: Dataset, layer: GraphicLayer, marks: Sequence[CamMark], rows: int, columns: int
) -> _DrawnMarks:
    """Outline (closed POLYLINE), peak (POINT) and label of each mark, one graphic group each."""
    objects: list[GraphicObject] = []
    labels: list[TextObject] = []
    groups: list[GraphicGroup] = []
    problems: list[str] = []
    for mark in marks:
        group = GraphicGroup(len(groups) + 1, f"CAM mark {mark.rank}", f"CAM region ranked {mark.rank}")
        groups.append(group)
        center = _clamp(mark.center, rows, columns)
        outline = [_clamp(p, rows, columns) for p in mark.outline]
        if center != (float(mark.center[0]), float(mark.center[1])) or outline != [
            (float(x), float(y)) for x, y in mark.outline
        ]:
            problems.append(f"CAM mark {mark.rank} clamped to the image")
        distinct = list(dict.fromkeys(outline))
        if len(distinct) >= 2:
            closed = [*outline, outline[0]] if outline[0] != outline[-1] else outline
            objects.append(_graphic(GraphicTypeValues.POLYLINE, closed, group))
        else:
            problems.append(f"outline of CAM mark {mark.rank} does not fit the image")
        objects.append(_graphic(GraphicTypeValues.POINT, [center], group))
        label = f"CAM {mark.rank}" + (f" ({mark.relative_activation:.0%})" if mark.rank > 1 else "")
        labels.append(
            TextObject(
                label,
                AnnotationUnitsValues.PIXEL,
                bounding_box=_label_box(label, outline or [center], rows, columns),
                anchor_point=center,
                text_justification=TextJustificationValues.LEFT,
                graphic_group=group,
            )
        )
    if problems:
        logger.warning("presentation state of %d x %d image: %s", columns, rows, "; ".join(problems))
    if not objects:
        return _DrawnMarks(None, groups, problems)
    annotation = GraphicAnnotation([reference], layer, graphic_objects=objects, text_objects=labels)
    return _DrawnMarks(annotation, groups, problems)


def _graphic(kind: GraphicTypeValues, points: Sequence[Point], group: GraphicGroup) -> GraphicObject:
    data = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return GraphicObject(kind, data, AnnotationUnitsValues.PIXEL, graphic_group=group)


def _label_box(text: str, points: Sequence[Point], rows: int, columns: int) -> Box:
    """A one-line box just above the mark's outline (below it when there is no room above)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    height = rows * _LINE_FRACTION
    width = _CHAR_ASPECT * height * len(text)
    top = min(ys) - height if min(ys) >= height else max(ys)
    return _fit_box(min(xs), top, width, height, rows, columns)


def _fit_box(left: float, top: float, width: float, height: float, rows: int, columns: int) -> Box:
    """A ``width`` x ``height`` box moved (and if need be shrunk) to lie inside the image."""
    width, height = min(width, float(columns)), min(height, float(rows))
    left = min(max(left, 0.0), columns - width)
    top = min(max(top, 0.0), rows - height)
    return (left, top, min(left + width, float(columns)), min(top + height, float(rows)))


# --------------------------------------------------------------------------------------------
# The text
# --------------------------------------------------------------------------------------------


def _text_lines(
    score: ImageScore,
    marks: Sequence[CamMark],
    problems: Sequence[str],
    breast_probability: float,
    threshold: float,
    algorithm: AlgorithmInfo,
) -> list[str]:
    """Notice first, so it is the line that survives a viewer clipping the rest."""
    side = score.meta.laterality if score.meta.laterality in ("L", "R") else "unknown side"
    view = score.meta.view if score.meta.view != "unknown" else "unknown view"
    lines = [
        algorithm.notice or RESEARCH_USE_TEXT,
        f"{side} {view}: P(malignancy) image {score.probability:.3f}, breast {breast_probability:.3f}",
        decision_text(breast_probability, threshold),
        f"Model {algorithm.name} {algorithm.version} sha256 {algorithm.weights_sha256[:12]}",
    ]
    if not marks:
        lines.append("No CAM region above mean + 1 SD on this image")
    lines.extend(f"Note: {problem}" for problem in problems)
    return lines


def _text_annotation(
    reference: Dataset, layer: GraphicLayer, lines: Sequence[str], score: ImageScore
) -> GraphicAnnotation:
    boxes = _text_boxes(int(reference.Rows), int(reference.Columns), lines, score)
    texts = [
        TextObject(
            fit(line, _ST_MAX),
            AnnotationUnitsValues.PIXEL,
            bounding_box=box,
            text_justification=TextJustificationValues.LEFT,
        )
        for line, box in zip(lines, boxes, strict=True)
    ]
    return GraphicAnnotation([reference], layer, text_objects=texts)


def _text_boxes(rows: int, columns: int, lines: Sequence[str], score: ImageScore) -> list[Box]:
    """One box per line, stacked from the top, inside the image.

    The line height is :data:`_LINE_FRACTION` of the rows, less when the longest line would not
    fit the width (at :data:`_CHAR_ASPECT`) or the lines would not fit the height. The boxes go
    into the wider free strip beside the breast (left or right of the score's crop box) unless
    that makes the text much smaller than across the whole width. A tiny image gets sub-pixel
    boxes (logged) rather than coordinates outside it.
    """
    longest = max(len(line) for line in lines)
    regions = [(0.0, float(columns))]
    strip = _free_strip(rows, columns, score)
    if strip is not None:
        regions.insert(0, strip)
    layouts = [_layout(rows, left, right, len(lines), longest) for left, right in regions]
    best = layouts[0] if layouts[0][0] >= _STRIP_MIN_SCALE * layouts[-1][0] else layouts[-1]
    line, margin, left, right = best
    if line < 1.0:
        logger.warning("image of %d x %d pixels is too small for legible annotation text", columns, rows)
    top = margin
    return [(left, top + i * line, right, top + (i + 1) * line) for i in range(len(lines))]


def _layout(
    rows: int, left: float, right: float, count: int, longest: int
) -> tuple[float, float, float, float]:
    """(line height, margin, box left, box right) for ``count`` lines between ``left`` and ``right``."""
    margin = _MARGIN_FRACTION * min(rows, right - left)
    width = right - left - 2 * margin
    line = min(rows * _LINE_FRACTION, width / (_CHAR_ASPECT * max(longest, 1)), (rows - 2 * margin) / count)
    return (line, margin, left + margin, right - margin)


def _free_strip(rows: int, columns: int, score: ImageScore) -> tuple[float, float] | None:
    """The columns left or right of the breast (the crop box), whichever is wider; None if none."""
    y0, y1, x0, x1 = score.transform.crop_box
    if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
        return None
    free_left, free_right = x0, columns - x1
    if max(free_left, free_right) <= 0:
        return None
    return (0.0, float(x0)) if free_left > free_right else (float(x1), float(columns))
