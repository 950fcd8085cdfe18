"""The mammography recipe behind `mammonode train` and `mammonode evaluate` (RSNA layout).

Training: load the dataset, split by patient, preprocess through the serving code, run the
seed-003 loop, choose the operating threshold on the validation breasts, and write a model folder
whose manifest names the data, the command and the validation figures. Evaluation: score a
labelled dataset through a serving backend and report image, breast and CAM metrics.
:mod:`training.dispatch` picks this recipe or the histology one by layout.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.aggregation import AGGREGATIONS
from inference.backends.loader import load_backend
from inference.bundled import resolve_model_dir
from inference.manifest import ModelManifest, save_manifest
from inference.types import InputError, PreprocessConfig
from training.datasets.distractors import distractor_mask_path
from training.datasets.mammo import load_samples
from training.datasets.rsna import lesion_mask_path, load_rsna
from training.distractor_eval import distractor_report, format_distractors
from training.evaluate import breast_table, evaluate_predictions, predict_samples, write_plots
from training.metrics import binary_metrics, threshold_for_sensitivity
from training.plots import write_training_curves

# torch (and timm) are imported inside the training functions: `mammonode evaluate` with the
# onnxruntime backend runs this module on a serving install without them.
if TYPE_CHECKING:
    from training.loop_types import TrainResult
    from training.request import TrainRequest

log = logging.getLogger(__name__)


def _rsna_samples(root: Path, config: PreprocessConfig, workers: int) -> list[Any]:
    records = load_rsna(root)
    masks = [lesion_mask_path(root, r) for r in records]
    distractors = [distractor_mask_path(root, r.patient_id, r.image_id) for r in records]
    samples, errors = load_samples(
        records, config, mask_paths=masks, distractor_paths=distractors, workers=workers
    )
    if not samples:
        raise InputError(f"no usable images in {root} ({len(errors)} failed)")
    return samples


def _split_samples(request: TrainRequest, samples: list[Any]) -> tuple[list[Any], list[Any], int, int]:
    """Train and validation samples split by patient, and the number of patients on each side."""
    from training.sampler import split_by_patient

    patients = [str(s.record.patient_id) for s in samples]
    labels = [s.label for s in samples]
    train_patients, val_patients = split_by_patient(patients, labels, request.val_fraction, request.seed)
    train_ids, val_ids = set(train_patients), set(val_patients)
    train_samples = [s for s in samples if str(s.record.patient_id) in train_ids]
    val_samples = [s for s in samples if str(s.record.patient_id) in val_ids]
    log.info("training on %d images, validating on %d", len(train_samples), len(val_samples))
    return train_samples, val_samples, len(train_patients), len(val_patients)


def run_mammo_train(request: TrainRequest) -> Path:
    """Train and write ``request.out / "model"``; returns that folder."""
    from inference.model import build_model
    from inference.model_io import save_model
    from training.checkpoint import load_checkpoint_weights
    from training.ddp import launched_as_worker
    from training.loop import train
    from training.mammo_dataset import MammoTensorDataset

    config = PreprocessConfig(input_height=request.input_size[0], input_width=request.input_size[1])
    samples = _rsna_samples(request.dataset, config, request.workers)
    train_samples, val_samples, n_train_patients, n_val_patients = _split_samples(request, samples)

    loop_config = request.loop_config()
    result = train(
        loop_config,
        MammoTensorDataset(train_samples),
        MammoTensorDataset(val_samples),
        request.initial_model,
    )
    model_dir = request.out / "model"
    if launched_as_worker():  # torchrun: rank 0 alone turns the best checkpoint into the model
        return model_dir

    model = load_checkpoint_weights(build_model(request.architecture), result.best_checkpoint)

    draft = save_model(
        model,
        ModelManifest(
            name=request.name,
            version=request.version,
            architecture=request.architecture,
            in_chans=1,
            preprocess=config,
            threshold=0.5,
            aggregation="pagg",
            synthetic_training_data=request.synthetic,
            created=dt.date.today().isoformat(),
        ),
        model_dir,
    )
    split = {
        "images_train": len(train_samples),
        "images_validation": len(val_samples),
        "patients_train": n_train_patients,
        "patients_validation": n_val_patients,
    }
    manifest = _validated_manifest(request, draft, model_dir, val_samples, split, result)
    save_manifest(manifest, model_dir)
    write_training_curves(result.history, request.out)
    return model_dir


def _validated_manifest(
    request: TrainRequest,
    draft: ModelManifest,
    model_dir: Path,
    val_samples: list[Any],
    split: dict[str, int],
    result: TrainResult,
) -> ModelManifest:
    """The draft manifest with the threshold, data and figures measured on the validation breasts."""
    from inference.backends.torch_backend import TorchBackend

    # The operating threshold is chosen on validation breasts scored by the serving backend.
    backend = TorchBackend(model_dir)
    predictions = predict_samples(backend, val_samples)
    _, val_breast_labels, val_scores = breast_table(val_samples, predictions.probabilities)
    threshold = threshold_for_sensitivity(val_breast_labels, val_scores["pagg"], request.target_sensitivity)
    val_metrics = binary_metrics(val_breast_labels, val_scores["pagg"], threshold)
    val_patients = split["patients_validation"]
    return replace(
        draft,
        threshold=float(threshold),
        training_data={
            "dataset": str(request.dataset.name),
            "layout": request.layout,
            **split,
            "split": f"by patient, validation fraction {request.val_fraction}, seed {request.seed}",
            "command": "mammonode " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            **request.provenance(),
        },
        metrics={
            "validation_breast": {
                "measured_on": f"validation split of {request.dataset.name} ({val_patients} patients)",
                "threshold_rule": f"highest threshold reaching sensitivity {request.target_sensitivity}",
                **{k: v for k, v in val_metrics.items() if k != "confusion_matrix"},
            }
        },
    )


def evaluate_mammo(
    dataset: Path,
    *,
    model_dir: Path | None,
    backend: str = "torch",
    aggregation: str | None = None,
    target_sensitivity: float = 0.9,
    plots_dir: Path | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the model on a labelled RSNA-layout dataset; see training.evaluate.

    ``on_total`` is called once with the number of images to score, ``progress`` after each
    batch with the number scored.
    """
    if aggregation is not None and aggregation not in AGGREGATIONS:  # before the slow model load
        raise InputError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    model_path = resolve_model_dir(model_dir)
    engine = load_backend(backend, model_path)
    manifest = engine.manifest
    method = aggregation or manifest.aggregation
    samples = _rsna_samples(dataset, manifest.preprocess, workers)
    if on_total is not None:
        on_total(len(samples))
    predictions = predict_samples(engine, samples, progress=progress)
    report = evaluate_predictions(
        samples,
        predictions,
        threshold=manifest.threshold,
        aggregation=method,
        target_sensitivity=target_sensitivity,
    )
    report["distractors"] = distractor_report(
        dataset,
        samples,
        predictions.probabilities,
        predictions.cams,
        threshold=manifest.threshold,
        aggregation=method,
        tolerance_px=report["cam"]["tolerance_px"],
    )
    n_patients = len({s.record.patient_id for s in samples})
    report["measured_on"] = {
        "dataset": str(dataset),
        "images": len(samples),
        "patients": n_patients,
        "breasts": len({s.prediction_id for s in samples}),
    }
    report["model"] = {
        "name": manifest.name,
        "version": manifest.version,
        "weights_sha256": manifest.weights_sha256,
        "backend": backend,
    }
    if plots_dir is not None:
        report["plots"] = [str(p) for p in write_plots(samples, predictions, method, plots_dir)]
    return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of :func:`run_evaluate`'s report."""
    keys = ("roc_auc", "pf1", "precision", "recall", "f1", "sensitivity", "specificity", "threshold")
    lines = [
        f"model {report['model']['name']} {report['model']['version']} "
        f"(sha256 {report['model']['weights_sha256'][:12]}) on {report['measured_on']['dataset']}: "
        f"{report['measured_on']['images']} images, {report['measured_on']['breasts']} breasts",
        "level    " + " ".join(f"{k:>11}" for k in keys),
    ]
    for level in ("image", "breast"):
        lines.append(f"{level:<8} " + " ".join(f"{_fmt(report[level].get(k)):>11}" for k in keys))
    for level in ("image", "breast"):
        lines.append(f"{level} confusion [[tn, fp], [fn, tp]]: {report[level]['confusion_matrix']}")
    lines.append(
        "aggregations: "
        + ", ".join(
            f"{m} auc {_fmt(v['roc_auc'])} pf1 {_fmt(v['pf1'])}" for m, v in report["aggregations"].items()
        )
    )
    cam = report["cam"]
    lines.append(
        f"CAM on {cam['n_images']} lesion images: pointing game {_fmt(cam['pointing_game'])}, "
        f"dice {_fmt(cam['dice'])}"
    )
    if "distractors" in report:  # reports recorded before issue 13 lack it
        lines += format_distractors(report["distractors"])
    return "\n".join(lines)
