"""Engines and sessions for SQLite (embedded default, WAL) and PostgreSQL (production).

SQLite is tuned for a single node with several threads: WAL so readers do not block the
C-STORE handler's writes, ``synchronous=FULL`` so a committed receipt survives power loss
(invariant 1), foreign keys on, and a busy timeout instead of "database is locked" errors.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the node's connection settings.

    ``hide_parameters``: a database error's text would otherwise quote the statement's bound
    values, and those include patient IDs (design invariant 10).
    """
    kwargs.setdefault("hide_parameters", True)
    if is_sqlite(url):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (callers own the commit)."""
    return sessionmaker(engine, expire_on_commit=False)
