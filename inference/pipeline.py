"""The scoring pipeline: source datasets in, scores and DICOM result objects out.

Both the offline `mammonode score` and the node's worker run exactly this code, so what a
radiologist sees from the node is what the offline tool shows. The order is the design's: decode,
window, preprocess (shared with training), one backend pass for logit and CAM, per-breast
aggregation, then one CAM secondary capture per image and one TID 1500 report per study.

Pixel work runs in the pixel pool's child processes (:mod:`inference.pixel_pool`): decoding and
preprocessing (:func:`prepare_image`) and rendering and encoding the results
(:mod:`inference.rendering`). Only the backend pass runs in the calling process. One image that
cannot be decoded or rendered fails alone: the study is still scored, and its report says which
images are missing and why (design invariants 8 and 9).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from inference.aggregation import AGGREGATIONS, aggregate_studies
from inference.backends.base import Backend
from inference.manifest import algorithm_info
from inference.marks import CamMark, cam_marks
from inference.phi import describe, scrub
from inference.pixel_pool import PixelPool
from inference.preprocessing import preprocess_levels
from inference.reduced_decode import SourceLevels
from inference.rendering import (
    Capture,
    CaptureTask,
    EncodedObject,
    ReportTask,
    capture_captions,
    display_copy,
    display_level,
    exact_display_factor,
    render_capture,
    render_report,
)
from inference.rendering_marks import (
    CadReportTask,
    PresentationTask,
    render_cad_report,
    render_presentation_state,
)
from inference.types import (
    SCREENING_VIEWS,
    ImageFailure,
    ImageMeta,
    ImageScore,
    InputError,
    PreprocessConfig,
    PreprocessedImage,
    StudyScore,
    view_key,
)
from inference.writers.cad_sr import cad_sr_uids
from inference.writers.common import copyable_header
from inference.writers.gsps import gsps_uids
from inference.writers.sc import cam_sc_uids
from inference.writers.sr import CaptureReference, sr_uids

if TYPE_CHECKING:
    from inference.backends.cuda_runtime import CudaArray
    from inference.preprocessing_dali import DaliPreprocessor

log = logging.getLogger(__name__)

CAM_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
CAD_SR_SERIES_NUMBER = 9903
GSPS_SERIES_NUMBER = 9904


@dataclass
class PreparedImage:
    """A decoded source: its copyable header, the windowed image for display and the model input."""

    dataset: Dataset
    """The source's header without pixel data, with only the values that may be copied into
    results (:func:`inference.writers.common.copyable_header`)."""
    display: np.ndarray  # uint8 grey levels, dense tissue bright, at most DISPLAY_MAX on a side
    model_input: PreprocessedImage
    dropped: tuple[str, ...] = ()
    """Keywords of source attributes left out of the results because their values are invalid."""

    @property
    def meta(self) -> ImageMeta:
        return self.model_input.meta


@dataclass
class StudyOutputs:
    """Everything produced for one study, in ``score.images`` order for the per-image lists
    (``None`` where that image's capture could not be made; ``capture_failures`` says why)."""

    score: StudyScore
    secondary_captures: list[EncodedObject | None]
    overlays: list[np.ndarray | None]
    report: EncodedObject
    capture_failures: list[ImageFailure] = field(default_factory=list)
    not_analysed: list[ImageFailure] = field(default_factory=list)
    missing_views: tuple[str, ...] = ()
    cad_report: EncodedObject | None = None
    """The Mammography CAD SR; None when it could not be made (``object_failures`` says why)."""
    presentation_states: list[EncodedObject | None] = field(default_factory=list)
    """One GSPS per image in ``score.images`` order when they were asked for, else empty."""
    object_failures: list[str] = field(default_factory=list)
    """Scrubbed reasons why a CAD SR or a presentation state could not be made."""

    @property
    def complete(self) -> bool:
        return not (self.not_analysed or self.missing_views)


@dataclass
class PreparedAndScored:
    """:meth:`Pipeline.prepare_and_infer`'s result: ``prepared[i]`` was scored as ``scores[i]``, in
    input order; ``failures`` are (input index, why) for the images that cannot be scored."""

    prepared: list[PreparedImage] = field(default_factory=list)
    scores: list[ImageScore] = field(default_factory=list)
    failures: list[tuple[int, InputError]] = field(default_factory=list)


def prepare_image(dataset: Dataset, meta: ImageMeta, config: PreprocessConfig) -> PreparedImage:
    """Decode, window and preprocess one image (:meth:`Pipeline.prepare`). A plain function of
    picklable arguments, so the decode workers of :mod:`inference.batching` can run it in other
    processes; raises InputError when the image cannot be scored.

    Only the resolutions needed are decoded (:mod:`inference.reduced_decode`): the finer of the
    capture's display level and what the model input needs, usually half the source's.
    """
    source = SourceLevels(dataset)
    source.finest = display_level(source.rows, source.columns)[0]
    model_input = preprocess_levels(source, dataset, meta, config)
    return _prepared(dataset, display_copy(source, dataset, fallback=config.fallback_window), model_input)


def _prepared(dataset: Dataset, display: np.ndarray, model_input: PreprocessedImage) -> PreparedImage:
    header, dropped = copyable_header(dataset)
    return PreparedImage(header, display, model_input, dropped)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float64))))


