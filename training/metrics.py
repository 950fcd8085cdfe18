"""Evaluation metrics for binary screening classifiers and their class-activation maps.

Only numpy is used so the CLI can report metrics without scikit-learn, and so the exact
definitions (ties, empty classes, the RSNA probabilistic F1) are written down here rather than
inherited from a library default. The tests check every function against scikit-learn.

Conventions:

* ``labels`` are 0/1 (anything ``>= 0.5`` counts as positive); ``probs``/``scores`` are floats.
* A prediction is positive when ``prob >= threshold``.
* Quantities that are undefined for the data (AUC with one class, recall without positives)
  are ``nan`` rather than a made-up 0 or 1, so an empty class cannot pass for a good or bad
  model. Precision without predicted positives is 0, as in scikit-learn's ``zero_division=0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def _labels(labels: ArrayLike) -> NDArray[np.bool_]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(y)):
        raise ValueError("labels must be finite numbers (0 or 1)")
    return y >= 0.5


def _pair(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.bool_], FloatArray]:
    y = _labels(labels)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} != {s.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def _safe_div(num: float, den: float, undefined: float = math.nan) -> float:
    return float(num) / float(den) if den else undefined


def pf1(labels: ArrayLike, probs: ArrayLike, beta: float = 1.0) -> float:
    """Probabilistic F-beta of the RSNA Screening Mammography challenge (Kaggle 2023).

    Each prediction counts as a fractional true or false positive, so the metric rewards
    calibrated confidence without picking a threshold. Probabilities are clipped to [0, 1] as
    in the reference implementation. Returns ``nan`` without positives (recall undefined) and 0
    when the probabilistic precision or recall is 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    y, p = _pair(labels, probs)
    p = np.clip(p, 0.0, 1.0)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    ctp = float(p[y].sum())
    cfp = float(p[~y].sum())
    precision = _safe_div(ctp, ctp + cfp, 0.0)
    recall = ctp / n_pos
    if precision <= 0 or recall <= 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


