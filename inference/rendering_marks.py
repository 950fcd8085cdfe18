"""The result objects that carry CAD marks, made in the pixel pool's children like the others.

A Mammography CAD SR per study (workstations draw CAD marks only from one) and, when asked for, a
Grayscale Softcopy Presentation State per source image (for viewers that show neither CAD SR
nor colour captures). Neither touches pixels, but both are encoded in a child like every result
object (:mod:`inference.rendering`), so a writer that fails takes only its own object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from inference.marks import CamMark
from inference.rendering import EncodedObject, encode
from inference.types import AlgorithmInfo, ImageFailure, ImageScore, StudyScore
from inference.writers.cad_sr import build_cad_sr
from inference.writers.gsps import build_marks_gsps


@dataclass(frozen=True)
class CadReportTask:
    """Everything one study's Mammography CAD SR is made from."""

    study: StudyScore
    sources: Sequence[Dataset]
    marks: Mapping[str, Sequence[CamMark]]
    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    not_analysed: tuple[ImageFailure, ...] = ()
    missing_views: tuple[str, ...] = ()


def render_cad_report(task: CadReportTask) -> EncodedObject:
    """Build and encode the study's TID 4000 document (:func:`inference.writers.cad_sr.build_cad_sr`)."""
    document = build_cad_sr(
        task.study,
        task.sources,
        marks=task.marks,
        algorithm=task.algorithm,
        series_instance_uid=task.series_instance_uid,
        sop_instance_uid=task.sop_instance_uid,
        series_number=task.series_number,
        not_analysed=task.not_analysed,
        missing_views=task.missing_views,
    )
    return encode(document)


@dataclass(frozen=True)
class PresentationTask:
    """Everything one source image's presentation state is made from."""

    source: Dataset
    score: ImageScore
    marks: tuple[CamMark, ...]
    breast_probability: float
    threshold: float
    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int


def render_presentation_state(task: PresentationTask) -> EncodedObject:
    """Build and encode one GSPS (:func:`inference.writers.gsps.build_marks_gsps`)."""
    state = build_marks_gsps(
        task.source,
        task.score,
        task.marks,
        breast_probability=task.breast_probability,
        threshold=task.threshold,
        algorithm=task.algorithm,
        series_instance_uid=task.series_instance_uid,
        sop_instance_uid=task.sop_instance_uid,
        series_number=task.series_number,
        instance_number=task.instance_number,
    )
    return encode(state)