class Pipeline:
    """Scores images with one backend; holds no state between calls other than configuration."""

    def __init__(
        self,
        backend: Backend,
        *,
        aggregation: str | None = None,
        batch_size: int = 8,
        dali: DaliPreprocessor | None = None,
        cam_opacity_follows_probability: bool = False,
        write_presentation_states: bool = False,
    ) -> None:
        self.backend = backend
        # Also a GSPS per image with the CAD marks, for viewers without CAD SR or colour support.
        self.write_presentation_states = write_presentation_states
        # Off (default): every CAM capture shows its map at one opacity, read with its colour
        # scale; on: the map of an image the model finds benign fades with its probability.
        self.cam_opacity_follows_probability = cam_opacity_follows_probability
        self.dali = dali  # optional DALI preprocessing, used by prepare_and_infer
        self.manifest = backend.manifest
        self.aggregation = aggregation or self.manifest.aggregation
        if self.aggregation not in AGGREGATIONS:
            raise InputError(
                f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        self.batch_size = batch_size
        self.algorithm = algorithm_info(self.manifest)

    def prepare(self, dataset: Dataset, meta: ImageMeta) -> PreparedImage:
        """Decode and preprocess one image; raises InputError when it cannot be scored."""
        return prepare_image(dataset, meta, self.manifest.preprocess)

    def infer(self, images: Sequence[PreparedImage]) -> list[ImageScore]:
        """One backend pass per batch; each image gets its logit, probability and CAM."""
        scores: list[ImageScore] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.stack([p.model_input.pixels[None] for p in chunk]).astype(np.float32)
            scores.extend(_image_scores(chunk, *self.backend.infer(batch)))
        return scores

    def prepare_and_infer(self, items: Sequence[tuple[Dataset, ImageMeta]]) -> PreparedAndScored:
        """Prepare and score many images, with DALI when the pipeline has it, else as
        :meth:`prepare` + :meth:`infer` do.

        With DALI each chunk of its batch size is preprocessed in one DALI run and scored at once:
        on a GPU the batch goes to the backend in device memory (``infer_device``, which the
        torch and tensorrt backends have), and only after the backend has run is the small model
        input copied to the host for the :class:`PreparedImage` record. The images DALI does not
        take go through :meth:`prepare` and :meth:`infer` as before. Either way the result is
        the same kind of :class:`PreparedImage` and :class:`ImageScore`.
        """
        done: dict[int, tuple[PreparedImage, ImageScore]] = {}
        failures: list[tuple[int, InputError]] = []
        cpu = list(range(len(items))) if self.dali is None else []
        if self.dali is not None:
            for start in range(0, len(items), self.dali.batch_size):
                chunk = items[start : start + self.dali.batch_size]
                result = self.dali.prepare([ds for ds, _ in chunk], [meta for _, meta in chunk])
                failures.extend((start + i, exc) for i, exc in result.errors)
                cpu.extend(start + i for i, _ in result.fallbacks)
                if not result.rows:
                    continue
                logits, cams = self._infer_any(result.batch)
                grids = result.batch if isinstance(result.batch, np.ndarray) else result.batch.to_host()
                prepared = [
                    _prepared(
                        chunk[row.index][0],
                        row.display,
                        PreprocessedImage(grids[k, 0], row.transform, row.meta),
                    )
                    for k, row in enumerate(result.rows)
                ]
                for row, image, score in zip(
                    result.rows, prepared, _image_scores(prepared, logits, cams), strict=True
                ):
                    done[start + row.index] = (image, score)
        ready: list[tuple[int, PreparedImage]] = []
        for index in sorted(cpu):
            try:
                ready.append((index, self.prepare(*items[index])))
            except InputError as exc:
                failures.append((index, exc))
        for (index, image), score in zip(ready, self.infer([p for _, p in ready]), strict=True):
            done[index] = (image, score)
        order = sorted(done)
        return PreparedAndScored(
            [done[i][0] for i in order], [done[i][1] for i in order], sorted(failures, key=lambda f: f[0])
        )

    def _infer_any(self, batch: np.ndarray | CudaArray) -> tuple[np.ndarray, np.ndarray]:
        """A host batch to ``infer``; a device batch to ``infer_device`` (copied to the host only
        for a backend that cannot read device memory)."""
        if isinstance(batch, np.ndarray):
            return self.backend.infer(batch)
        infer_device = getattr(self.backend, "infer_device", None)
        if infer_device is not None:
            logits, cams = infer_device(batch)
            return np.asarray(logits), np.asarray(cams)
        return self.backend.infer(batch.to_host())

    def score(self, images: Sequence[PreparedImage]) -> list[StudyScore]:
        """Image, breast and exam scores for every study among ``images``."""
        return aggregate_studies(self.infer(images), self.aggregation, self.manifest.threshold)

    def outputs(
        self,
        study: StudyScore,
        images: Iterable[PreparedImage],
        *,
        pool: PixelPool,
        result_version: int = 1,
        not_analysed: Sequence[ImageFailure] = (),
        expected_views: Sequence[str] = SCREENING_VIEWS,
        keep_pictures: bool = False,
    ) -> StudyOutputs:
        """Render the CAM captures and the report of one scored study in ``pool``'s children.

        A capture that cannot be made (its child died, the encoder failed) is left out and named
        in the report; the report itself is required (its failure raises). ``not_analysed`` are
        the study's images that could not be scored and ``expected_views`` the views a complete
        exam has: either kind of gap makes the report PARTIAL. With ``keep_pictures`` the
        rendered RGB pictures come back too (for PNG files). The Mammography CAD SR and, when the
        pipeline writes presentation states, one GSPS per image carry the same CAM marks as the report; one
        that cannot be made is left out and named in ``object_failures``.
        """
        by_uid = {p.meta.sop_instance_uid: p for p in images}
        marks = report_marks(study)
        tasks = [
            self._capture_task(
                study, by_uid[image.meta.sop_instance_uid], image, number, result_version, keep_pictures
            )
            for number, image in enumerate(study.images, start=1)
        ]
        present = {view_key(i.meta.laterality, i.meta.view) for i in study.images}
        missing = tuple(v for v in expected_views if v not in present)
        sources = [by_uid[i.meta.sop_instance_uid].dataset for i in study.images]
        # The reports are rendered alongside the captures, on the cores the captures leave idle,
        # as if every capture succeeds; a report that named a capture which failed is redone.
        expected = expected_capture_references(tasks)
        report_task = self._report_task(
            study, sources, not_analysed, missing, (), marks, expected, result_version
        )
        cad_task = self._cad_task(study, sources, marks, not_analysed, missing, result_version)
        # The report first: it is the longest task, and the captures fill the other cores meanwhile.
        jobs: list[RenderJob] = [(render_report, report_task), *((render_capture, t) for t in tasks)]
        jobs.append((render_cad_report, cad_task))
        report, *outcomes, cad = [outcome for _, outcome in pool.imap(run_render_job, jobs)]
        captures: list[EncodedObject | None] = []
        pictures: list[np.ndarray | None] = []
        capture_failures: list[ImageFailure] = []
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, Exception):
                capture_failures.append(image_failure(task.score.meta, outcome))
                captures.append(None)
                pictures.append(None)
            else:
                assert isinstance(outcome, Capture)
                captures.append(outcome.encoded)
                pictures.append(outcome.picture)
        if capture_failures or capture_references(tasks, captures) != expected:
            report_task = replace(
                report_task,
                captures_missing=tuple(capture_failures),
                captures=capture_references(tasks, captures),
            )
            ((_, report),) = list(pool.imap(render_report, [report_task]))
        if isinstance(report, Exception):
            raise report
        assert isinstance(report, EncodedObject)
        outputs = StudyOutputs(
            study, captures, pictures, report, capture_failures, list(not_analysed), missing
        )
        if isinstance(cad, Exception):
            outputs.object_failures.append(f"Mammography CAD SR: {scrub(describe(cad))}")
        else:
            assert isinstance(cad, EncodedObject)
            outputs.cad_report = cad
        if self.write_presentation_states:
            self._presentation_states(outputs, sources, marks, pool, result_version)
        return outputs

    def _report_task(
        self,
        study: StudyScore,
        sources: Sequence[Dataset],
        not_analysed: Sequence[ImageFailure],
        missing: tuple[str, ...],
        captures_missing: tuple[ImageFailure, ...],
        marks: Mapping[str, tuple[CamMark, ...]],
        captures: dict[str, CaptureReference],
        result_version: int,
    ) -> ReportTask:
        series_uid, sop_uid = sr_uids(
            study.study_instance_uid,
            self.algorithm,
            [i.meta.sop_instance_uid for i in study.images],
            result_version,
        )
        return ReportTask(
            study=study,
            sources=sources,
            algorithm=self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=SR_SERIES_NUMBER,
            aggregation=self.aggregation,
            not_analysed=tuple(not_analysed),
            missing_views=missing,
            captures_missing=captures_missing,
            marks=marks,
            captures=captures,
        )

    def _cad_task(
        self,
        study: StudyScore,
        sources: Sequence[Dataset],
        marks: Mapping[str, tuple[CamMark, ...]],
        not_analysed: Sequence[ImageFailure],
        missing: tuple[str, ...],
        result_version: int,
    ) -> CadReportTask:
        series_uid, sop_uid = cad_sr_uids(
            study.study_instance_uid,
            self.algorithm,
            [i.meta.sop_instance_uid for i in study.images],
            result_version,
        )
        return CadReportTask(
            study=study,
            sources=sources,
            marks=marks,
            algorithm=self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=CAD_SR_SERIES_NUMBER,
            not_analysed=tuple(not_analysed),
            missing_views=missing,
        )

    def _presentation_states(
        self,
        outputs: StudyOutputs,
        sources: Sequence[Dataset],
        marks: Mapping[str, tuple[CamMark, ...]],
        pool: PixelPool,
        result_version: int,
    ) -> None:
        """Add one presentation state per image with the CAD marks to ``outputs``."""
        study = outputs.score
        tasks = [
            self._presentation_task(study, source, image, marks, number, result_version)
            for number, (image, source) in enumerate(zip(study.images, sources, strict=True), start=1)
        ]
        for task, state in pool.imap(render_presentation_state, tasks):
            if isinstance(state, Exception):
                uid = task.score.meta.sop_instance_uid
                outputs.object_failures.append(f"presentation state of {uid}: {scrub(describe(state))}")
                outputs.presentation_states.append(None)
            else:
                outputs.presentation_states.append(state)

    def _presentation_task(
        self,
        study: StudyScore,
        source: Dataset,
        image: ImageScore,
        marks: Mapping[str, tuple[CamMark, ...]],
        number: int,
        result_version: int,
    ) -> PresentationTask:
        uid = image.meta.sop_instance_uid
        series_uid, sop_uid = gsps_uids(
            uid, self.algorithm, study.study_instance_uid, result_version, laterality=image.meta.laterality
        )
        breast_p = next((b.probability for b in study.breasts if uid in b.image_probabilities), float("nan"))
        return PresentationTask(
            source=source,
            score=image,
            marks=marks.get(uid, ()),
            breast_probability=breast_p,
            threshold=study.threshold,
            algorithm=self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=GSPS_SERIES_NUMBER,
            instance_number=number,
        )

    def _capture_task(
        self,
        study: StudyScore,
        prepared: PreparedImage,
        image: ImageScore,
        number: int,
        result_version: int,
        keep_picture: bool,
    ) -> CaptureTask:
        series_uid, sop_uid = cam_sc_uids(
            image.meta.sop_instance_uid, self.algorithm, study.study_instance_uid, result_version
        )
        return CaptureTask(
            source=prepared.dataset,
            display=prepared.display,
            score=image,
            captions=capture_captions(study, image, self.manifest),
            algorithm=self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=CAM_SERIES_NUMBER,
            instance_number=number,
            keep_picture=keep_picture,
            display_factor=exact_display_factor(image.meta.rows, image.meta.columns, prepared.display.shape),
            opacity_follows_probability=self.cam_opacity_follows_probability,
        )


