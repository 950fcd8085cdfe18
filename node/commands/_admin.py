"""What the admin commands (audit, queue, model, retrain) share: the --config option and the database.

Not a command module (it has no ``register``); the commands import it lazily, so the CLI start
does not pay for SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from node.config import NodeConfig

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="Node config file (TOML); MAMMONODE_* variables override it."),
]


def load(config_path: Path | None) -> NodeConfig:
    """The node configuration the command acts on."""
    from node.config import load_config

    return load_config(config_path)


@contextmanager
def open_session(config: NodeConfig) -> Iterator[Session]:
    """A session on the node's database, with its schema checked (SQLite is created if new).

    The caller commits; the engine is disposed on exit so a command leaves no connection open.
    """
    from node.db.session import make_engine, session_factory

    url = config.resolved_database_url
    if url.startswith("sqlite"):
        config.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_schema(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _ensure_schema(url: str) -> None:
    from node.db.migrate import ensure_schema

    ensure_schema(url, create_sqlite=True)
