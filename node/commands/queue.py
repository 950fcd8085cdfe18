"""`mammonode queue [list] | retry | drop`: the outbox and scoring queues, for operators.

Transmissions are addressed by number, scoring jobs as ``job:NUMBER`` (both as `queue list`
prints them). Logic and auditing live in :mod:`node.admin.queue`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.commands._admin import ConfigOption

StateOption = Annotated[
    str | None,
    typer.Option(
        "--state",
        help="pending, failed, dead, dropped, sent or all (default: pending, failed and dead).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def _show(state: str | None, json_output: bool, config: ConfigOption) -> None:
    from node.admin.queue import list_items
    from node.commands._admin import load, open_session

    with open_session(load(config)) as session:
        items = list_items(session, state)
    if json_output:
        for item in items:
            typer.echo(json.dumps(item.to_dict(), sort_keys=True))
        return
    if not items:
        typer.echo("queue is empty" if state is None else f"no items in state {state}")
        return
    typer.echo(
        f"{'id':<9} {'kind':<4} {'state':<8} {'tries':>5} {'next attempt (UTC)':<20} {'study / destination'}"
    )
    for item in items:
        nxt = item.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if item.next_attempt_at else "-"
        typer.echo(
            f"{item.ref:<9} {item.kind:<4} {item.state:<8} {item.attempts:>5} {nxt:<20} "
            f"{item.study_uid} -> {item.destination}"
        )
        if item.last_error:
            typer.echo(f"{'':<9} last error: {item.last_error.splitlines()[0][:200]}")


def list_command(
    state: StateOption = None, json_output: JsonOption = False, config: ConfigOption = None
) -> None:
    """List outbox transmissions and scoring jobs that are waiting, failing or dead."""
    _show(state, json_output, config)


def retry_command(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Transmission numbers and/or job:NUMBER scoring jobs.")
    ] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="Every dead transmission.")] = False,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Every failed transmission and failed scoring job.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Put transmissions (or scoring jobs) back in the queue, due now."""
    from node.admin.queue import QueueError, parse_refs, retry, transmissions_in_state
    from node.audit import cli_actor
    from node.commands._admin import load, open_session
    from node.db.repository import job_ids_in_state
    from node.db.states import JobState

    if not ids and not all_dead and not all_failed:
        raise QueueError("name the items to retry (IDs from `mammonode queue`), or --all-dead / --all-failed")
    tx_ids, job_ids = parse_refs(ids or [])
    with open_session(load(config)) as session:
        if all_dead:
            tx_ids += transmissions_in_state(session, "dead")
        if all_failed:
            tx_ids += transmissions_in_state(session, "failed")
            job_ids += job_ids_in_state(session, JobState.FAILED)
        lines = retry(session, tx_ids, job_ids, cli_actor())
        session.commit()
    for line in lines:
        typer.echo(line)
    typer.echo(f"{len(lines)} item(s) queued for retry")


def drop_command(
    ids: Annotated[list[str], typer.Argument(help="Transmission numbers and/or job:NUMBER failed jobs.")],
    config: ConfigOption = None,
) -> None:
    """Take transmissions (or failed scoring jobs) out of the queue for good."""
    from node.admin.queue import drop, parse_refs
    from node.audit import cli_actor
    from node.commands._admin import load, open_session

    tx_ids, job_ids = parse_refs(ids)
    with open_session(load(config)) as session:
        lines = drop(session, tx_ids, job_ids, cli_actor())
        session.commit()
    for line in lines:
        typer.echo(line)
    typer.echo(f"{len(lines)} item(s) dropped")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="The outbox and scoring queues: list (default), retry, drop.", invoke_without_command=True
    )

    @group.callback()
    def _default(
        ctx: typer.Context,
        state: StateOption = None,
        json_output: JsonOption = False,
        config: ConfigOption = None,
    ) -> None:
        """List, retry or drop queued results and scoring jobs (`mammonode queue` alone lists)."""
        if ctx.invoked_subcommand is None:
            _show(state, json_output, config)

    group.command("list")(list_command)
    group.command("retry")(retry_command)
    group.command("drop")(drop_command)
    app.add_typer(group, name="queue")
