"""`mammonode train/evaluate --layout idc|folders`: histology patch classifiers (seeds 002 and 004).

The recipe differs from the mammography one where the data differ: every patch is its own
sampling unit, classes are balanced by loss weights (seed 002's class weights) rather than by
balanced sampling, and the split keeps each patient (IDC) or group (class folders) on one side.
Otherwise it is the same loop, the same model family (GAP + one linear unit, so patches get a
CAM too) and the same model folder: the threshold is chosen on the validation patches scored by
the serving backend, and the manifest names the data, the command and the validation figures.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from inference.backends.loader import load_backend
from inference.bundled import resolve_model_dir
from inference.manifest import ModelManifest, save_manifest
from inference.types import InputError, PreprocessConfig
from training.datasets.histology import PatchDataset, PatchRecord, load_layout
from training.metrics import binary_metrics, threshold_for_sensitivity
from training.plots import write_training_curves

if TYPE_CHECKING:
    from inference.backends.base import Backend
    from training.loop_types import TrainResult
    from training.request import TrainRequest

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("idc", "folders")
METRIC_KEYS: tuple[str, ...] = (
    "roc_auc",
    "pf1",
    "precision",
    "recall",
    "f1",
    "sensitivity",
    "specificity",
    "confusion_matrix",
    "threshold",
)
_GROUP_NOUN = {"idc": "patients", "folders": "groups"}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown histology layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def split_groups(
    records: Sequence[PatchRecord], val_fraction: float, seed: int
) -> tuple[list[PatchRecord], list[PatchRecord]]:
    """Train and validation patches, no group on both sides, both classes on both sides.

    First :func:`training.sampler.split_by_patient` stratified by "has a malignant patch". In
    the real IDC set nearly every patient has malignant patches, so that stratification often
    cannot work; the fallback stratifies by the upper and lower half of the groups ranked by
    malignant fraction, which still spreads malignant-rich and malignant-poor patients over both
    sides. Either way at least 4 groups are needed.
    """
    from training.sampler import split_by_patient

    groups = [r.group for r in records]
    labels = [float(r.label) for r in records]
    try:
        train_ids, val_ids = split_by_patient(groups, labels, val_fraction, seed)
    except ValueError as first:
        fractions: dict[str, list[float]] = {}
        for group, label in zip(groups, labels, strict=True):
            fractions.setdefault(group, []).append(label)
        mean = {g: float(np.mean(v)) for g, v in fractions.items()}
        ranked = sorted(mean, key=lambda g: (mean[g], g))
        upper = set(ranked[len(ranked) // 2 :])
        try:
            train_ids, val_ids = split_by_patient(
                groups, [float(g in upper) for g in groups], val_fraction, seed
            )
        except ValueError:
            raise InputError(f"cannot split {len(mean)} groups into train and validation: {first}") from None
        logger.info("stratified the split by malignant fraction instead (%s)", first)
    val_set = set(val_ids)
    train = [r for r in records if r.group not in val_set]
    val = [r for r in records if r.group in val_set]
    for name, part in (("training", train), ("validation", val)):
        if len({r.label for r in part}) < 2:
            raise InputError(f"the {name} split has only one class; add patients/groups of both classes")
    logger.info(
        "split %d groups: %d train (%d patches), %d validation (%d patches)",
        len(set(groups)),
        len(train_ids),
        len(train),
        len(val_ids),
        len(val),
    )
    return train, val


def _warn_if_upsampling(records: Sequence[PatchRecord], size: tuple[int, int]) -> None:
    """Histology patches are small (IDC 50x50); a mammography-sized grid is almost surely a mistake."""
    shapes = []
    for record in records[:: max(1, len(records) // 16)][:16]:
        image = cv2.imread(str(record.path), cv2.IMREAD_UNCHANGED)
        if image is not None:
            shapes.append(image.shape[:2])
    if not shapes:
        return
    median_h, median_w = (float(np.median([s[i] for s in shapes])) for i in (0, 1))
    if size[0] > 2 * median_h and size[1] > 2 * median_w:
        logger.warning(
            "--input-size %dx%d enlarges the typical %dx%d patch more than twice; "
            "pass the patch size (e.g. --input-size 48x48 for IDC's 50x50 patches)",
            size[0],
            size[1],
            median_h,
            median_w,
        )


def score_patches(
    backend: Backend,
    dataset: PatchDataset,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Malignancy probabilities (N,) float64 from a serving backend, in dataset order.

    ``progress`` is called after each batch with the number of patches it scored.
    """
    probs: list[np.ndarray] = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        logits, _ = backend.infer(dataset.batch(indices))
        probs.append(0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64))))  # sigmoid, no overflow
        if progress is not None:
            progress(len(indices))
    return np.concatenate(probs) if probs else np.zeros(0)


