"""Result objects made in the pixel pool's child processes: one task per CAM capture, one per report.

Rendering a CAM over a mammogram and encoding it (RLE) is pixel work done by C extensions, and so
is encoding the report's evidence; design invariant 8 puts all of it in child processes, where a
codec that aborts takes only the one object it held. Tasks and results are plain picklable data:
the source header (no pixel data), the downscaled display image, the image's score with its CAM,
and back the encoded Part 10 bytes. The parent only writes bytes to disk.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.cam import cam_to_original
from inference.manifest import ModelManifest
from inference.marks import CamMark
from inference.overlay import DEFAULT_LEGEND, ChestWall, grey_levels, render_cam_overlay
from inference.pyramid import MAX_LEVEL
from inference.reduced_decode import SourceLevels
from inference.types import AlgorithmInfo, ImageFailure, ImageScore, StudyScore
from inference.voi import FallbackMethod, apply_voi
from inference.writers.sc import build_cam_sc
from inference.writers.sr import CaptureReference, build_score_sr

DISPLAY_MAX = 2048
"""Longest side of the display copy kept of each source: the CAM capture is drawn at most this
large, so a decoded 4700x2900 mammogram (54 MB as float32) need not travel between processes."""


def display_factor(rows: int, columns: int) -> int:
    """The smallest integer factor that brings the longest side to :data:`DISPLAY_MAX` or below
    (1: the image is kept as it is)."""
    return max(1, math.ceil(max(rows, columns) / DISPLAY_MAX))


def display_level(rows: int, columns: int) -> tuple[int, int]:
    """Where the display copy comes from: pyramid level ``r`` (:mod:`inference.pyramid`) and the
    factor still to :func:`shrink` it by, with ``2^r * factor`` = :func:`display_factor` (the
    level takes the largest power of two the factor has: a 3328-row image is shown from level 1,
    a 4500-row one, factor 3, from the source)."""
    factor = display_factor(rows, columns)
    r = 0
    while factor % 2 == 0 and r < MAX_LEVEL:
        factor //= 2
        r += 1
    return r, factor


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks: ``(rows // factor, columns // factor)`` as float32.

    The last ``rows % factor`` rows and ``columns % factor`` columns (fewer than ``factor``
    source pixels, at the bottom and right edges) are left out rather than stretched in, so output
    pixel ``(i, j)`` covers exactly source pixels ``[i f, (i + 1) f) x [j f, (j + 1) f)`` and the
    pixel spacing of the result is exactly ``factor`` times the source's. A side shorter than
    ``factor`` becomes one pixel (and is then not an exact downscale; callers check the shape).
    """
    arr = np.asarray(image, dtype=np.float32)
    if factor <= 1:
        return arr
    h, w = max(1, arr.shape[0] // factor), max(1, arr.shape[1] // factor)
    block = arr[: h * factor, : w * factor]
    return np.asarray(cv2.resize(block, (w, h), interpolation=cv2.INTER_AREA), dtype=np.float32)


def display_image(windowed: np.ndarray) -> np.ndarray:
    """The display copy of a windowed source (values in [0, 1]): shrunk by :func:`display_factor`
    (:func:`shrink`: exact block averages) and kept as the capture's 8-bit grey levels
    (:func:`inference.overlay.grey_levels`), which is all the capture shows."""
    image = np.asarray(windowed, dtype=np.float32)
    return grey_levels(shrink(image, display_factor(image.shape[0], image.shape[1])))


def display_copy(source: SourceLevels, ds: Dataset, *, fallback: FallbackMethod) -> np.ndarray:
    """The capture's display copy of a source (:func:`display_image`), from its display level
    (:func:`display_level`) windowed as the model's input is (:func:`inference.voi.apply_voi`)."""
    level, factor = display_level(source.rows, source.columns)
    return display_image(shrink(apply_voi(source.modality(level), ds, fallback=fallback), factor))


def exact_display_factor(rows: int, columns: int, display_shape: tuple[int, ...]) -> int | None:
    """The factor by which ``display_shape`` is an exact integer downscale of a ``rows`` x
    ``columns`` source (as :func:`display_image` makes it), or ``None`` when it is not one (an
    unknown source size, a colour source shown on the model grid, a side shorter than the factor)."""
    if rows <= 0 or columns <= 0:
        return None
    factor = display_factor(rows, columns)
    if rows < factor or columns < factor:
        return None
    return factor if tuple(display_shape[:2]) == (rows // factor, columns // factor) else None


@dataclass(frozen=True)
class EncodedObject:
    """A result object encoded in a child: what the outbox and the database need, and its bytes."""

    sop_instance_uid: str
    sop_class_uid: str
    data: bytes
    """A DICOM Part 10 file."""

    def dataset(self) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.data))


def encode(ds: Dataset) -> EncodedObject:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return EncodedObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), buffer.getvalue())


@dataclass(frozen=True)
class CaptureTask:
    """Everything one CAM secondary capture is made from."""

    source: Dataset
    """The source's copyable header (:func:`inference.writers.common.copyable_header`)."""
    display: np.ndarray
    """Its display copy (:func:`display_image`)."""
    score: ImageScore
    captions: tuple[str, ...]
    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    keep_picture: bool = False
    """Return the rendered RGB picture too (the offline tool writes it as PNG)."""
    display_factor: int | None = None
    """``display`` is the source shrunk by exactly this integer factor (:func:`shrink`), so the
    capture gets the source's pixel spacing times it; ``None``: the geometry is not the source's
    and the capture claims no spacing."""
    opacity_follows_probability: bool = False
    """Fade the map by the image's probability (setting ``cam_opacity_follows_probability``);
    by default every map is drawn at the same opacity and its colour scale says what it means."""


