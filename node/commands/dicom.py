"""`mammonode echo HOST PORT` and `mammonode send PATH... --to AE@HOST:PORT`: the node's SCU
from the command line, to check a peer and to push files (or a whole folder) to it; ``--to
AE@HOST:PORT;tls`` (and ``echo --tls``) speaks DICOM TLS with the config's certificate and CAs
(node.dicom.tls); ``--to stow:URL`` sends by DICOMweb STOW-RS instead (node.dicom.stow)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from inference import MammoNodeError
from node.commands._admin import ConfigOption

if TYPE_CHECKING:
    from node.dicom.sender import SendOutcome

AetOption = Annotated[
    str | None,
    typer.Option("--aet", help="Our calling AE title (default: the node's ae_title from the config)."),
]


class DicomPeerError(MammoNodeError):
    """A DICOM peer could not be reached or refused the request."""


def quiet_pynetdicom() -> None:
    """pynetdicom narrates every association at INFO and repeats our failures at ERROR, and the
    sender logs a refused association; the commands print one line of their own instead (all of
    it with `mammonode -v`)."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        logging.getLogger("node.dicom.sender").setLevel(logging.ERROR)
        logging.getLogger("node.dicom.stow").setLevel(logging.ERROR)


def _calling_ae(aet: str | None, config: Path | None) -> str:
    from node.config import validate_ae_title

    if aet is not None:
        return validate_ae_title(aet, "--aet")
    from node.commands._admin import load

    return load(config).ae_title


def echo_command(
    host: Annotated[str, typer.Argument(help="Host name or address of the peer.")],
    port: Annotated[int, typer.Argument(help="Its DICOM port.")],
    aec: Annotated[str, typer.Option("--aec", help="The peer's (called) AE title.")] = "ANY-SCP",
    aet: AetOption = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls", help="Use DICOM TLS: the config's CAs check the peer, its certificate is ours."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO (DICOM ping); exit 0 when the peer answers Success."""
    from node.commands._admin import load
    from node.config import DestinationTLS, validate_ae_title, validate_port
    from node.dicom.sender import echo

    quiet_pynetdicom()
    called = validate_ae_title(aec, "--aec")
    over_tls, node = (DestinationTLS(), load(config)) if tls else (None, None)
    result = echo(host, validate_port(port), called, _calling_ae(aet, config), over_tls=over_tls, config=node)
    if not result.ok:
        raise DicomPeerError(f"C-ECHO to {called}@{host}:{port} failed: {result.detail}")
    typer.echo(f"C-ECHO to {called}@{host}:{port}: {result.detail}")


def send_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Destination as AE@HOST:PORT (AE@HOST:PORT;tls for DICOM TLS), or stow:URL (STOW-RS).",
        ),
    ],
    aet: AetOption = None,
    config: ConfigOption = None,
) -> None:
    """C-STORE files to a peer; one line per file that fails (one in all when the peer cannot be
    reached), exit 1 if any did."""
    from node.commands._admin import load
    from node.config import Destination
    from node.dicom.sender import store_files
    from node.tools.offline import collect_files

    quiet_pynetdicom()
    destination = Destination.parse(to)
    calling = _calling_ae(aet, config)
    node = load(config) if destination.tls is not None else None  # its certificate and CAs
    files, missing = collect_files(paths)
    for path, reason in missing:
        typer.echo(f"error: {path}: {reason}", err=True)
    outcomes = store_files(files, destination, calling, config=node) if files else []
    failed = len(missing) + sum(1 for o in outcomes if not o.ok)
    for line in failure_lines(outcomes, str(destination)):
        typer.echo(line, err=True)
    sent = sum(1 for o in outcomes if o.ok)
    typer.echo(f"sent {sent} of {len(outcomes) + len(missing)} file(s) to {destination}")
    if failed:
        raise typer.Exit(1)


def failure_lines(outcomes: Sequence[SendOutcome], destination: str) -> list[str]:
    """One line per file that failed, except that files which got no response for the same reason
    (the association was refused or lost: nothing was sent) share one line with their count."""
    unsent: Counter[str] = Counter(o.detail for o in outcomes if not o.ok and o.status is None)
    lines: list[str] = []
    said: set[str] = set()
    for outcome in outcomes:
        if outcome.ok:
            continue
        if outcome.status is None and unsent[outcome.detail] > 1:
            if outcome.detail not in said:
                said.add(outcome.detail)
                lines.append(
                    f"error: {destination}: {outcome.detail} ({unsent[outcome.detail]} files not sent)"
                )
            continue
        lines.append(f"error: {outcome.path}: {outcome.detail}")
    return lines


def register(app: typer.Typer) -> None:
    app.command("echo")(echo_command)
    app.command("send")(send_command)
