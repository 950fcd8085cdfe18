"""`mammonode train` and `mammonode evaluate`: thin Typer commands over training.run.

Nothing heavy is imported here at module level: this module is loaded on every CLI start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inference.jsonsafe import dumps


def train_command(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset folder (RSNA layout, IDC patches or class folders).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, curves and the model.")],
    layout: Annotated[str, typer.Option(help="rsna, idc or folders.")] = "rsna",
    architecture: Annotated[
        str, typer.Option(help="efficientnet_b0..b7, resnet50, wide_resnet50_2 or cancernet.")
    ] = "efficientnet_b0",
    input_size: Annotated[str, typer.Option(help="Model input HxW (mammograms).")] = "1024x512",
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping may end sooner).")] = 50,
    batch_ids: Annotated[int, typer.Option(min=1, help="Prediction IDs per batch (seed 003: 8).")] = 8,
    batches_per_epoch: Annotated[
        int | None, typer.Option(help="Batches per epoch (default: one pass).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients held out for validation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed for the split, sampler and augmentation.")] = 0,
    resume: Annotated[Path | None, typer.Option(help="Checkpoint (last.pt) to resume from.")] = None,
    init_model: Annotated[
        Path | None, typer.Option(help="Model folder whose weights start the run (fine-tuning).")
    ] = None,
    cam_mask_weight: Annotated[
        float,
        typer.Option(help="Weight of the lesion-mask guidance of the CAM peak (0 = image labels only)."),
    ] = 0.0,
    amp: Annotated[bool, typer.Option(help="Automatic mixed precision.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Preprocessing worker processes.")] = 1,
    name: Annotated[str, typer.Option(help="Model name written in the manifest.")] = "mammonode-model",
    model_version: Annotated[str, typer.Option("--model-version", help="Model version.")] = "0.1.0",
    synthetic: Annotated[
        bool, typer.Option(help="Mark the model as trained on synthetic data (adds the research notice).")
    ] = False,
) -> None:
    """Train a model (seed-003 recipe) and write a model folder with weights and manifest."""
    from training.cli import parse_size
    from training.run import TrainRequest, run_train

    model_dir = run_train(
        TrainRequest(
            dataset=dataset,
            out=out,
            layout=layout,
            architecture=architecture,
            input_size=parse_size(input_size),
            epochs=epochs,
            batch_ids=batch_ids,
            batches_per_epoch=batches_per_epoch,
            lr=lr,
            val_fraction=val_fraction,
            seed=seed,
            resume=resume,
            init_model=init_model,
            cam_mask_weight=cam_mask_weight,
            amp=amp,
            device=device,
            workers=workers,
            name=name,
            version=model_version,
            synthetic=synthetic,
        )
    )
    typer.echo(f"model written to {model_dir}")


def evaluate_command(
    dataset: Annotated[Path, typer.Argument(help="Labelled dataset folder (RSNA layout, or see --layout).")],
    model: Annotated[Path | None, typer.Option(help="Model folder; default: the bundled demo model.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    backend: Annotated[
        str, typer.Option(help="Inference backend: torch, onnxruntime (after `mammonode export onnx`).")
    ] = "torch",
    aggregation: Annotated[str | None, typer.Option(help="pagg, mean or max (default: the model's).")] = None,
    sensitivity: Annotated[float, typer.Option(help="Target sensitivity for the suggested threshold.")] = 0.9,
    plots: Annotated[Path | None, typer.Option(help="Folder for ROC/PR plots.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Preprocessing worker processes.")] = 1,
    layout: Annotated[str, typer.Option(help="rsna, idc or folders (histology patches).")] = "rsna",
    record: Annotated[
        str | None,
        typer.Option(help="Also store the report in the model's manifest as metrics.NAME (e.g. test)."),
    ] = None,
) -> None:
    """Evaluate a model: image and breast metrics, aggregation comparison, CAM localisation."""
    from training.run import format_report, run_evaluate

    report = run_evaluate(
        dataset,
        model_dir=model,
        backend=backend,
        aggregation=aggregation,
        target_sensitivity=sensitivity,
        plots_dir=plots,
        workers=workers,
        layout=layout,
    )
    if record is not None:
        from training.run import record_report

        record_report(report, model_dir=model, name=record)
    if layout != "rsna" and not json_output:
        from training.histology import format_histology_report

        typer.echo(format_histology_report(report))
        return
    typer.echo(dumps(report) if json_output else format_report(report))
