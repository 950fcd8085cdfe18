"""Per-breast and per-exam aggregation against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from inference.aggregation import AGGREGATIONS, aggregate, aggregate_breasts, aggregate_studies
from inference.types import GeometricTransform, ImageMeta, ImageScore

_T = GeometricTransform((64, 32), (0, 64, 0, 32), False, 1.0, 0, 0, (64, 32))


def _score(
    uid: str, p: float, laterality: str = "L", study: str = "1.2.3", patient: str = "P1"
) -> ImageScore:
    meta = ImageMeta(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        patient_id=patient,
        laterality=laterality,
    )
    logit = float(np.log(p / (1 - p))) if 0 < p < 1 else 0.0
    return ImageScore(meta=meta, logit=logit, probability=p, cam=np.zeros((2, 1), np.float32), transform=_T)


def test_pagg_by_hand() -> None:
    # p = (0.2, 0.6): mean(p^2) = (0.04 + 0.36) / 2 = 0.2; 1 - 0.8^2 = 0.36
    assert aggregate([0.2, 0.6], "pagg") == pytest.approx(0.36)
    assert aggregate([0.2, 0.6], "mean") == pytest.approx(0.4)
    assert aggregate([0.2, 0.6], "max") == pytest.approx(0.6)
    # one image: 1 - (1 - p^2) = p^2
    assert aggregate([0.5], "pagg") == pytest.approx(0.25)
    # three images: mean(p^2) = (0.01 + 0.09 + 0.81) / 3 = 0.30333; 1 - 0.69667^3 = 0.661875...
    assert aggregate([0.1, 0.3, 0.9], "pagg") == pytest.approx(1 - (1 - 0.91 / 3) ** 3)
    assert aggregate([0.0, 0.0], "pagg") == 0.0
    assert aggregate([1.0, 0.0], "pagg") == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [[], [1.2], [-0.1], [float("nan")]])
def test_aggregate_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        aggregate(bad, "mean")


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([0.5], "median")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_breasts([_score("1.1", 0.5)], "median")


def test_breasts_grouped_by_patient_study_laterality() -> None:
    scores = [
        _score("1.1", 0.2, "L"),
        _score("1.2", 0.6, "L"),
        _score("1.3", 0.1, "R"),
        _score("1.4", 0.9, "L", study="1.2.4"),  # another study of the same woman
    ]
    breasts = aggregate_breasts(scores, "pagg")
    assert [(b.study_instance_uid, b.laterality) for b in breasts] == [
        ("1.2.3", "L"),
        ("1.2.3", "R"),
        ("1.2.4", "L"),
    ]
    left = breasts[0]
    assert left.image_probabilities == {"1.1": 0.2, "1.2": 0.6}
    assert left.method == "pagg"
    assert left.probability == pytest.approx(0.36)
    assert set(left.aggregates) == set(AGGREGATIONS)
    assert left.aggregates["mean"] == pytest.approx(0.4)
    assert left.aggregates["max"] == pytest.approx(0.6)
    assert breasts[1].probability == pytest.approx(0.01)


def test_duplicate_instance_counts_once() -> None:
    breasts = aggregate_breasts([_score("1.1", 0.6), _score("1.1", 0.6), _score("1.2", 0.2)], "pagg")
    assert breasts[0].probability == pytest.approx(0.36)  # n = 2, not 3


def test_studies_exam_is_max_over_breasts_and_unknown_is_kept() -> None:
    scores = [
        _score("1.1", 0.2, "L"),
        _score("1.2", 0.4, "R"),
        _score("1.3", 0.7, "unknown"),
        _score("2.1", 0.1, "L", study="9.9", patient="P2"),
    ]
    studies = aggregate_studies(scores, "mean", threshold=0.5)
    assert len(studies) == 2
    first, second = studies
    assert [b.laterality for b in first.breasts] == ["L", "R", "unknown"]
    assert first.exam_probability == pytest.approx(0.7)  # the unknown-side image counts
    assert first.recall_recommended
    assert [s.meta.sop_instance_uid for s in first.images] == ["1.1", "1.2", "1.3"]
    assert (second.patient_id, second.exam_probability, second.recall_recommended) == ("P2", 0.1, False)
    assert first.threshold == 0.5


def test_recall_at_exactly_the_threshold() -> None:
    (study,) = aggregate_studies([_score("1.1", 0.5)], "max", threshold=0.5)
    assert study.recall_recommended
    with pytest.raises(ValueError):
        aggregate_studies([_score("1.1", 0.5)], "max", threshold=2.0)


def test_no_images_no_studies() -> None:
    assert aggregate_studies([], "pagg", 0.5) == []
