"""Metrics against scikit-learn references and hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training.metrics import (
    average_precision,
    binary_metrics,
    confusion,
    dice,
    mean_dice,
    pf1,
    pointing_game,
    pr_curve,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
)


def _kaggle_pfbeta(labels: list[int], predictions: list[float], beta: float) -> float:
    """The RSNA 2023 host's reference implementation, copied loop for loop."""
    y_true_count = 0
    ctp = 0.0
    cfp = 0.0
    for idx in range(len(labels)):
        prediction = min(max(predictions[idx], 0), 1)
        if labels[idx]:
            y_true_count += 1
            ctp += prediction
        else:
            cfp += prediction
    beta_squared = beta * beta
    c_precision = ctp / (ctp + cfp)
    c_recall = ctp / y_true_count
    if c_precision > 0 and c_recall > 0:
        return (1 + beta_squared) * (c_precision * c_recall) / (beta_squared * c_precision + c_recall)
    return 0.0


@pytest.fixture
def tied_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.2
    # Coarse rounding creates many ties, some of them across classes.
    scores = np.round(rng.random(300) * 0.6 + labels * 0.3, 1)
    return labels.astype(int), scores


def test_pf1_hand_example() -> None:
    # pTP = 0.9 + 0.4 = 1.3, pFP = 0.2 + 0.1 = 0.3 -> precision 1.3/1.6, recall 1.3/2.
    got = pf1([1, 1, 0, 0], [0.9, 0.4, 0.2, 0.1])
    precision, recall = 1.3 / 1.6, 1.3 / 2
    assert got == pytest.approx(2 * precision * recall / (precision + recall))


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_pf1_matches_kaggle_reference(beta: float, tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    probs = scores * 1.4 - 0.1  # some outside [0, 1]: both must clip
    assert pf1(labels, probs, beta) == pytest.approx(_kaggle_pfbeta(list(labels), list(probs), beta))


def test_pf1_edge_cases() -> None:
    assert math.isnan(pf1([0, 0], [0.3, 0.2]))
    assert pf1([1, 0], [0.0, 0.0]) == 0.0
    assert pf1([1, 0], [1.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="beta"):
        pf1([1], [1.0], beta=0)


def test_roc_auc_matches_sklearn_with_ties(tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    # All scores tied: chance level exactly.
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)


def test_roc_auc_one_class_is_nan() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))


