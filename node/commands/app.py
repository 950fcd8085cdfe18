"""The `mammonode` command line: the only composition root of the product.

It wires configuration, the `inference` library and (lazily) the training commands together.
Heavy libraries are imported inside the commands so that `mammonode --help` starts fast. Every
error the user can cause ends as one readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Annotated

import typer

from inference.phi import quiet_value_checks, scrub_library_logs
from inference.types import MammoNodeError

log = logging.getLogger("mammonode")

# The exception classes of the click that typer actually runs on: recent typer (0.29 here) vendors
# its own copy (``typer._click``) and no longer depends on click, older typer raises click's own.
# Taking the module from a public typer class catches the right ones in both cases.
_click_exc = importlib.import_module(typer.BadParameter.__module__)

app = typer.Typer(
    name="mammonode",
    help="MammoNode: a DICOM node for screening-mammography AI (research use).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mammonode {_dist_version('mammonode')}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Receive, score and report screening mammograms; train and evaluate the model."""
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
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
) -> None:
    """Score mammograms offline: table of image, breast and exam scores, DICOM results in --out."""
    from node.offline import run_score

    code = run_score(
        paths,
        out=out,
        model_dir=model,
        backend=backend,
        aggregation=aggregation,
        json_output=json_output,
    )
    raise typer.Exit(code)


@app.command()
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
    from node.demo import run_demo, score_offline

    try:
        from training.synth.studies import synthesise_studies
    except ImportError as exc:
        hint = "pip install 'mammonode[train]'"
        typer.echo(f"error: mammonode demo needs the training extra ({exc.name} missing): {hint}", err=True)
        raise typer.Exit(1) from None
    step = score_offline if offline else None
    raise typer.Exit(run_demo(out, model, seed, synthesise=synthesise_studies, score_step=step))


def _mount_training() -> None:
    """Add the training commands; their module imports nothing heavy until a command runs."""
    from training.cli import register

    register(app)


_mount_training()


def _mount_node_commands() -> None:
    """Add the service and admin commands (serve, echo, send, studies, queue, audit, db, model...)."""
    from node.commands import MODULES

    for name in MODULES:
        importlib.import_module(f"node.commands.{name}").register(app)


_mount_node_commands()


def main() -> None:
    """Console-script entry point: run the app and turn every expected failure into one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every module it copies
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # and openjpeg every tile it encodes
    logging.captureWarnings(True)  # library warnings may quote DICOM values: scrubbed like logs
    scrub_library_logs()
    quiet_value_checks()
    try:
        result = app(standalone_mode=False)
    except _click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mammonode`: the help, not an error
            typer.echo(exc.format_message(), err=True)
            sys.exit(2)
        cmd = exc.ctx.command_path if exc.ctx is not None else "mammonode"
        typer.echo(f"error: {cmd}: {exc.format_message()}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except _click_exc.ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except MammoNodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
