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
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.cam import cam_to_original
from inference.overlay import render_cam_overlay
from inference.types import AlgorithmInfo, ImageFailure, ImageScore, StudyScore
from inference.writers.sc import build_cam_sc
from inference.writers.sr import build_score_sr

DISPLAY_MAX = 2048
"""Longest side of the display copy kept of each source: the CAM capture is drawn at most this
large, so a decoded 4700x2900 mammogram (54 MB as float32) need not travel between processes."""


def display_image(windowed: np.ndarray) -> np.ndarray:
    """The windowed source shrunk by the smallest integer factor that fits :data:`DISPLAY_MAX`
    (area averaging), as float32; an image that fits already is returned as is."""
    image = np.asarray(windowed, dtype=np.float32)
    factor = math.ceil(max(image.shape[:2]) / DISPLAY_MAX)
    if factor <= 1:
        return image
    h, w = max(1, image.shape[0] // factor), max(1, image.shape[1] // factor)
    return np.asarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), dtype=np.float32)


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
    score: ImageScore
    captions: tuple[str, ...]
    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    keep_picture: bool = False
    """Return the rendered RGB picture too (the offline tool writes it as PNG)."""


@dataclass(frozen=True)
class Capture:
    """A rendered capture: the encoded SC and, when asked for, its picture."""

    source_sop_instance_uid: str
    encoded: EncodedObject
    picture: np.ndarray | None = None


def render_capture(task: CaptureTask) -> Capture:
    """Draw the thresholded CAM over the display image and encode it as an RLE secondary capture."""
    image = task.score
    cam_map = cam_to_original(image.cam, image.transform, thresholded=True)
    if cam_map.shape != task.display.shape[:2]:
        h, w = task.display.shape[:2]
        cam_map = cv2.resize(cam_map.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    rgb = render_cam_overlay(
        task.display,
        cam_map,
        notice=task.algorithm.notice,
        caption_lines=list(task.captions),
        strength=image.probability,
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
    )
    return encode(report)
