"""`mammonode train` and `mammonode evaluate` pick their recipe by layout.

The RSNA layout goes to the mammography recipe (:mod:`training.run`), the histology patch
layouts (idc, folders) to :mod:`training.histology_run`. Both take a
:class:`training.request.TrainRequest`; neither imports this module, so the recipes and the
dispatcher form no circle. The histology recipe imports torch when it loads, so it is imported
only when asked for: evaluating the rsna layout through onnxruntime needs no torch.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.bundled import resolve_model_dir
from inference.jsonsafe import json_safe
from inference.manifest import load_manifest, save_manifest
from training.request import TrainRequest
from training.run import evaluate_mammo, run_mammo_train

log = logging.getLogger(__name__)


def run_train(request: TrainRequest) -> Path:
    """Train and write ``request.out / "model"``; returns that folder."""
    if request.layout != "rsna":
        from training.histology_run import run_histology_train

        return run_histology_train(request)
    return run_mammo_train(request)


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
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the model on a labelled RSNA-layout dataset; see training.evaluate.

    ``on_total`` is called once with the number of images (patches) to score, ``progress``
    after each scored batch with the number of items in it: enough for a progress bar.
    """
    if layout != "rsna":
        # Histology patch sets (idc, folders): patch/patient metrics, see training.histology_run.
        from training.histology_run import evaluate_histology

        if aggregation is not None or plots_dir is not None:
            log.warning("--aggregation and --plots apply to the rsna layout only; ignored")
        return evaluate_histology(
            dataset,
            model_dir,
            layout,
            backend=backend,
            target_sensitivity=target_sensitivity,
            workers=workers,
            progress=progress,
            on_total=on_total,
        )
    return evaluate_mammo(
        dataset,
        model_dir=model_dir,
        backend=backend,
        aggregation=aggregation,
        target_sensitivity=target_sensitivity,
        plots_dir=plots_dir,
        workers=workers,
        progress=progress,
        on_total=on_total,
    )


def record_report(report: dict[str, Any], *, model_dir: Path | None, name: str) -> Path:
    """Store an evaluation report in the model's manifest under ``metrics[name]``.

    The weights are untouched, so their SHA-256 stays valid; the manifest then carries figures
    that were measured, together with the data they were measured on. The action is logged.
    """
    path = resolve_model_dir(model_dir)
    manifest = load_manifest(path)
    entry = json_safe({k: v for k, v in report.items() if k != "plots"})
    entry["recorded"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    save_manifest(replace(manifest, metrics={**manifest.metrics, name: entry}), path)
    log.info("recorded evaluation as metrics.%s in %s", name, path)
    return path