def test_roc_curve_matches_sklearn(tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    fpr, tpr = roc_curve(labels, scores)
    ref_fpr, ref_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_pr_curve_and_average_precision_match_sklearn(tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    recall, precision, ap = pr_curve(labels, scores)
    ref_p, ref_r, _ = skm.precision_recall_curve(labels, scores, drop_intermediate=False)
    # scikit-learn orders by increasing threshold and ends with (P=1, R=0); ours is reversed.
    np.testing.assert_allclose(precision[1:], ref_p[:-1][::-1])
    np.testing.assert_allclose(recall[1:], ref_r[:-1][::-1])
    assert (precision[0], recall[0]) == (1.0, 0.0)
    assert ap == pytest.approx(skm.average_precision_score(labels, scores))
    assert average_precision(labels, scores) == ap
    assert math.isnan(pr_curve([0, 0], [0.1, 0.2])[2])


def test_confusion_layout_matches_sklearn() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1]
    preds = [0, 1, 1, 0, 1, 1, 1]
    assert confusion(labels, preds) == [[1, 2], [1, 3]]
    assert confusion(labels, preds) == skm.confusion_matrix(labels, preds).tolist()
    with pytest.raises(ValueError, match="length"):
        confusion([0, 1], [1])


def test_binary_metrics_match_sklearn(tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    thr = 0.5
    preds = scores >= thr
    got = binary_metrics(labels, scores, thr)
    assert got["precision"] == pytest.approx(skm.precision_score(labels, preds))
    assert got["recall"] == pytest.approx(skm.recall_score(labels, preds))
    assert got["sensitivity"] == got["recall"]
    assert got["f1"] == pytest.approx(skm.f1_score(labels, preds))
    tn, fp = got["confusion_matrix"][0]
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["confusion_matrix"] == skm.confusion_matrix(labels, preds).tolist()
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert got["n"] == 300
    assert got["n_pos"] == int(labels.sum())
    assert got["threshold"] == thr
    assert got["pf1"] == pytest.approx(pf1(labels, scores))


def test_binary_metrics_threshold_is_inclusive_and_undefined_is_nan() -> None:
    got = binary_metrics([1, 0], [0.5, 0.49], threshold=0.5)
    assert got["confusion_matrix"] == [[1, 0], [0, 1]]
    only_neg = binary_metrics([0, 0], [0.1, 0.2], threshold=0.5)
    assert math.isnan(only_neg["recall"]) and math.isnan(only_neg["roc_auc"])
    assert only_neg["precision"] == 0.0 and only_neg["specificity"] == 1.0


def test_threshold_for_sensitivity_is_highest_reaching_target() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0]
    probs = [0.9, 0.8, 0.3, 0.6, 0.7, 0.2, 0.1]
    assert threshold_for_sensitivity(labels, probs, 0.5) == 0.8
    assert threshold_for_sensitivity(labels, probs, 0.75) == 0.6
    assert threshold_for_sensitivity(labels, probs, 1.0) == 0.3


def test_threshold_for_sensitivity_property(tied_scores: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = tied_scores
    for target in (0.1, 0.5, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(labels, scores, target)
        assert binary_metrics(labels, scores, t)["sensitivity"] >= target
        higher = scores[scores > t]
        if higher.size:  # the next distinct score above misses the target
            assert binary_metrics(labels, scores, higher.min())["sensitivity"] < target
    # Floating point: 0.9 * 10 positives must need 9, not 10.
    ten = np.arange(10) / 10
    assert threshold_for_sensitivity(np.ones(10), ten, 0.9) == pytest.approx(0.1)


def test_threshold_for_sensitivity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity([1, 0], [0.1, 0.2], 0.0)


def test_pointing_game_hits_misses_and_tolerance() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    hit = np.zeros((8, 8))
    hit[3, 3] = 1.0
    near = np.zeros((8, 8))
    near[3, 6] = 1.0  # two columns right of the lesion edge (column 3)
    empty_mask = np.zeros((8, 8), bool)
    assert pointing_game([hit], [mask]) == 1.0
    assert pointing_game([near], [mask]) == 0.0
    assert pointing_game([near], [mask], tolerance_px=3) == 1.0
    # The image without lesion does not count, whatever its map.
    assert pointing_game([hit, near, near], [mask, mask, empty_mask]) == 0.5
    assert math.isnan(pointing_game([near], [empty_mask]))


def test_pointing_game_scales_coarse_maps_to_mask() -> None:
    mask = np.zeros((64, 32), bool)
    mask[40:48, 20:28] = True
    cam = np.zeros((8, 4))
    cam[5, 2] = 1.0  # cell covering rows 40..47, cols 16..23 -> centre (43.5, 19.5)
    assert pointing_game([cam], [mask]) == 0.0  # centre column 19.5 is just outside
    assert pointing_game([cam], [mask], tolerance_px=1) == 1.0
    cam_miss = np.zeros((8, 4))
    cam_miss[0, 0] = 1.0
    assert pointing_game(np.stack([cam, cam_miss]), np.stack([mask, mask]), tolerance_px=1) == 0.5


def test_dice_and_mean_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :2] = True  # 2 px
    b[0, 1:4] = True  # 3 px, overlap 1
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert dice(a, np.zeros((4, 4))) == 0.0
    empty = np.zeros((4, 4), bool)
    assert mean_dice([a, b, a], [b, b, empty]) == pytest.approx((0.4 + 1.0) / 2)
    assert mean_dice([a, b, a], [b, b, empty], lesion_only=False) == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert math.isnan(mean_dice([a], [empty]))
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))
