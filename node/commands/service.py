"""`mammonode serve` (the node) and `mammonode studies` (what it received, scored and sent)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from node.config import Role

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML config file (MAMMONODE_* variables override it).")
]


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(studies)


def serve(
    config: ConfigOption = None,
    role: Annotated[
        Role | None,
        typer.Option(
            "--role",
            help="all: the whole node; receiver: SCP and assembly; worker: scoring; sender: delivery "
            "(overrides the role setting; split roles need PostgreSQL and a shared data folder).",
        ),
    ] = None,
) -> None:
    """Run the node: receive studies over DICOM, score them, send the results to the destinations."""
    from node.config import load_config
    from node.private_files import restrict_umask
    from node.service import RECEIVES, SENDS, Node, database_kind

    restrict_umask()  # spool, outbox and database hold patient data, whatever umask we were given
    cfg = load_config(config)
    if role is not None:
        cfg = replace(cfg, role=role)
    where = f" on {cfg.bind_address}:{cfg.port}" if cfg.role in RECEIVES else ""
    typer.echo(
        f"mammonode serving AE {cfg.ae_title} as {cfg.role}{where}, data {cfg.data_dir}, "
        f"database {database_kind(cfg.resolved_database_url)}"
    )
    if cfg.role in SENDS and not cfg.destinations:
        typer.echo("warning: no destinations configured: results stay in the outbox", err=True)
    Node(cfg).serve_forever()


def studies(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many recent studies.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recent studies: state, latest per-breast and exam scores, model version and delivery state."""
    from node.admin.studies import format_studies, recent_studies
    from node.config import load_config
    from node.db.migrate import DatabaseUnavailableError, ensure_schema
    from node.db.session import make_engine, session_factory

    cfg = load_config(config)
    url = cfg.resolved_database_url
    if not cfg.database_url and not (cfg.data_dir / "mammonode.sqlite").is_file():
        raise DatabaseUnavailableError(f"no node database in {cfg.data_dir} yet (mammonode serve creates it)")
    ensure_schema(url, create_sqlite=False)  # a readable error if it is unreachable or not upgraded
    engine = make_engine(url)
    try:
        rows = recent_studies(session_factory(engine), limit)
    finally:
        engine.dispose()
    typer.echo(json.dumps(rows, indent=2) if json_output else format_studies(rows))