def _average_ranks(values: FloatArray) -> FloatArray:
    """1-based ranks with ties sharing their average rank (scipy's ``rankdata`` 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], sorted_vals.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Tied scores count one half, which equals the trapezoidal area under the curve.
    ``nan`` when only one class is present.
    """
    y, s = _pair(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _counts_by_threshold(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray, int, int]:
    """True/false positive counts at every distinct score used as threshold, highest first."""
    y, s = _pair(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order].astype(np.float64)
    # Last index of each run of equal scores: the threshold includes the whole run.
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    n_pos = int(y.sum())
    return tps, fps, s_sorted[last], n_pos, y.size - n_pos


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """ROC curve as ``(fpr, tpr)``, ordered by decreasing threshold, starting at (0, 0).

    One point per distinct score (scikit-learn's curve with ``drop_intermediate=False``, without
    the thresholds: operating points are chosen with :func:`threshold_for_sensitivity`). A rate
    whose class is absent is ``nan``.
    """
    tps, fps, _, n_pos, n_neg = _counts_by_threshold(labels, scores)
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    return fpr, tpr


def _precision_recall(labels: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray]:
    tps, fps, _, n_pos, _ = _counts_by_threshold(labels, scores)
    precision = tps / (tps + fps)  # tps + fps >= 1 at every distinct score
    recall = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    return np.r_[1.0, precision], np.r_[0.0, recall]


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the step PR curve, ``sum (R_n - R_{n-1}) P_n`` (scikit-learn's definition).

    ``nan`` without positives.
    """
    return pr_curve(labels, scores)[2]


def pr_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray, float]:
    """Precision-recall curve as ``(recall, precision, average_precision)``.

    The triple is what :func:`training.plots.plot_pr` draws. Points are ordered by decreasing
    threshold, one per distinct score, preceded by (recall 0, precision 1) so the step curve
    starts at the left edge. Recall (and AP) are ``nan`` without positives.
    """
    precision, recall = _precision_recall(labels, scores)
    ap = math.nan if np.isnan(recall).any() else float(np.sum(np.diff(recall) * precision[1:]))
    return recall, precision, ap


def confusion(labels: ArrayLike, preds: ArrayLike) -> list[list[int]]:
    """Confusion matrix ``[[tn, fp], [fn, tp]]`` (scikit-learn layout), as plain ints for JSON."""
    y = _labels(labels)
    p = _labels(preds)
    if y.shape != p.shape:
        raise ValueError(f"labels and preds differ in length: {y.size} != {p.size}")
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    fn = int(np.sum(y & ~p))
    tn = int(np.sum(~y & ~p))
    return [[tn, fp], [fn, tp]]


def binary_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Threshold-dependent and threshold-free metrics in one JSON-friendly dict.

    Keys: precision, recall, f1, sensitivity (= recall), specificity, confusion_matrix,
    threshold, roc_auc, pf1, n, n_pos.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    y, p = _pair(labels, probs)
    (tn, fp), (fn, tp) = confusion(y, p >= threshold)
    precision = _safe_div(tp, tp + fp, 0.0)
    recall = _safe_div(tp, tp + fn)
    specificity = _safe_div(tn, tn + fp)
    f1 = math.nan if math.isnan(recall) else _safe_div(2 * precision * recall, precision + recall, 0.0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "sensitivity": recall,
        "specificity": specificity,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
        "roc_auc": roc_auc(y, p),
        "pf1": pf1(y, p),
        "n": int(y.size),
        "n_pos": int(y.sum()),
    }


def threshold_for_sensitivity(labels: ArrayLike, probs: ArrayLike, target: float) -> float:
    """The highest threshold whose sensitivity (``prob >= t``) reaches ``target``.

    This is the operating point a screening site asks for ("recall 90% of cancers, flag as few
    normals as possible"). It is the k-th highest positive probability with
    ``k = ceil(target * n_pos)``.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = _pair(labels, probs)
    pos = np.sort(p[y])[::-1]
    if pos.size == 0:
        raise ValueError("threshold_for_sensitivity needs at least one positive label")
    # The epsilon keeps 0.9 * 10 (= 9.000000000000002) from asking for a 10th positive.
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


def _as_maps(maps: Sequence[ArrayLike] | NDArray[Any], name: str) -> list[NDArray[Any]]:
    out = [np.asarray(m) for m in maps]
    for i, m in enumerate(out):
        if m.ndim != 2:
            raise ValueError(f"{name}[{i}] must be 2-D (h, w), got shape {m.shape}")
    return out


def pointing_game(
    cam_maps: Sequence[ArrayLike] | NDArray[Any],
    masks: Sequence[ArrayLike] | NDArray[Any],
    tolerance_px: float = 0.0,
) -> float:
    """Fraction of lesion images whose CAM maximum lies on (or near) the lesion.

    The pointing game needs no threshold, which suits CAMs whose scale is arbitrary. A map may be
    coarser than its mask (the feature grid): its argmax cell centre is then scaled to mask
    pixels, and ``tolerance_px`` (Euclidean, in mask pixels) absorbs the cell size. Images
    without a lesion are skipped; ``nan`` when no image has one.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    maps = _as_maps(cam_maps, "cam_maps")
    mask_list = _as_maps(masks, "masks")
    if len(maps) != len(mask_list):
        raise ValueError(f"{len(maps)} maps but {len(mask_list)} masks")
    hits = 0
    counted = 0
    for cam, mask in zip(maps, mask_list, strict=True):
        if not mask.any():
            continue
        counted += 1
        hits += lands_on(mask, cam_peak(cam, mask.shape), tolerance_px)
    return hits / counted if counted else math.nan


def cam_peak(cam: NDArray[Any], shape: tuple[int, ...]) -> tuple[float, float]:
    """The centre of the argmax cell of ``cam`` in the pixel coordinates of an array of ``shape``
    (a map may be coarser than the mask it is compared with). NaN never wins."""
    values = np.nan_to_num(np.asarray(cam).astype(np.float64), nan=-np.inf)
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return (
        (y + 0.5) * shape[0] / values.shape[0] - 0.5,
        (x + 0.5) * shape[1] / values.shape[1] - 0.5,
    )


def lands_on(mask: NDArray[Any], point: tuple[float, float], tolerance_px: float) -> bool:
    """Whether ``point`` (y, x) lies on ``mask`` or within ``tolerance_px`` (Euclidean) of it."""
    where = np.argwhere(np.asarray(mask).astype(bool))
    if where.size == 0:
        return False
    dist2 = (where[:, 0] - point[0]) ** 2 + (where[:, 1] - point[1]) ** 2
    return bool(float(dist2.min()) <= tolerance_px**2 + 1e-9)


def dice(binary_pred: ArrayLike, mask: ArrayLike) -> float:
    """Dice overlap ``2|A∩B| / (|A| + |B|)``; 1.0 when both are empty (perfect agreement)."""
    a = np.asarray(binary_pred).astype(bool)
    b = np.asarray(mask).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction and mask shapes differ: {a.shape} != {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.sum(a & b)) / total


def mean_dice(
    binary_preds: Sequence[ArrayLike] | NDArray[Any],
    masks: Sequence[ArrayLike] | NDArray[Any],
    lesion_only: bool = True,
) -> float:
    """Mean Dice over image pairs.

    With ``lesion_only`` (default) images without a lesion are skipped, because on a screening
    set the many empty-and-empty normals would otherwise score 1.0 and hide poor localisation.
    ``nan`` when nothing is counted.
    """
    preds = list(binary_preds)
    mask_list = list(masks)
    if len(preds) != len(mask_list):
        raise ValueError(f"{len(preds)} predictions but {len(mask_list)} masks")
    scores = [
        dice(p, m)
        for p, m in zip(preds, mask_list, strict=True)
        if not lesion_only or np.asarray(m).astype(bool).any()
    ]
    return float(np.mean(scores)) if scores else math.nan
