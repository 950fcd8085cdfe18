"""`mammonode export onnx|tensorrt`: the model as an ONNX graph checked against torch, and a TensorRT
engine for this GPU built from that graph.

Only typer is imported at load time; the exporters (:mod:`training.onnx_export`,
:mod:`inference.backends.tensorrt_build`: torch, onnx, tensorrt) are imported inside the commands. The
defaults below repeat the exporters' own (a test checks they agree), so `--help` needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_OPSET = 17
"""= training.onnx_export.DEFAULT_OPSET"""
DEFAULT_MAX_BATCH = 8
"""= inference.backends.tensorrt_build.DEFAULT_MAX_BATCH"""
DEFAULT_CALIBRATION_IMAGES = 64
"""= inference.backends.tensorrt_build.DEFAULT_CALIBRATION_IMAGES"""


def onnx_command(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model folder; default: the bundled demo model, exported in place."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write a copy of the model folder, with the ONNX, here instead."),
    ] = None,
    opset: Annotated[int, typer.Option(min=13, max=20, help="ONNX opset.")] = DEFAULT_OPSET,
) -> None:
    """Export the model as one ONNX graph (logit + CAM), check it against torch, record its SHA-256."""
    from training.onnx_export import export_onnx

    result = export_onnx(model, out=out, opset=opset)
    worst = max(result.parity.values(), key=lambda r: r.probability_max_abs_diff)
    typer.echo(f"wrote {result.onnx_path} (sha256 {result.onnx_sha256})")
    typer.echo(f"parity with torch at batch sizes {sorted(result.parity)}: {worst.describe()}")
    if result.engines_dropped:
        typer.echo("TensorRT engines of the previous graph were dropped from the manifest; build them again")


def tensorrt_command(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model folder with an ONNX export; default: the bundled demo model."),
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Allow FP16 kernels.")] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="INT8 (with FP16 fallback), calibrated on --calibration.")
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Dataset folder of DICOM images to calibrate INT8 on."),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", min=1, help="Most images used for INT8 calibration.")
    ] = DEFAULT_CALIBRATION_IMAGES,
    max_batch: Annotated[
        int,
        typer.Option("--max-batch", min=1, max=256, help="Largest batch of the optimisation profile (1..N)."),
    ] = DEFAULT_MAX_BATCH,
    device: Annotated[str, typer.Option("--device", help="CUDA device to build for.")] = "cuda:0",
    force: Annotated[
        bool, typer.Option("--force", help="Build even if a matching engine is cached.")
    ] = False,
) -> None:
    """Build a TensorRT engine for this GPU from the model's ONNX graph; record it in the manifest."""
    from inference import build_engine, precision_of

    result = build_engine(
        model,
        precision=precision_of(fp16=fp16, int8=int8),
        max_batch=max_batch,
        calibration=calibration,
        calibration_images=calibration_images,
        device=device,
        force=force,
    )
    state = "up to date" if result.cached else "built"
    typer.echo(f"{state}: {result.path} ({result.record.precision}, batch 1..{result.record.max_batch})")
    typer.echo(f"engine {result.key} sha256 {result.record.sha256} for {result.record.gpu}")


def register(app: typer.Typer) -> None:
    """Add the `export` group (onnx, tensorrt) to the product CLI."""
    group = typer.Typer(
        name="export",
        help="Export a model for serving: ONNX graph, TensorRT engine.",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    group.command("onnx")(onnx_command)
    group.command("tensorrt")(tensorrt_command)
    app.add_typer(group, name="export")