def image_failure(meta: ImageMeta, error: BaseException) -> ImageFailure:
    """What a report says of an image that failed: its identity and the scrubbed reason."""
    reason = str(error) if isinstance(error, InputError) else describe(error)
    return ImageFailure(meta.sop_instance_uid, meta.sop_class_uid, meta.laterality, meta.view, scrub(reason))


def report_marks(study: StudyScore) -> dict[str, tuple[CamMark, ...]]:
    """The CAM marks of each scored image (:func:`inference.marks.cam_marks`), by SOP Instance UID,
    where the report places its groups' image regions. An image whose marks cannot be worked out
    is left out (the report then uses its whole image) rather than failing the study's report."""
    marks: dict[str, tuple[CamMark, ...]] = {}
    for image in study.images:
        try:
            marks[image.meta.sop_instance_uid] = cam_marks(image)
        except (ValueError, cv2.error) as exc:
            log.warning("no CAM marks for image %s: %s", image.meta.sop_instance_uid, describe(exc))
    return marks


RenderJob = tuple[Callable[[Any], object], object]
"""A rendering function of :mod:`inference.rendering` or :mod:`inference.rendering_marks` and its
task: one item of the pool's work for a study (module-level functions pickle by name)."""


def run_render_job(job: RenderJob) -> object:
    """Run one :data:`RenderJob` (in a pool child)."""
    fn, task = job
    return fn(task)