def capture_captions(study: StudyScore, image: ImageScore, manifest: ModelManifest) -> tuple[str, ...]:
    """The CAM capture's caption: the image's score, then its breast's decision stated outright
    (``L breast P 0.73 < threshold 0.77: no recall``) so an image above the threshold in a breast
    below it cannot read as a recall, then the model."""
    side = image.meta.laterality if image.meta.laterality in ("L", "R") else "unknown-side"
    breast_p = next(
        (b.probability for b in study.breasts if image.meta.sop_instance_uid in b.image_probabilities),
        float("nan"),
    )
    if np.isfinite(breast_p):
        recall = breast_p >= study.threshold
        shown_p, shown_t = distinct_decimals(breast_p, study.threshold)
        decision = (
            f"{side} breast P {shown_p} {'>=' if recall else '<'} threshold {shown_t}: "
            f"{'RECALL' if recall else 'no recall'}"
        )
    else:
        decision = f"{side} breast P n/a (threshold {study.threshold:.2f})"
    return (
        f"{side} {image.meta.view}  image P {image.probability:.2f}",
        decision,
        f"{manifest.name} {manifest.version} ({manifest.architecture}) sha256 {manifest.weights_sha256[:12]}",
    )


def distinct_decimals(value: float, threshold: float) -> tuple[str, str]:
    """``value`` and ``threshold`` with two decimals, or as many more (up to six) as it takes for
    unequal numbers not to print alike (``0.7699 < 0.7700``, never ``0.77 < 0.77``)."""
    for decimals in range(2, 7):
        shown = f"{value:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown[0] != shown[1] or value == threshold:
            return shown
    return f"{value:.6f}", f"{threshold:.6f}"


@dataclass(frozen=True)
class Capture:
    """A rendered capture: the encoded SC and, when asked for, its picture."""

    source_sop_instance_uid: str
    encoded: EncodedObject
    picture: np.ndarray | None = None


def chest_wall_side(source: Dataset) -> ChestWall | None:
    """The image side the breast lies against, from Patient Orientation's row direction: rows that
    run towards anterior (``A...``) start at the chest wall on the left, ``P...`` on the right."""
    value = source.get("PatientOrientation")
    values = [value] if isinstance(value, str) else list(value or [])
    first = str(values[0]).strip().upper() if len(values) == 2 else ""
    if first.startswith("A"):
        return "left"
    if first.startswith("P"):
        return "right"
    return None


def _display_cam(task: CaptureTask) -> np.ndarray:
    """The thresholded CAM on the display image's pixel grid."""
    image = task.score
    cam_map = cam_to_original(image.cam, image.transform, thresholded=True, factor=task.display_factor or 1)
    h, w = task.display.shape[:2]
    if cam_map.shape != (h, w):
        cam_map = cv2.resize(cam_map.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return cam_map


def render_capture(task: CaptureTask) -> Capture:
    """Draw the thresholded CAM over the display image and encode it as an RLE secondary capture."""
    image = task.score
    fade = task.opacity_follows_probability
    legend = DEFAULT_LEGEND + (f". Opacity x image P {image.probability:.2f}" if fade else "")
    rgb = render_cam_overlay(
        task.display,
        _display_cam(task),
        notice=task.algorithm.notice,
        caption_lines=list(task.captions),
        legend=legend,
        strength=image.probability if fade else 1.0,
        chest_wall=chest_wall_side(task.source),
    )
    sc = build_cam_sc(
        task.source,
        rgb,
        algorithm=task.algorithm,
        series_instance_uid=task.series_instance_uid,
        sop_instance_uid=task.sop_instance_uid,
        series_number=task.series_number,
        instance_number=task.instance_number,
        probability=image.probability,
        display_factor=task.display_factor,
        laterality=image.meta.laterality,
        view=image.meta.view,
    )
    return Capture(image.meta.sop_instance_uid, encode(sc), rgb if task.keep_picture else None)


@dataclass(frozen=True)
class ReportTask:
    """Everything one study's score report is made from."""

    study: StudyScore
    sources: Sequence[Dataset]
    """Copyable headers of the scored images."""
    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    aggregation: str
    not_analysed: tuple[ImageFailure, ...] = ()
    missing_views: tuple[str, ...] = ()
    captures_missing: tuple[ImageFailure, ...] = ()
    marks: Mapping[str, tuple[CamMark, ...]] = field(default_factory=dict)
    """The CAM marks of each scored image (:func:`inference.marks.cam_marks`), by SOP Instance UID:
    where the report's image regions go."""
    captures: Mapping[str, CaptureReference] = field(default_factory=dict)
    """The CAM capture made of each scored image, by source SOP Instance UID: the report
    references them (images whose capture failed are absent)."""


def render_report(task: ReportTask) -> EncodedObject:
    """Build and encode the study's TID 1500 report (:func:`inference.writers.sr.build_score_sr`)."""
    report = build_score_sr(
        task.study,
        task.sources,
        algorithm=task.algorithm,
        series_instance_uid=task.series_instance_uid,
        sop_instance_uid=task.sop_instance_uid,
        series_number=task.series_number,
        instance_number=1,
        aggregation=task.aggregation,
        not_analysed=task.not_analysed,
        missing_views=task.missing_views,
        captures_missing=task.captures_missing,
        marks=task.marks,
        captures=task.captures,
    )
    return encode(report)
