"""Schema migrations: bring a database to the revision this code expects, or say why not.

SQLite, the embedded default, is created and upgraded on first start (:func:`ensure_schema`);
PostgreSQL is shared infrastructure, so the node refuses to start on an outdated schema and the
operator runs ``mammonode db upgrade``. Every upgrade or downgrade runs in one transaction:
PostgreSQL has transactional DDL, and on SQLite the connection issues ``BEGIN IMMEDIATE`` itself
(the driver would otherwise commit each DDL statement on its own), so a failed migration leaves
the previous schema intact and two nodes starting at once cannot both migrate. SQLite migrations
run with foreign keys off, because batch mode rebuilds a table by copying and dropping it and a
drop would otherwise cascade; ``PRAGMA foreign_key_check`` runs before the commit instead.

The database URL may carry a password: nothing here prints or logs it, and errors show it masked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import NullPool

import migrations
from inference import MammoNodeError
from node.config import ConfigError, mask_url
from node.db.models import Base
from node.db.session import is_sqlite, make_engine
from node.private_files import private_dir, private_file

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
PG_MIGRATION_LOCK = 0x4D414D4D  # pg_advisory_xact_lock key ("MAMM"): one migrator at a time


class SchemaVersionError(ConfigError):
    """The database schema is not the revision this version of MammoNode needs."""


class DatabaseUnavailableError(MammoNodeError):
    """The database cannot be reached or opened."""


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration in code: this package's migrations, no ``alembic.ini``.

    ``connection`` is what :mod:`migrations.env` migrates; ``url`` is for the Alembic tools
    (autogenerate) that need one without a connection.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The revision this code expects (the single head of the migration history)."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if rev is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return rev


def known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for in-memory and URI databases."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


@contextmanager
def _connect(url: str, *, migrating: bool) -> Iterator[Connection]:
    """A connection on a throwaway engine; connection failures become one readable error.

    ``migrating``: open a transaction that owns the schema (SQLite: foreign keys off and
    ``BEGIN IMMEDIATE``; PostgreSQL: the migration advisory lock), committed on success.
    """
    try:
        engine = make_engine(url, poolclass=NullPool)
    except ArgumentError as exc:  # its text never contains the URL
        raise ConfigError(f"database_url is not usable: {exc}") from None
    if migrating and is_sqlite(url):
        _own_sqlite_transactions(engine)
    try:
        try:
            conn = engine.connect()
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "unknown error"
            raise DatabaseUnavailableError(f"cannot open the database {mask_url(url)}: {reason}") from None
        with conn:
            if not migrating:
                yield conn
                return
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
                yield conn
                if is_sqlite(url):
                    _check_foreign_keys(conn)
    finally:
        engine.dispose()


def _own_sqlite_transactions(engine: Engine) -> None:
    """Make pysqlite transactions real: the driver's own handling auto-commits DDL.

    SQLAlchemy's documented recipe: switch the driver's transaction handling off and emit BEGIN
    ourselves (IMMEDIATE: take the write lock before reading the schema version).
    """

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA foreign_keys=OFF")

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _check_foreign_keys(conn: Connection) -> None:
    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        tables = sorted({str(row[0]) for row in bad})
        raise RuntimeError(f"migration left rows with broken foreign keys in {', '.join(tables)}")


@contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A connection inside the single transaction a migration runs in (see the module doc)."""
    path = _sqlite_path(url) if is_sqlite(url) else None
    if path is not None:  # the database names patients: owner-only, and so its -wal and -shm
        private_file(private_dir(path.parent) / path.name)
    with _connect(url, migrating=True) as conn:
        yield conn


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (SQLite: the file and its folder are made)."""
    with migration_connection(url) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:
        log.debug("database schema upgraded from %s to %s", before or "empty", after)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``base``: no tables left)."""
    with migration_connection(url) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.downgrade(alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:
        log.debug("database schema downgraded from %s to %s", before, after or "empty")


def current(url: str) -> str | None:
    """The database's revision; None when it has none (empty, or a SQLite file not made yet)."""
    if is_sqlite(url):
        path = _sqlite_path(url)
        if path is not None and not path.exists():
            return None
    with _connect(url, migrating=False) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _has_node_tables(url: str) -> bool:
    path = _sqlite_path(url) if is_sqlite(url) else None
    if path is not None and not path.exists():
        return False
    with _connect(url, migrating=False) as conn:
        return bool(set(inspect(conn).get_table_names()) & set(Base.metadata.tables))


def ensure_schema(url: str, *, create_sqlite: bool = True) -> None:
    """Make sure the database is at :func:`head` before the node uses it.

    SQLite (when ``create_sqlite``) is created or upgraded here; any other database must already
    be at head, otherwise :class:`SchemaVersionError` tells the operator to run
    ``mammonode db upgrade``. A revision this code does not know (a newer MammoNode migrated the
    database) is refused in both cases rather than guessed at.
    """
    expected = head()
    found = current(url)
    if found == expected:
        return
    if found is not None and found not in known_revisions():
        raise SchemaVersionError(
            f"database schema is at {found}, which this version of MammoNode does not know "
            f"(expected {expected}): was it upgraded by a newer MammoNode?"
        )
    if found is None and _has_node_tables(url):
        raise SchemaVersionError(
            "database has MammoNode tables but no schema revision (not made by `mammonode db upgrade`)"
        )
    if is_sqlite(url) and create_sqlite:
        log.info("bringing the SQLite database schema from %s to %s", found or "empty", expected)
        upgrade(url)
        return
    raise SchemaVersionError(
        f"database schema is at {found or 'empty'}, expected {expected}: run `mammonode db upgrade`"
    )
