"""`mammonode score`: score DICOM files offline; a table (or JSON) of image, breast and exam
scores on stdout, the SC, SR, PNG and summary.json in --out. The scoring is in :mod:`node.tools.offline`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def score(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for SC, SR, PNG and summary.json.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model folder (model.json + weights); default: bundled demo."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Inference backend: auto, torch, onnxruntime or tensorrt.")
    ] = "auto",
    aggregation: Annotated[
        str | None, typer.Option(help="Per-breast aggregation: pagg, mean or max (default: the model's).")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the JSON summary instead of a table.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bar (there is none when stderr is not a terminal)."),
    ] = False,
    cam_opacity_follows_probability: Annotated[
        bool,
        typer.Option(
            "--cam-opacity-follows-probability",
            help="Fade each CAM by its image's probability (default: the same opacity for every map).",
        ),
    ] = False,
    presentation_states: Annotated[
        bool,
        typer.Option(
            "--presentation-states",
            help="Also write a Grayscale Softcopy Presentation State per image (marks, notice) in pr/.",
        ),
    ] = False,
) -> None:
    """Score mammograms offline: table of image, breast and exam scores, DICOM results in --out."""
    from node.commands._progress import progress_bar
    from node.tools.offline import run_score

    with progress_bar("score", quiet=quiet) as bar:
        result = run_score(
            paths,
            out=out,
            model_dir=model,
            backend=backend,
            aggregation=aggregation,
            json_output=json_output,
            progress=bar.update,
            on_files=bar.start,
            cam_opacity_follows_probability=cam_opacity_follows_probability,
            presentation_states=presentation_states,
        )
    for line in result.problems:
        typer.echo(line, err=True)
    typer.echo(result.output)
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(score)