def expected_capture_references(tasks: Sequence[CaptureTask]) -> dict[str, CaptureReference]:
    """What :func:`capture_references` gives when every capture succeeds: a CAM capture is a
    Secondary Capture Image with the UIDs its task was given."""
    return {
        task.score.meta.sop_instance_uid: CaptureReference(
            SecondaryCaptureImageStorage, task.sop_instance_uid, task.series_instance_uid
        )
        for task in tasks
    }


def capture_references(
    tasks: Sequence[CaptureTask], captures: Sequence[EncodedObject | None]
) -> dict[str, CaptureReference]:
    """The CAM capture made of each scored image (``captures`` in ``tasks`` order, ``None`` where
    it failed), by source SOP Instance UID, as the report references it."""
    return {
        task.score.meta.sop_instance_uid: CaptureReference(
            encoded.sop_class_uid, encoded.sop_instance_uid, task.series_instance_uid
        )
        for task, encoded in zip(tasks, captures, strict=True)
        if encoded is not None
    }


def _image_scores(images: Sequence[PreparedImage], logits: np.ndarray, cams: np.ndarray) -> list[ImageScore]:
    """One ImageScore per image from a backend pass (logit, probability, CAM, geometry)."""
    return [
        ImageScore(
            meta=p.meta,
            logit=float(logit),
            probability=float(prob),
            cam=np.asarray(cam, dtype=np.float32),
            transform=p.model_input.transform,
        )
        for p, logit, prob, cam in zip(images, logits, _sigmoid(logits), cams, strict=True)
    ]
