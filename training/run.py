"""Orchestration behind `mammonode train` and `mammonode evaluate`.

Training: load the dataset, split by patient, preprocess through the serving code, run the
seed-003 loop, choose the operating threshold on the validation breasts, and write a model folder
whose manifest names the data, the command and the validation figures. Evaluation: score a
labelled dataset through a serving backend and report image, breast and CAM metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.bundled import resolve_model_dir
from inference.types import InputError, PreprocessConfig

if TYPE_CHECKING:
    from training.loop import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """Everything `mammonode train` was asked for."""

    dataset: Path
    out: Path
    layout: str = "rsna"
    architecture: str = "efficientnet_b0"
    input_size: tuple[int, int] = (1024, 512)
    epochs: int = 50
    batch_ids: int = 8
    batches_per_epoch: int | None = None
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    resume: Path | None = None
    amp: bool = False
    device: str = "cpu"
    workers: int = 1
    name: str = "mammonode-model"
    version: str = "0.1.0"
    synthetic: bool = False
    target_sensitivity: float = 0.9
    init_model: Path | None = None
    """Model folder whose weights start the run (fine-tuning); None = random initialisation."""
    cam_mask_weight: float = 0.0
    """Lesion-mask guidance of the CAM peak (see :mod:`training.cam_loss`); 0 = seed 003."""

    def __post_init__(self) -> None:
        if not self.cam_mask_weight >= 0:
            raise InputError(f"--cam-mask-weight must be >= 0, got {self.cam_mask_weight}")
        if self.cam_mask_weight > 0 and self.layout != "rsna":
            raise InputError("--cam-mask-weight needs lesion masks, which only the rsna layout has")

    def initial_model(self, in_chans: int = 1) -> Any:
        """The untrained model, or the ``init_model`` weights when fine-tuning (checked to fit)."""
        from inference.model import build_model

        model = build_model(self.architecture, in_chans=in_chans)
        if self.init_model is not None:
            from inference.model_io import load_model

            source, manifest = load_model(self.init_model)
            if manifest.architecture != self.architecture or manifest.in_chans != in_chans:
                raise InputError(
                    f"--init-model {self.init_model} is {manifest.architecture} with {manifest.in_chans} "
                    f"channel(s), not {self.architecture} with {in_chans}"
                )
            model.load_state_dict(source.state_dict())
        return model

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about how the weights started and what guided them."""
        info: dict[str, Any] = {"cam_mask_weight": self.cam_mask_weight}
        if self.init_model is not None:
            from inference.manifest import load_manifest

            start = load_manifest(self.init_model)
            info["initialised_from"] = {
                "name": start.name,
                "version": start.version,
                "weights_sha256": start.weights_sha256,
            }
        return info

    def loop_config(self, **overrides: Any) -> TrainConfig:
        """The training-loop settings this request asks for; callers add layout-specific ones."""
        from training.loop import TrainConfig

        settings: dict[str, Any] = {
            "architecture": self.architecture,
            "epochs": self.epochs,
            "batch_ids": self.batch_ids,
            "batches_per_epoch": self.batches_per_epoch,
            "lr": self.lr,
            "amp": self.amp,
            "device": self.device,
            "seed": self.seed,
            "out_dir": self.out,
            "resume": self.resume,
            "cam_mask_weight": self.cam_mask_weight,
            "augment": True,
        }
        return TrainConfig(**{**settings, **overrides})


def _rsna_samples(root: Path, config: PreprocessConfig, workers: int) -> list[Any]:
    from training.datasets.mammo import load_samples
    from training.datasets.rsna import lesion_mask_path, load_rsna

    records = load_rsna(root)
    masks = [lesion_mask_path(root, r) for r in records]
    samples, errors = load_samples(records, config, mask_paths=masks, workers=workers)
    if not samples:
        raise InputError(f"no usable images in {root} ({len(errors)} failed)")
    return samples


