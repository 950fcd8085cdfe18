"""What the score report (:mod:`inference.writers.sr`) says in words: group labels, the stated
breast and exam decisions, and the statements about what a study's scores leave out.

The coded content says the same for software; these sentences are for a reader of a generic
rendering (``dsr2html``, a PACS text view), so each decision names its number, its threshold
and its outcome, and each gap names the image or view it concerns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from inference.types import BreastScore, ImageFailure, ImageScore, StudyScore
from inference.writers.sr_codes import LATERALITY_CODES, follow_up

logger = logging.getLogger(__name__)


def side_label(laterality: str | None) -> str:
    return laterality if laterality in LATERALITY_CODES else "unknown side"


def view_label(image: ImageScore) -> str:
    """``R CC``, ``L unknown view``, ``unknown side MLO``..."""
    view = image.meta.view if image.meta.view != "unknown" else "unknown view"
    return f"{side_label(image.meta.laterality)} {view}"


def breast_label(laterality: str) -> str:
    return {"L": "Left breast", "R": "Right breast"}.get(laterality, "Breast of unknown side")


def distinct(value: float, threshold: float) -> tuple[str, str]:
    """``value`` and ``threshold`` with three decimals, or as many more (up to eight) as it takes
    for unequal numbers not to print alike (never ``0.770 is below the threshold 0.770``)."""
    for decimals in range(3, 9):
        shown = f"{value:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown[0] != shown[1] or value == threshold:
            return shown
    return repr(float(value)), repr(float(threshold))


def breast_statement(
    breast: BreastScore, threshold: float, method: str, images: Mapping[str, ImageScore]
) -> str:
    """The breast's decision in words; when the breast is not recalled although one of its images
    is at or above the threshold, says so (the decision is made per breast, on the aggregate)."""
    recalled = breast.probability >= threshold
    n = len(breast.image_probabilities)
    shown_p, shown_t = distinct(breast.probability, threshold)
    text = (
        f"{breast_label(breast.laterality)}: P(cancer) {shown_p} ({method} over {n} "
        f"image{'s' if n != 1 else ''}) is {'at or above' if recalled else 'below'} the threshold "
        f"{shown_t}: {'recalled' if recalled else 'not recalled'} "
        f"(Recommended Follow-up: {follow_up(recalled).meaning})."
    )
    if not recalled:
        for uid, p in breast.image_probabilities.items():
            if p >= threshold and uid in images:
                text += (
                    f" Its image {view_label(images[uid])} has P {distinct(p, threshold)[0]}, at or above "
                    "the threshold, but the decision is made per breast."
                )
    return text


def exam_statement(study: StudyScore) -> str:
    """The exam's decision in words: which breasts recall it, or the highest one that does not."""
    threshold = float(study.threshold)
    decision = f"(Recommended Follow-up: {follow_up(study.recall_recommended).meaning})"
    deciding = [b for b in study.breasts if b.probability >= threshold]
    if study.recall_recommended != bool(deciding):
        logger.warning("study %s: the recall flag disagrees with its breast scores", study.study_instance_uid)
    if study.recall_recommended:
        names = ", ".join(
            f"{breast_label(b.laterality)} P {distinct(b.probability, threshold)[0]}" for b in deciding
        )
        return (
            f"Exam: recall {decision}: {names or 'no breast'} at or above the threshold {threshold:.3f}; "
            f"exam P(cancer) {study.exam_probability:.3f} is the maximum over the breasts."
        )
    top = max(study.breasts, key=lambda b: b.probability)
    shown_p, shown_t = distinct(top.probability, threshold)
    return (
        f"Exam: no recall {decision}: no breast reaches the threshold {shown_t}; the highest is "
        f"{breast_label(top.laterality)} with P {shown_p}."
    )


def _image_text(failure: ImageFailure) -> str:
    view = failure.view if failure.view and failure.view != "unknown" else "unknown view"
    return f"image {failure.sop_instance_uid} ({side_label(failure.laterality)} {view})"


def incompleteness_comments(
    not_analysed: Sequence[ImageFailure],
    missing_views: Sequence[str],
    captures_missing: Sequence[ImageFailure],
) -> list[str]:
    """The report's statements about what its scores leave out, one per fact."""
    lines = [f"Not analysed: {_image_text(f)}: {f.reason}" for f in not_analysed]
    if missing_views:
        lines.append(
            "Expected views missing from the study: "
            + ", ".join(missing_views)
            + "; breast and exam scores use only the views analysed"
        )
    lines += [f"No CAM image could be made for {_image_text(f)}: {f.reason}" for f in captures_missing]
    return lines


def completion_description(not_analysed: Sequence[ImageFailure], missing_views: Sequence[str]) -> str:
    """CompletionFlagDescription (LO) of a PARTIAL report: what is missing, in brief."""
    parts = []
    if not_analysed:
        parts.append(f"{len(not_analysed)} image(s) not analysed")
    if missing_views:
        parts.append("missing " + " ".join(missing_views))
    return "; ".join(parts)
