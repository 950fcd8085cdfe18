"""`mammonode serve` (the node) and `mammonode studies` (what it received, scored and sent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="TOML config file (MAMMONODE_* variables override it).")
]


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(studies)


def serve(config: ConfigOption = None) -> None:
    """Run the node: receive studies over DICOM, score them, send the results to the destinations."""
    from node.config import load_config
    from node.service import Node, database_kind

    cfg = load_config(config)
    typer.echo(
        f"mammonode serving AE {cfg.ae_title} on {cfg.bind_address}:{cfg.port}, data {cfg.data_dir}, "
        f"database {database_kind(cfg.resolved_database_url)}"
    )
    if not cfg.destinations:
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
