"""The `mammonode` command line: the app, its global options and ``main()``.

The commands live in the modules of :data:`node.commands.MODULES`, mounted here; together they are
the only composition root of the product: they wire configuration, the `inference` library and
(lazily, inside the training and export commands) `training` together. Heavy libraries are
imported inside the commands so that `mammonode --help` starts fast. Every error the user can
cause ends as one readable line on stderr and a non-zero exit status. Logging is set up here
(:mod:`node.logs`): UTC timestamps, or JSON lines with ``--log-format json``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from enum import StrEnum
from importlib.metadata import version as _dist_version
from typing import Annotated

import typer

from inference import MammoNodeError, quiet_value_checks, scrub_library_logs
from node import logs

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


class LogFormat(StrEnum):
    text = "text"
    json = "json"


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
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            "--log-format",
            envvar=logs.ENV_VAR,
            help="Log lines as text (UTC timestamp, level, logger, message) or json (one object a line).",
        ),
    ] = None,
) -> None:
    """Receive, score and report screening mammograms; train and evaluate the model."""
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    if log_format is not None:
        logs.set_format(log_format.value)


def _mount_commands() -> None:
    """Add every command module of :data:`node.commands.MODULES`; none imports anything heavy."""
    from node.commands import MODULES

    for name in MODULES:
        importlib.import_module(f"node.commands.{name}").register(app)


_mount_commands()


def main() -> None:
    """Console-script entry point: run the app and turn every expected failure into one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env_format = os.environ.get(logs.ENV_VAR, "text").strip().lower()
    # An unknown value is refused by the --log-format option (same variable), as a usage error.
    logs.configure(env_format if env_format in logs.LOG_FORMATS else "text", logging.INFO)
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
