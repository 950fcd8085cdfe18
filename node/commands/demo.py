"""`mammonode demo`: two synthetic studies (one cancer, one normal) through a node on loopback,
or scored offline; the results next to the ground truth. The demo itself is in :mod:`node.tools.demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _say(line: str, err: bool) -> None:
    typer.echo(line, err=err)


def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the demo's SC, SR, PNG and summary.json.")
    ] = Path("mammonode-demo"),
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model folder (model.json + weights); default: bundled demo."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic studies (same seed, same results).")] = 0,
    offline: Annotated[
        bool, typer.Option(help="Score the files directly instead of through a node on loopback.")
    ] = False,
) -> None:
    """Start a node on loopback, send it a cancer and a normal 4-view study over DICOM, show the results."""
    from functools import partial

    from node.tools.demo import ScoreStep, offline_step, run_demo

    try:
        from training.synth.synthesise import synthesise_studies
    except ImportError as exc:
        hint = "pip install 'mammonode[train]'"
        typer.echo(f"error: mammonode demo needs the training extra ({exc.name} missing): {hint}", err=True)
        raise typer.Exit(1) from None
    step: ScoreStep
    if offline:
        step = offline_step(_say)
    else:
        from node.tools.demo_network import score_over_network

        step = partial(score_over_network, say=_say)
    outcome = run_demo(out, model, seed, synthesise=synthesise_studies, score_step=step)
    if outcome.lines:
        typer.echo("\n".join(outcome.lines))
    raise typer.Exit(outcome.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(demo)
