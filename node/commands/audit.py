"""`mammonode audit list|show|export|verify|head`: read the append-only audit log and check its chain.

The log is the only place that links patients to studies, so exporting it is audited too
(``data.exported``). Query logic lives in :mod:`node.audit.query`, the chain check in
:mod:`node.audit.verify`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.commands._admin import ConfigOption

if TYPE_CHECKING:
    from node.audit.query import AuditFilter

PatientOption = Annotated[str | None, typer.Option("--patient", help="Only events of this patient ID.")]
StudyOption = Annotated[str | None, typer.Option("--study", help="Only events of this Study Instance UID.")]
EventOption = Annotated[
    list[str] | None,
    typer.Option("--event", help="Only this event (repeatable; a trailing * matches a prefix: result.*)."),
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="From this ISO date/time (UTC unless it has an offset).")
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Up to this ISO date/time (UTC unless it has an offset).")
]


def _filters(
    patient: str | None, study: str | None, event: list[str] | None, since: str | None, until: str | None
) -> AuditFilter:
    from node.audit.query import AuditFilter, parse_time

    return AuditFilter(
        patient_id=patient,
        study_uid=study,
        events=tuple(event or ()),
        since=parse_time(since, "--since") if since else None,
        until=parse_time(until, "--until") if until else None,
    )


def list_command(
    patient: PatientOption = None,
    study: StudyOption = None,
    event: EventOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show the newest N matching events.")] = 100,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """List audit events, oldest first, filtered by patient, study, event and time."""
    from node.audit.query import event_dict, format_events, list_events
    from node.commands._admin import load, open_session

    filters = _filters(patient, study, event, since, until)
    with open_session(load(config)) as session:
        rows, total = list_events(session, filters, limit)
        if json_output:
            for row in rows:
                typer.echo(json.dumps(event_dict(row), sort_keys=True))
            return
        for line in format_events(rows):
            typer.echo(line)
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(total)
    typer.echo(f"{shown} event(s)" + (" (the newest; raise --limit for more)" if total > len(rows) else ""))


def show_command(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """The timeline of one study, from the association that brought it to the delivery of results."""
    from node.audit.query import event_dict, format_events, study_timeline
    from node.commands._admin import load, open_session

    with open_session(load(config)) as session:
        events = study_timeline(session, study_uid)
        if json_output:
            for row in events:
                typer.echo(json.dumps(event_dict(row), sort_keys=True))
            return
        patients = sorted({e.patient_id for e in events if e.patient_id})
        typer.echo(f"study {study_uid}" + (f" (patient {', '.join(patients)})" if patients else ""))
        for line in format_events(events, with_study=False):
            typer.echo(f"  {line}")
    typer.echo(f"{len(events)} event(s)")


def export_command(
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="File to write (replaced atomically).")],
    patient: PatientOption = None,
    study: StudyOption = None,
    event: EventOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    config: ConfigOption = None,
) -> None:
    """Write matching audit events to a CSV or JSONL file; the export itself is audited."""
    from node import audit
    from node.audit.query import iter_events, write_export
    from node.commands._admin import load, open_session

    filters = _filters(patient, study, event, since, until)
    with open_session(load(config)) as session:
        count = write_export(iter_events(session, filters), fmt, out)
        audit.record(
            session,
            audit.DATA_EXPORTED,
            audit.cli_actor(),
            patient_id=filters.patient_id,
            study_uid=filters.study_uid,
            details={
                "what": "audit log",
                "format": fmt,
                "rows": count,
                "out": str(out.resolve()),
                "filters": filters.describe(),
            },
        )
        session.commit()
    typer.echo(f"wrote {count} event(s) to {out}")


VERIFY_BROKEN_EXIT = 3
"""`audit verify`'s exit status when the chain is broken (1 stays for "could not check")."""


def _anchors(texts: list[str] | None) -> list[tuple[int, str]]:
    from node.audit.verify import parse_anchor

    try:
        return [parse_anchor(text) for text in texts or ()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--anchor") from None


def verify_command(
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            "--anchor",
            help="SEQ:HASH printed earlier by `audit head` and kept elsewhere; the chain must still "
            "hold it (repeatable).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="The verdict as one JSON object.")] = False,
    config: ConfigOption = None,
) -> None:
    """Check the audit log's hash chain; name the first broken link (exit status 3) if any."""
    from node.audit.verify import verify_chain
    from node.commands._admin import load, open_session

    anchors = _anchors(anchor)
    with open_session(load(config)) as session:
        verdict = verify_chain(session, anchors)
    if json_output:
        typer.echo(json.dumps(verdict.as_dict(), sort_keys=True))
    elif verdict.broken is None:
        assert verdict.head is not None
        anchored = f", {len(anchors)} anchor(s) held" if anchors else ""
        typer.echo(f"audit chain OK: {verdict.checked} event(s), head {verdict.head.anchor}{anchored}")
    else:
        typer.echo(f"error: audit chain broken: {verdict.broken.describe()}", err=True)
    if verdict.broken is not None:
        raise typer.Exit(VERIFY_BROKEN_EXIT)


def head_command(
    json_output: Annotated[bool, typer.Option("--json", help="The head as one JSON object.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print where the audit chain ends as SEQ:HASH and its time: copy it somewhere the node's
    database users cannot write, and check it later with `audit verify --anchor`."""
    from node.audit.chain import read_head
    from node.commands._admin import load, open_session

    with open_session(load(config)) as session:
        head = read_head(session)
    at = head.at.isoformat(timespec="microseconds").replace("+00:00", "Z") if head.at else None
    if json_output:
        doc = {"seq": head.seq, "row_hash": head.row_hash, "at": at, "anchor": head.anchor}
        typer.echo(json.dumps(doc, sort_keys=True))
    else:
        typer.echo(f"{head.anchor} {at or '(empty log)'}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Read the audit log (list, show a study's timeline, export); verify its chain, print its head.",
        no_args_is_help=True,
    )
    group.command("list")(list_command)
    group.command("show")(show_command)
    group.command("export")(export_command)
    group.command("verify")(verify_command)
    group.command("head")(head_command)
    app.add_typer(group, name="audit")