def _level_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    metrics = binary_metrics(labels, probs, threshold)
    return {k: metrics[k] for k in (*METRIC_KEYS, "n", "n_pos")}


def patient_table(
    records: Sequence[PatchRecord], probs: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per group: ID, label (1 if any patch is malignant) and mean patch probability."""
    by_group: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_group.setdefault(record.group, []).append(i)
    ids = sorted(by_group)
    labels = np.asarray([max(records[i].label for i in by_group[g]) for g in ids], dtype=np.float64)
    scores = np.asarray([float(np.mean(probs[by_group[g]])) for g in ids], dtype=np.float64)
    return ids, labels, scores


def histology_metrics(
    records: Sequence[PatchRecord], probs: np.ndarray, threshold: float, layout: str
) -> dict[str, dict[str, Any]]:
    """``patch`` metrics, plus ``patient`` metrics (mean of patch probabilities) for IDC."""
    labels = np.asarray([r.label for r in records], dtype=np.float64)
    out = {"patch": _level_metrics(labels, probs, threshold)}
    if layout == "idc":
        _, patient_labels, patient_scores = patient_table(records, probs)
        out["patient"] = _level_metrics(patient_labels, patient_scores, threshold)
        out["patient"]["aggregation"] = "mean"
        out["patient"]["label_rule"] = "malignant if any of the patient's patches is"
    return out


def choose_threshold(labels: Sequence[float], probs: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold reaching the target sensitivity; 0.5 when there is no malignant patch."""
    if not any(float(y) >= 0.5 for y in labels):
        logger.warning("no malignant validation patch: keeping threshold 0.5")
        return 0.5
    return threshold_for_sensitivity(labels, probs, target_sensitivity)


def run_histology_train(request: TrainRequest) -> Path:
    """Train a patch classifier and write ``request.out / "model"``; returns that folder."""

    from inference.model import build_model
    from inference.model_io import save_model
    from training.checkpoint import load_checkpoint_weights
    from training.ddp import launched_as_worker
    from training.loop import train
    from training.transforms import AugmentConfig

    _check_layout(request.layout)
    size = request.input_size
    records = load_layout(request.dataset, request.layout)
    _warn_if_upsampling(records, size)
    train_records, val_records = split_groups(records, request.val_fraction, request.seed)
    train_set, val_set = PatchDataset(train_records, size), PatchDataset(val_records, size)
    for dataset in (train_set, val_set):
        dataset.preload(request.workers)

    config = request.loop_config(
        class_weighting="balanced",  # seed 002's class weights
        balanced_sampling=False,  # weights already balance; both would over-weight malignant
        # Seed 002's ImageDataGenerator: rotation 20 degrees, shift 0.1, small shear, flips.
        augmentation=AugmentConfig(max_rotation_deg=20.0, max_translate=0.1, max_shear_deg=3.0),
    )
    result = train(config, train_set, val_set, lambda: request.initial_model(in_chans=3))
    if launched_as_worker():  # torchrun: rank 0 alone turns the best checkpoint into the model
        return request.out / "model"

    model = load_checkpoint_weights(build_model(request.architecture, in_chans=3), result.best_checkpoint)

    model_dir = request.out / "model"
    draft = save_model(
        model,
        ModelManifest(
            name=request.name,
            version=request.version,
            architecture=request.architecture,
            in_chans=3,
            preprocess=PreprocessConfig(input_height=size[0], input_width=size[1]),
            threshold=0.5,
            aggregation="mean",
            synthetic_training_data=request.synthetic,
            created=dt.date.today().isoformat(),
        ),
        model_dir,
    )
    manifest, figures = _validated_manifest(
        request, draft, model_dir, val_set, train_records, val_records, result
    )
    threshold = manifest.threshold
    save_manifest(manifest, model_dir)
    write_training_curves(result.history, request.out)
    patch = figures["patch"]
    logger.info(
        "validation patches: AUC %.3f, sensitivity %.3f, specificity %.3f at threshold %.3f",
        patch["roc_auc"],
        patch["sensitivity"],
        patch["specificity"],
        threshold,
    )
    return model_dir


def _validated_manifest(
    request: TrainRequest,
    draft: ModelManifest,
    model_dir: Path,
    val_set: PatchDataset,
    train_records: Sequence[PatchRecord],
    val_records: Sequence[PatchRecord],
    result: TrainResult,
) -> tuple[ModelManifest, dict[str, dict[str, Any]]]:
    """The draft manifest with threshold, data and validation figures; and those figures."""
    size = request.input_size
    # Threshold and figures come from the saved model through the serving backend, so they
    # describe exactly what `mammonode evaluate` and the node will run.
    probs = score_patches(load_backend("torch", model_dir), val_set)
    threshold = choose_threshold(val_set.labels, probs, request.target_sensitivity)
    figures = histology_metrics(val_records, probs, threshold, request.layout)
    noun = _GROUP_NOUN[request.layout]
    train_groups = len({r.group for r in train_records})
    val_groups = len({r.group for r in val_records})
    described = (
        f"validation split of {request.dataset.name} ({len(val_records)} patches, {val_groups} {noun})"
    )
    metrics: dict[str, Any] = {
        f"validation_{level}": {
            "measured_on": described,
            "threshold_rule": (
                f"highest threshold reaching patch sensitivity {request.target_sensitivity} on validation"
            ),
            **values,
        }
        for level, values in figures.items()
    }
    manifest = replace(
        draft,
        threshold=float(threshold),
        training_data={
            "dataset": request.dataset.name,
            "layout": request.layout,
            "patch_size": [size[0], size[1]],
            "patches_train": len(train_records),
            "patches_validation": len(val_records),
            "malignant_patches_train": sum(r.label for r in train_records),
            "malignant_patches_validation": sum(r.label for r in val_records),
            f"{noun}_train": train_groups,
            f"{noun}_validation": val_groups,
            "split": f"by {noun[:-1]}, validation fraction {request.val_fraction}, seed {request.seed}",
            "class_weighting": "balanced (BCE pos_weight = benign / malignant training patches)",
            "command": "mammonode " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
        },
        metrics=metrics,
    )
    return manifest, figures


def evaluate_histology(
    root: Path,
    model_dir: Path | None,
    layout: str,
    *,
    backend: str = "torch",
    target_sensitivity: float = 0.9,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score a labelled patch set with a model folder; metrics at the model's threshold.

    Returns ``patch`` (and for IDC ``patient``, the mean of each patient's patch probabilities)
    with the keys of :data:`METRIC_KEYS` plus ``threshold_at_sensitivity``, then ``measured_on``
    and ``model`` saying what was measured with what. ``on_total`` is called once with the
    number of patches to score, ``progress`` after each batch with the number scored.
    """
    _check_layout(layout)
    engine = load_backend(backend, resolve_model_dir(model_dir))
    manifest = engine.manifest
    if manifest.in_chans != 3:
        raise InputError(f"model {manifest.name} takes {manifest.in_chans} channel(s); patches are RGB")
    size = (manifest.preprocess.input_height, manifest.preprocess.input_width)
    records = load_layout(root, layout)
    dataset = PatchDataset(records, size)
    dataset.preload(workers)
    if on_total is not None:
        on_total(len(dataset))
    probs = score_patches(engine, dataset, progress=progress)
    report: dict[str, Any] = histology_metrics(records, probs, manifest.threshold, layout)
    report["patch"]["threshold_at_sensitivity"] = _threshold_or_nan(
        np.asarray(dataset.labels), probs, target_sensitivity
    )
    if "patient" in report:
        _, patient_labels, patient_scores = patient_table(records, probs)
        report["patient"]["threshold_at_sensitivity"] = _threshold_or_nan(
            patient_labels, patient_scores, target_sensitivity
        )
    report["target_sensitivity"] = target_sensitivity
    report["measured_on"] = {
        "dataset": str(root),
        "layout": layout,
        "patches": len(records),
        _GROUP_NOUN[layout]: len({r.group for r in records}),
    }
    report["model"] = {
        "name": manifest.name,
        "version": manifest.version,
        "weights_sha256": manifest.weights_sha256,
        "backend": backend,
    }
    return report


def _threshold_or_nan(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Suggested threshold for the target sensitivity; nan without malignant cases."""
    return threshold_for_sensitivity(labels, scores, target) if bool((labels >= 0.5).any()) else math.nan


def format_histology_report(report: dict[str, Any]) -> str:
    """A human-readable summary of :func:`evaluate_histology`'s report."""
    keys = [k for k in METRIC_KEYS if k != "confusion_matrix"]
    measured = report["measured_on"]
    lines = [
        f"model {report['model']['name']} {report['model']['version']} "
        f"(sha256 {report['model']['weights_sha256'][:12]}) on {measured['dataset']}: "
        f"{measured['patches']} patches ({measured['layout']} layout)",
        "level    " + " ".join(f"{k:>11}" for k in keys),
    ]
    levels = [level for level in ("patch", "patient") if level in report]
    for level in levels:
        lines.append(f"{level:<8} " + " ".join(f"{_fmt(report[level].get(k)):>11}" for k in keys))
    for level in levels:
        lines.append(f"{level} confusion [[tn, fp], [fn, tp]]: {report[level]['confusion_matrix']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)
