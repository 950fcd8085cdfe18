"""Training commands mounted on the `mammonode` CLI: synth, train, evaluate, export.

This module imports only typer at load time; torch, timm and the generators are imported inside
the commands, so the serving CLI stays fast and works without the training extra.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from inference.types import InputError


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``1024x768``) into (height, width)."""
    try:
        h_text, w_text = text.lower().split("x")
        h, w = int(h_text), int(w_text)
    except ValueError:
        raise typer.BadParameter(f"expected HxW such as 1024x768, got {text!r}") from None
    if h < 32 or w < 32 or h > 8192 or w > 8192:
        raise typer.BadParameter(f"size {text} out of range 32..8192")
    return h, w


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
            help="explicit, jpeg2000, jpegls, jpeg-lossless, rle or mixed (film: RLE and JPEG 2000). "
            "Default explicit, film rle."
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
) -> None:
    """Write synthetic screening studies (phantoms with lesions) in the RSNA layout."""
    from training.synth import STYLES, TRANSFER_SYNTAXES, generate_dataset

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
    )
    typer.echo(
        f"wrote {summary.n_images} images of {summary.n_patients} patients "
        f"({summary.n_cancer_breasts} cancer breasts) to {summary.out}"
    )


EXPORT_MODULES: tuple[str, ...] = ("training.export", "training.export_tensorrt")
"""Modules adding a subcommand to `mammonode export`, each through ``register_export(group)``.
An exporter (ONNX, TensorRT) lives in its own module and is listed here; like this one, each
imports only typer and light modules at load time."""


def export_group() -> typer.Typer:
    """The `mammonode export` command group with every exporter of :data:`EXPORT_MODULES`."""
    group = typer.Typer(
        name="export",
        help="Export a model for serving: ONNX graph, TensorRT engine.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    for name in EXPORT_MODULES:
        importlib.import_module(name).register_export(group)
    return group


def register(app: typer.Typer) -> None:
    """Add the training and export commands to the product CLI."""
    app.command("synth")(synth_command)
    from training import commands

    app.command("train")(commands.train_command)
    app.command("evaluate")(commands.evaluate_command)
    app.add_typer(export_group(), name="export")