def run_train(request: TrainRequest) -> Path:
    """Train and write ``request.out / "model"``; returns that folder."""
    if request.layout != "rsna":
        from training.histology import run_histology_train

        return run_histology_train(request)

    from inference.backends.torch_backend import TorchBackend
    from inference.manifest import ModelManifest, save_manifest
    from inference.model import build_model
    from inference.model_io import save_model
    from training.ddp import launched_as_worker
    from training.evaluate import breast_table, predict_samples
    from training.loop import load_checkpoint_weights, train
    from training.mammo_dataset import MammoTensorDataset
    from training.metrics import binary_metrics, threshold_for_sensitivity
    from training.plots import write_training_curves
    from training.sampler import split_by_patient

    config = PreprocessConfig(input_height=request.input_size[0], input_width=request.input_size[1])
    samples = _rsna_samples(request.dataset, config, request.workers)
    patients = [str(s.record.patient_id) for s in samples]
    labels = [s.label for s in samples]
    train_patients, val_patients = split_by_patient(patients, labels, request.val_fraction, request.seed)
    train_ids, val_ids = set(train_patients), set(val_patients)
    train_samples = [s for s in samples if str(s.record.patient_id) in train_ids]
    val_samples = [s for s in samples if str(s.record.patient_id) in val_ids]
    log.info("training on %d images, validating on %d", len(train_samples), len(val_samples))

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
    # The operating threshold is chosen on validation breasts scored by the serving backend.
    backend = TorchBackend(model_dir)
    predictions = predict_samples(backend, val_samples)
    _, val_breast_labels, val_scores = breast_table(val_samples, predictions.probabilities)
    threshold = threshold_for_sensitivity(val_breast_labels, val_scores["pagg"], request.target_sensitivity)
    val_metrics = binary_metrics(val_breast_labels, val_scores["pagg"], threshold)
    manifest = replace(
        draft,
        threshold=float(threshold),
        training_data={
            "dataset": str(request.dataset.name),
            "layout": request.layout,
            "images_train": len(train_samples),
            "images_validation": len(val_samples),
            "patients_train": len(train_patients),
            "patients_validation": len(val_patients),
            "split": f"by patient, validation fraction {request.val_fraction}, seed {request.seed}",
            "command": "mammonode " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            **request.provenance(),
        },
        metrics={
            "validation_breast": {
                "measured_on": f"validation split of {request.dataset.name} ({len(val_patients)} patients)",
                "threshold_rule": f"highest threshold reaching sensitivity {request.target_sensitivity}",
                **{k: v for k, v in val_metrics.items() if k != "confusion_matrix"},
            }
        },
    )
    save_manifest(manifest, model_dir)
    write_training_curves(result.history, request.out)
    return model_dir


def run_evaluate(
    dataset: Path,
    *,
    model_dir: Path | None,
    backend: str = "torch",
    aggregation: str | None = None,
    target_sensitivity: float = 0.9,
    plots_dir: Path | None = None,
    workers: int = 1,
    layout: str = "rsna",
) -> dict[str, Any]:
    """Evaluate the model on a labelled RSNA-layout dataset; see training.evaluate."""
    if layout != "rsna":
        # Histology patch sets (idc, folders): patch/patient metrics, see training.histology.
        from training.histology import evaluate_histology

        if aggregation is not None or plots_dir is not None:
            log.warning("--aggregation and --plots apply to the rsna layout only; ignored")
        return evaluate_histology(
            dataset,
            model_dir,
            layout,
            backend=backend,
            target_sensitivity=target_sensitivity,
            workers=workers,
        )
    from inference.aggregation import AGGREGATIONS
    from inference.backends.registry import load_backend
    from training.evaluate import evaluate_predictions, predict_samples, write_plots

    if aggregation is not None and aggregation not in AGGREGATIONS:  # before the slow model load
        raise InputError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    model_path = resolve_model_dir(model_dir)
    engine = load_backend(backend, model_path)
    manifest = engine.manifest
    method = aggregation or manifest.aggregation
    samples = _rsna_samples(dataset, manifest.preprocess, workers)
    predictions = predict_samples(engine, samples)
    report = evaluate_predictions(
        samples,
        predictions,
        threshold=manifest.threshold,
        aggregation=method,
        target_sensitivity=target_sensitivity,
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


def record_report(report: dict[str, Any], *, model_dir: Path | None, name: str) -> Path:
    """Store an evaluation report in the model's manifest under ``metrics[name]``.

    The weights are untouched, so their SHA-256 stays valid; the manifest then carries figures
    that were measured, together with the data they were measured on. The action is logged.
    """
    from inference.jsonsafe import json_safe
    from inference.manifest import load_manifest, save_manifest

    path = resolve_model_dir(model_dir)
    manifest = load_manifest(path)
    entry = json_safe({k: v for k, v in report.items() if k != "plots"})
    entry["recorded"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    save_manifest(replace(manifest, metrics={**manifest.metrics, name: entry}), path)
    log.info("recorded evaluation as metrics.%s in %s", name, path)
    return path


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
    return "\n".join(lines)
