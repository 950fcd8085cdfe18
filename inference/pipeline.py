"""The scoring pipeline: source datasets in, scores and DICOM result objects out.

Both the offline `mammonode score` and the node's worker run exactly this code, so what a
radiologist sees from the node is what the offline tool shows. The order is the design's: decode,
window, preprocess (shared with training), one backend pass for logit and CAM, per-breast
aggregation, then one CAM secondary capture per image and one TID 1500 report per study.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from inference.aggregation import AGGREGATIONS, aggregate_studies
from inference.backends.base import Backend
from inference.cam import cam_to_original
from inference.dicom_io import decode_pixels
from inference.manifest import algorithm_info
from inference.overlay import render_cam_overlay
from inference.preprocessing import preprocess_array
from inference.types import ImageMeta, ImageScore, InputError, PreprocessedImage, StudyScore
from inference.voi import apply_voi
from inference.writers.sc import build_cam_sc, cam_sc_uids
from inference.writers.sr import build_score_sr, sr_uids

log = logging.getLogger(__name__)

CAM_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


@dataclass
class PreparedImage:
    """A decoded source: the dataset, the windowed original for display and the model input."""

    dataset: Dataset
    display: np.ndarray  # original size, float32 in [0, 1], dense tissue bright
    model_input: PreprocessedImage

    @property
    def meta(self) -> ImageMeta:
        return self.model_input.meta


@dataclass
class StudyOutputs:
    """Everything produced for one study, in ``score.images`` order for the per-image lists."""

    score: StudyScore
    secondary_captures: list[Dataset]
    overlays: list[np.ndarray]
    report: Dataset


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float64))))


class Pipeline:
    """Scores images with one backend; holds no state between calls other than configuration."""

    def __init__(self, backend: Backend, *, aggregation: str | None = None, batch_size: int = 8) -> None:
        self.backend = backend
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
        config = self.manifest.preprocess
        windowed = apply_voi(decode_pixels(dataset), dataset, fallback=config.fallback_window)
        model_input = preprocess_array(windowed, meta, config)
        display = windowed if windowed.ndim == 2 else model_input.pixels
        return PreparedImage(dataset, np.asarray(display, dtype=np.float32), model_input)

    def infer(self, images: Sequence[PreparedImage]) -> list[ImageScore]:
        """One backend pass per batch; each image gets its logit, probability and CAM."""
        scores: list[ImageScore] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.stack([p.model_input.pixels[None] for p in chunk]).astype(np.float32)
            logits, cams = self.backend.infer(batch)
            probs = _sigmoid(logits)
            for p, logit, prob, cam in zip(chunk, logits, probs, cams, strict=True):
                scores.append(
                    ImageScore(
                        meta=p.meta,
                        logit=float(logit),
                        probability=float(prob),
                        cam=np.asarray(cam, dtype=np.float32),
                        transform=p.model_input.transform,
                    )
                )
        return scores

    def score(self, images: Sequence[PreparedImage]) -> list[StudyScore]:
        """Image, breast and exam scores for every study among ``images``."""
        return aggregate_studies(self.infer(images), self.aggregation, self.manifest.threshold)

    def outputs(
        self, study: StudyScore, images: Iterable[PreparedImage], *, result_version: int = 1
    ) -> StudyOutputs:
        """Render the CAM captures and the report of one scored study."""
        by_uid = {p.meta.sop_instance_uid: p for p in images}
        breast_prob = {
            (b.laterality, uid): b.probability for b in study.breasts for uid in b.image_probabilities
        }
        captures: list[Dataset] = []
        overlays: list[np.ndarray] = []
        for number, image in enumerate(study.images, start=1):
            prepared = by_uid[image.meta.sop_instance_uid]
            cam_map = cam_to_original(image.cam, image.transform, thresholded=True)
            breast_p = breast_prob.get((image.meta.laterality, image.meta.sop_instance_uid), float("nan"))
            captions = [
                f"{self.manifest.name} {self.manifest.version} ({self.manifest.architecture}) "
                f"sha256 {self.manifest.weights_sha256[:12]}",
                f"{image.meta.laterality} {image.meta.view}: P(malignancy) image {image.probability:.2f}"
                f"  breast {breast_p:.2f}  exam {study.exam_probability:.2f}"
                f"  threshold {study.threshold:.2f}",
            ]
            rgb = render_cam_overlay(
                prepared.display,
                cam_map,
                notice=self.algorithm.notice,
                caption_lines=captions,
                strength=image.probability,
            )
            series_uid, sop_uid = cam_sc_uids(
                image.meta.sop_instance_uid, self.algorithm, study.study_instance_uid, result_version
            )
            captures.append(
                build_cam_sc(
                    prepared.dataset,
                    rgb,
                    algorithm=self.algorithm,
                    series_instance_uid=series_uid,
                    sop_instance_uid=sop_uid,
                    series_number=CAM_SERIES_NUMBER,
                    instance_number=number,
                    probability=image.probability,
                )
            )
            overlays.append(rgb)
        sources = [by_uid[i.meta.sop_instance_uid].dataset for i in study.images]
        series_uid, sop_uid = sr_uids(
            study.study_instance_uid,
            self.algorithm,
            [i.meta.sop_instance_uid for i in study.images],
            result_version,
        )
        report = build_score_sr(
            study,
            sources,
            algorithm=self.algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=SR_SERIES_NUMBER,
            instance_number=1,
            aggregation=self.aggregation,
        )
        return StudyOutputs(study, captures, overlays, report)


def group_by_study(images: Iterable[PreparedImage]) -> dict[tuple[str, str], list[PreparedImage]]:
    """Images keyed by (PatientID, StudyInstanceUID), in arrival order."""
    groups: dict[tuple[str, str], list[PreparedImage]] = defaultdict(list)
    for image in images:
        groups[(image.meta.patient_id, image.meta.study_instance_uid)].append(image)
    return dict(groups)
