"""`mammonode db upgrade|current`: the database schema, for operators of a PostgreSQL node.

SQLite nodes upgrade themselves at start; a PostgreSQL node refuses to start on an old schema and
points here. The URL comes from the config file or ``MAMMONODE_DATABASE_URL`` and is never
printed: it may hold a password.
"""

from __future__ import annotations

import typer

from node.commands._admin import ConfigOption


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="The node database: schema migrations.", no_args_is_help=True)
    db_app.command("upgrade")(upgrade)
    db_app.command("current")(current)
    app.add_typer(db_app, name="db")


def upgrade(config: ConfigOption = None) -> None:
    """Bring the database schema to the revision this MammoNode needs (audited when it changes)."""
    from node import audit
    from node.commands._admin import load, open_session
    from node.db import migrate

    cfg = load(config)
    url = cfg.resolved_database_url
    before = migrate.current(url)
    migrate.upgrade(url)
    after = migrate.head()
    if before == after:
        typer.echo(f"database schema already at {after} (head)")
        return
    with open_session(cfg) as session:
        audit.record(session, audit.DB_UPGRADED, audit.cli_actor(), details={"from": before, "to": after})
        session.commit()
    typer.echo(f"database schema upgraded from {before or 'empty'} to {after}")


def current(config: ConfigOption = None) -> None:
    """Print the database's schema revision and whether it is the one this MammoNode needs."""
    from node.commands._admin import load
    from node.db import migrate

    url = load(config).resolved_database_url
    found, expected = migrate.current(url), migrate.head()
    if found == expected:
        typer.echo(f"{found} (head)")
    else:
        typer.echo(f"{found or 'empty'} (head is {expected}: run `mammonode db upgrade`)")
