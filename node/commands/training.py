"""The training commands: `mammonode synth`, `mammonode train` and `mammonode evaluate`.

Only typer is imported at load time: ``training`` (torch, timm, the generators) is imported inside
the commands, so the serving CLI starts fast and works without the training extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inference import InputError, dumps
from node.commands._args import parse_size


def synth_command(
    out: Annotated[Path, typer.Argument(help="Output folder (RSNA layout: train.csv, train_images/).")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients (4-view exams).")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed; the output is deterministic for a seed.")] = 0,
    cancer_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of cancer patients.")] = 0.3,
    size: Annotated[
        str | None,
        typer.Option(help="Image size HxW (film: the nominal size). Default 1024x768, film 4500x2700."),
    ] = None,
    transfer_syntax: Annotated[
        str | None,
        typer.Option(
            help="explicit, jpeg2000, jpegls, jpeg-lossless, rle, htj2k, htj2k-rpcl, htj2k-lossy or "
            "mixed (the first five; film: RLE and JPEG 2000). Default explicit, film rle."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    lesion_contrast: Annotated[
        float, typer.Option(min=0.0, help="Scale of lesion amplitude (1.0 = clearly visible).")
    ] = 1.0,
    style: Annotated[
        str,
        typer.Option(
            help="digital: 4-view digital exams. film: digitised films shaped like CBIS-DDSM "
            "(Secondary Capture, MG, 16-bit, no ViewPosition, one image per patient and study, "
            "odd sizes around 4500x2700; --patients is then the number of images)."
        ),
    ] = "digital",
    distractor_rate: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Multiplier of the documented frequencies of skin markers, clips, calcified vessels, "
            "pacemakers, lead letters, paddle edges and film defects (0 = none; their boxes go to "
            "distractors.csv, their pixels to distractor_masks/).",
        ),
    ] = 1.0,
) -> None:
    """Write synthetic screening studies (phantoms with lesions) in the RSNA layout."""
    from training.synth import STYLES, TRANSFER_SYNTAXES, generate_dataset

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder: give a new or empty one")
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if transfer_syntax not in (None, "mixed", *TRANSFER_SYNTAXES):
        names = ", ".join([*TRANSFER_SYNTAXES, "mixed"])
        raise InputError(f"unknown transfer syntax {transfer_syntax!r}; choose one of {names}")
    summary = generate_dataset(
        out,
        patients=patients,
        seed=seed,
        cancer_rate=cancer_rate,
        size=parse_size(size) if size is not None else None,
        transfer_syntax=transfer_syntax,
        workers=workers,
        lesion_contrast=lesion_contrast,
        style=style,
        distractor_rate=distractor_rate,
    )
    typer.echo(
        f"wrote {summary.n_images} images of {summary.n_patients} patients "
        f"({summary.n_cancer_breasts} cancer breasts) to {summary.out}"
    )


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
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Write into a non-empty --out, replacing an earlier run's files."),
    ] = False,
    init_model: Annotated[
        Path | None, typer.Option(help="Model folder whose weights start the run (fine-tuning).")
    ] = None,
    cam_mask_weight: Annotated[
        float,
        typer.Option(help="Weight of the lesion-mask guidance of the CAM peak (0 = image labels only)."),
    ] = 0.0,
    cam_distractor_weight: Annotated[
        float, typer.Option(help="Weight of the term keeping the CAM peak off synth's distractor masks.")
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
    if not (resume is not None or overwrite) and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(
            f"--out {out} is not empty (an earlier run?): give a new folder, --resume CHECKPOINT "
            "or --overwrite"
        )
    from training.dispatch import run_train
    from training.request import TrainRequest

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
            cam_distractor_weight=cam_distractor_weight,
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
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bar (there is none when stderr is not a terminal)."),
    ] = False,
) -> None:
    """Evaluate a model: image and breast metrics, aggregation comparison, CAM localisation."""
    from node.commands._progress import progress_bar
    from training.dispatch import run_evaluate
    from training.run import format_report

    with progress_bar("evaluate", quiet=quiet) as bar:
        report = run_evaluate(
            dataset,
            model_dir=model,
            backend=backend,
            aggregation=aggregation,
            target_sensitivity=sensitivity,
            plots_dir=plots,
            workers=workers,
            layout=layout,
            progress=bar.update,
            on_total=bar.start,
        )
    if record is not None:
        from training.dispatch import record_report

        record_report(report, model_dir=model, name=record)
    if layout != "rsna" and not json_output:
        from training.histology_run import format_histology_report

        typer.echo(format_histology_report(report))
        return
    typer.echo(dumps(report) if json_output else format_report(report))


def register(app: typer.Typer) -> None:
    """Add synth, train and evaluate to the product CLI."""
    app.command("synth")(synth_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
