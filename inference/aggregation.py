"""From image probabilities to breast and exam scores.

The prediction unit is the breast (patient, study, laterality), as in seed 003 and the RSNA
challenge; the exam score is the maximum over the breasts, since one suspicious breast is enough
to recall the woman. Images whose laterality is unknown form their own ``unknown`` breast: they
are reported and count toward the exam score, never dropped, because a finding we cannot place on
a side is still a finding.

Torch-free; pure Python/numpy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from inference.types import BreastScore, ImageScore, StudyScore

logger = logging.getLogger(__name__)

AGGREGATIONS: tuple[str, ...] = ("pagg", "mean", "max")


def aggregate(probabilities: Sequence[float], method: str) -> float:
    """Combine the image probabilities of one breast.

    ``pagg`` (seed 003): with ``P = mean(p_i^2)`` over the n images, ``1 - (1 - P)^n`` -- the
    probability that at least one of n images is positive, where squaring weights confident images
    up. ``mean`` is the RSNA winners' choice; ``max`` the most sensitive.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose from {', '.join(AGGREGATIONS)}")
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError("aggregate needs a non-empty sequence of probabilities")
    if not np.all(np.isfinite(p)) or np.any(p < 0.0) or np.any(p > 1.0):
        raise ValueError(f"probabilities must be finite and in [0, 1], got {p.tolist()}")
    if method == "mean":
        return float(p.mean())
    if method == "max":
        return float(p.max())
    mean_sq = float(np.mean(p**2))
    return float(1.0 - (1.0 - mean_sq) ** p.size)


def aggregate_breasts(image_scores: list[ImageScore], method: str) -> list[BreastScore]:
    """One :class:`BreastScore` per ``meta.breast_key``, in order of first appearance.

    ``aggregates`` holds every method (for the SR and for evaluation); ``probability`` the chosen
    one. An instance scored twice (e.g. a resent file) counts once, with its latest score, so a
    duplicate cannot inflate ``n`` in P_agg.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose from {', '.join(AGGREGATIONS)}")
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for score in image_scores:
        per_image = groups.setdefault(score.meta.breast_key, {})
        uid = score.meta.sop_instance_uid
        if uid in per_image and not math.isclose(per_image[uid], score.probability):
            logger.warning(
                "instance %s scored twice (%.4f, %.4f); keeping the latest",
                uid,
                per_image[uid],
                score.probability,
            )
        per_image[uid] = float(score.probability)
    breasts = []
    for (patient_id, study_uid, laterality), per_image in groups.items():
        values = list(per_image.values())
        aggregates = {name: aggregate(values, name) for name in AGGREGATIONS}
        breasts.append(
            BreastScore(
                patient_id=patient_id,
                study_instance_uid=study_uid,
                laterality=laterality,
                probability=aggregates[method],
                method=method,
                image_probabilities=dict(per_image),
                aggregates=aggregates,
            )
        )
    return breasts


def aggregate_studies(image_scores: list[ImageScore], method: str, threshold: float) -> list[StudyScore]:
    """One :class:`StudyScore` per (patient, study): exam = max over its breasts (incl. unknown).

    ``recall_recommended`` is ``exam_probability >= threshold``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    by_study: dict[tuple[str, str], list[ImageScore]] = {}
    for score in image_scores:
        by_study.setdefault((score.meta.patient_id, score.meta.study_instance_uid), []).append(score)
    studies = []
    for (patient_id, study_uid), images in by_study.items():
        breasts = aggregate_breasts(images, method)
        exam = max(b.probability for b in breasts)
        studies.append(
            StudyScore(
                patient_id=patient_id,
                study_instance_uid=study_uid,
                exam_probability=exam,
                breasts=breasts,
                images=images,
                threshold=threshold,
                recall_recommended=exam >= threshold,
            )
        )
    return studies
