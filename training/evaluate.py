"""Evaluation of a model on a labelled dataset, at image and breast level, plus CAM localisation.

It scores through an :mod:`inference.backends` backend, so the numbers describe what the node
would output, not a training-time shortcut. Every report names the data it was measured on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.aggregation import AGGREGATIONS, aggregate
from inference.backends.base import Backend
from inference.cam import cam_to_grid, threshold_cam
from training import metrics, plots
from training.datasets.mammo import MammoSample

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Image-level outputs of a backend over a list of samples."""

    probabilities: np.ndarray  # (N,)
    cams: list[np.ndarray]  # feature-grid CAMs


def predict_samples(
    backend: Backend,
    samples: Sequence[MammoSample],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Run the backend over the samples in batches; the logit goes through a sigmoid.

    ``progress`` is called after each batch with the number of samples it scored.
    """
    probs: list[float] = []
    cams: list[np.ndarray] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = np.stack([s.pixels.astype(np.float32)[None] for s in chunk])
        logits, cam = backend.infer(batch)
        probs.extend((1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).tolist())
        cams.extend(list(cam))
        if progress is not None:
            progress(len(chunk))
    return Predictions(np.asarray(probs), cams)


def breast_table(
    samples: Sequence[MammoSample], probabilities: np.ndarray
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Group image probabilities per prediction ID; returns IDs, labels and each aggregation."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.prediction_id].append(i)
    ids = sorted(groups)
    labels = np.asarray([max(samples[i].label for i in groups[pid]) for pid in ids])
    scores = {
        method: np.asarray([aggregate([float(probabilities[i]) for i in groups[pid]], method) for pid in ids])
        for method in AGGREGATIONS
    }
    return ids, labels, scores


def content_cam(sample: MammoSample, cam: np.ndarray) -> np.ndarray:
    """The CAM on the model grid with the padding pushed below every real value, so its argmax
    (the CAM peak the pointing game uses) always falls on the image."""
    grid = cam_to_grid(cam, sample.pixels.shape)
    return np.where(content_mask(sample), grid, grid.min() - 1.0)


def content_mask(sample: MammoSample) -> np.ndarray:
    """The model-grid pixels that show the image (not the padding)."""
    content = np.zeros(sample.pixels.shape, dtype=bool)
    rh, rw = sample.transform.resized_shape
    t = sample.transform
    content[t.pad_top : t.pad_top + rh, t.pad_left : t.pad_left + rw] = True
    return content


def cam_localisation(
    samples: Sequence[MammoSample], cams: Sequence[np.ndarray], tolerance_px: int
) -> dict[str, Any]:
    """Pointing game and Dice of the seed-003 thresholded CAM against lesion masks, on the model grid.

    Only images that have a lesion mask count. The tolerance is in model-grid pixels.
    """
    maps, masks, binaries = [], [], []
    for sample, cam in zip(samples, cams, strict=True):
        if sample.mask is None or not sample.mask.any():
            continue
        maps.append(content_cam(sample, cam))
        masks.append(sample.mask)
        binaries.append(cam_to_grid(threshold_cam(cam), sample.pixels.shape) > 0)
    if not masks:
        return {"pointing_game": None, "dice": None, "n_images": 0, "tolerance_px": tolerance_px}
    return {
        "pointing_game": metrics.pointing_game(maps, masks, tolerance_px),
        "dice": float(np.mean([metrics.dice(b, m) for b, m in zip(binaries, masks, strict=True)])),
        "n_images": len(masks),
        "tolerance_px": tolerance_px,
    }


def evaluate_predictions(
    samples: Sequence[MammoSample],
    predictions: Predictions,
    *,
    threshold: float,
    aggregation: str,
    target_sensitivity: float = 0.9,
    cam_tolerance_px: int = 16,
) -> dict[str, Any]:
    """The evaluation report: `image`, `breast`, `cam` and a comparison of the aggregations."""
    image_labels = np.asarray([s.label for s in samples])
    image = metrics.binary_metrics(image_labels, predictions.probabilities, threshold)
    image["threshold_at_sensitivity"] = metrics.threshold_for_sensitivity(
        image_labels, predictions.probabilities, target_sensitivity
    )
    _, breast_labels, scores = breast_table(samples, predictions.probabilities)
    breast = metrics.binary_metrics(breast_labels, scores[aggregation], threshold)
    breast["aggregation"] = aggregation
    breast["threshold_at_sensitivity"] = metrics.threshold_for_sensitivity(
        breast_labels, scores[aggregation], target_sensitivity
    )
    comparison = {
        method: {
            "roc_auc": metrics.roc_auc(breast_labels, s),
            "pf1": metrics.pf1(breast_labels, s),
            **{k: v for k, v in metrics.binary_metrics(breast_labels, s, threshold).items() if k in ("f1",)},
        }
        for method, s in scores.items()
    }
    return {
        "image": image,
        "breast": breast,
        "aggregations": comparison,
        "cam": cam_localisation(samples, predictions.cams, cam_tolerance_px),
        "target_sensitivity": target_sensitivity,
    }


def write_plots(
    samples: Sequence[MammoSample], predictions: Predictions, aggregation: str, out_dir: Path
) -> list[Path]:
    """ROC and PR curves of the image and breast levels as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image_labels = np.asarray([s.label for s in samples])
    _, breast_labels, scores = breast_table(samples, predictions.probabilities)
    levels = {
        "image": (image_labels, predictions.probabilities),
        f"breast ({aggregation})": (breast_labels, scores[aggregation]),
    }
    roc = {}
    pr = {}
    for name, (labels, probs) in levels.items():
        fpr, tpr = metrics.roc_curve(labels, probs)
        roc[name] = (fpr, tpr, metrics.roc_auc(labels, probs))
        pr[name] = metrics.pr_curve(labels, probs)
    paths = [out_dir / "roc.png", out_dir / "pr.png"]
    plots.plot_roc(roc, paths[0])
    plots.plot_pr(pr, paths[1])
    return paths
