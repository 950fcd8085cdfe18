"""The migrations are the schema: they build it from nothing, agree with the models, go down and
up again with data present, keep the audit log append-only, and guard the node's start.

Every test that touches a database runs on SQLite and on PostgreSQL (the ``db_kind`` fixtures).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from postgres_cluster import free_port
from sqlalchemy import Engine, delete, func, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.audit.chain import GENESIS_HASH, read_head
from node.audit.verify import verify_chain
from node.db import migrate
from node.db.models import (
    Association,
    AuditChainHead,
    AuditEvent,
    Base,
    Breast,
    Instance,
    Job,
    ModelVersion,
    OutputObject,
    Score,
    Study,
    Transmission,
)
from node.db.session import make_engine
from node.db.states import JobState, StudyState, TransmissionState, values

NODE_TABLES = set(Base.metadata.tables)
SECRET = "s3cret-Pa55"


@contextmanager
def engine_on(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    with engine_on(url) as engine:
        return set(inspect(engine).get_table_names())


def fill_every_table(session: Session) -> None:
    """One linked row in each table, the way the node writes them."""
    association = Association(
        calling_ae="MODALITY", called_ae="MAMMONODE", peer_host="127.0.0.1", peer_port=40000, accepted=True
    )
    study = Study(study_uid="1.2.826.0.1.1", patient_id="PAT-1")
    model = ModelVersion(
        name="mammonode-test", version="0.0.1", weights_sha256="ab" * 32, path="/m", metrics={"auc": 0.8}
    )
    session.add_all([association, study, model])
    session.flush()
    session.add(Breast(study=study, laterality="L"))
    session.add(
        Instance(
            sop_instance_uid="1.2.826.0.1.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
            study=study,
            series_uid="1.2.826.0.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.4.90",
            laterality="L",
            view="CC",
            spool_path="a/b/c.dcm",
            size_bytes=1234,
            association_id=association.id,
        )
    )
    job = Job(study=study, version=1, lateralities="L", model_version_id=model.id)
    session.add(job)
    session.flush()
    session.add(
        Score(
            job=job,
            level="breast",
            laterality="L",
            probability=0.25,
            recall=False,
            threshold=0.5,
            model_name=model.name,
            model_version=model.version,
            weights_sha256=model.weights_sha256,
            input_uids={"sop_instance_uids": ["1.2.826.0.1.1.1"]},
        )
    )
    output = OutputObject(
        job_id=job.id,
        kind="SR",
        sop_instance_uid="1.2.826.0.1.1.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
        outbox_path="1.2.826.0.1.1/1.2.826.0.1.1.9.dcm",
    )
    session.add(output)
    session.flush()
    session.add(Transmission(output_id=output.id, destination="PACS@127.0.0.1:4242"))
    audit.record(session, audit.STUDY_SCORED, "worker", patient_id="PAT-1", study_uid=study.study_uid)


def row_counts(session: Session) -> dict[str, int]:
    return {
        table.name: session.execute(select(func.count()).select_from(table)).scalar_one()
        for table in Base.metadata.sorted_tables
    }


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    assert heads == [migrate.head()]


def test_upgrade_from_empty_creates_every_table(empty_db_url: str) -> None:
    assert migrate.current(empty_db_url) is None
    assert not tables(empty_db_url) & NODE_TABLES

    migrate.upgrade(empty_db_url)

    assert tables(empty_db_url) == NODE_TABLES | {"alembic_version"}
    assert migrate.current(empty_db_url) == migrate.head()


def test_models_and_migrations_agree(db_url: str) -> None:
    """What the models declare is what the migrations built: autogenerate finds nothing to do."""
    with engine_on(db_url) as engine, engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_state_checks_name_every_state_of_the_enums() -> None:
    """0003 writes the words out; a state added to an enum needs a revision that widens its CHECK."""
    revision = importlib.import_module("migrations.versions.0003_state_checks")
    assert {
        "studies": values(StudyState),
        "jobs": values(JobState),
        "transmissions": values(TransmissionState),
    } == revision.STATES


def test_database_refuses_a_state_outside_the_enums(sessions: sessionmaker[Session]) -> None:
    """The CHECK constraints hold whatever writes the row: ORM, a bare UPDATE, or an operator's SQL."""
    with sessions() as session:
        fill_every_table(session)
        session.commit()
    for model, table in ((Study, "studies"), (Job, "jobs"), (Transmission, "transmissions")):
        with sessions() as session, pytest.raises(IntegrityError, match=f"ck_{table}_state"):
            session.execute(update(model).values(state="limbo"))
            session.flush()
        with sessions() as session, pytest.raises(IntegrityError, match=f"ck_{table}_state"):
            session.execute(text(f"UPDATE {table} SET state = 'PENDING'"))  # the member name, not its value
            session.flush()
    with sessions() as session:
        assert session.scalar(select(Study.state)) == StudyState.RECEIVING
        assert session.scalar(select(Job.state)) == JobState.PENDING
        assert session.scalar(select(Transmission.state)) == TransmissionState.PENDING
        for state in JobState:  # every word of the enum is accepted
            session.execute(update(Job).values(state=state))
            session.flush()
        session.rollback()


def test_downgrade_with_data_then_upgrade_again(sessions: sessionmaker[Session], db_url: str) -> None:
    with sessions() as session:
        fill_every_table(session)
        session.commit()
        assert all(n == 1 for n in row_counts(session).values()), row_counts(session)
    sessions.kw["bind"].dispose()

    migrate.downgrade(db_url, "base")
    assert migrate.current(db_url) is None
    assert not tables(db_url) & NODE_TABLES

    migrate.upgrade(db_url)
    assert migrate.current(db_url) == migrate.head()
    with engine_on(db_url) as engine, Session(engine) as session:
        counts = row_counts(session)
        assert counts.pop(AuditChainHead.__tablename__) == 1  # the chain's head, at the genesis
        assert set(counts.values()) == {0}
        assert read_head(session).anchor == f"0:{GENESIS_HASH}"
        fill_every_table(session)  # the schema takes the same data again
        session.commit()
        with pytest.raises(DBAPIError, match="append-only"):  # and the triggers are back
            session.execute(delete(AuditEvent))
            session.flush()


def _chain(session: Session) -> list[tuple[int, int, str, str]]:
    rows = session.execute(
        select(AuditEvent.id, AuditEvent.seq, AuditEvent.prev_hash, AuditEvent.row_hash).order_by(
            AuditEvent.id
        )
    )
    return [(r.id, r.seq, r.prev_hash, r.row_hash) for r in rows]


def test_audit_chain_revision_chains_the_rows_it_finds(sessions: sessionmaker[Session], db_url: str) -> None:
    """0005 chains events written before it in id order, with the very hashes the node gives the
    same rows (its hashing is written out, not imported), and its downgrade keeps the events and
    their append-only triggers."""
    with sessions() as session:
        fill_every_table(session)
        session.commit()
    for n, details in enumerate(
        [
            {"p": 0.1, "n": [1, 2.5, -0.0, 10**20], "ok": True},
            None,
            {"name": "Zoë ß 日本", "z": {"b": 1, "a": None}},
        ]
    ):
        with sessions() as session:
            audit.record(session, audit.INSTANCE_RECEIVED, "scp", patient_id=f"PAT-é{n}", details=details)
            session.commit()
    with sessions() as session:
        node_chain = _chain(session)
        head = read_head(session)
    assert [seq for _, seq, _, _ in node_chain] == [1, 2, 3, 4]
    sessions.kw["bind"].dispose()

    migrate.downgrade(db_url, "0004")
    with engine_on(db_url) as engine:
        assert "audit_chain_head" not in inspect(engine).get_table_names()
        assert not {"seq", "prev_hash", "row_hash"} & {
            c["name"] for c in inspect(engine).get_columns("audit_events")
        }
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM audit_events")) == 4
        with engine.begin() as conn, pytest.raises(DBAPIError, match="append-only"):
            conn.execute(text("UPDATE audit_events SET actor = 'someone'"))

    migrate.upgrade(db_url)
    with engine_on(db_url) as engine, Session(engine) as session:
        assert _chain(session) == node_chain
        assert read_head(session) == head
        verdict = verify_chain(session, [(head.seq, head.row_hash)])
        assert verdict.ok and verdict.checked == 4, verdict
        with pytest.raises(DBAPIError, match="append-only"):
            session.execute(update(AuditEvent).values(actor="someone"))
        session.rollback()
        with pytest.raises(DBAPIError, match="moves only forward"):
            session.execute(update(AuditChainHead).values(seq=0))


def test_audit_events_refuse_update_and_delete(sessions: sessionmaker[Session], db_kind: str) -> None:
    with sessions() as session:
        audit.record(session, audit.INSTANCE_RECEIVED, "scp", patient_id="PAT-1", study_uid="1.2.3")
        session.commit()

    statements = [
        update(AuditEvent).values(patient_id="SOMEONE-ELSE"),
        delete(AuditEvent),
    ]
    if db_kind == "postgresql":
        statements.append(text("TRUNCATE audit_events"))
    for statement in statements:
        with sessions() as session, pytest.raises(DBAPIError, match="append-only"):
            session.execute(statement)
            session.commit()

    with sessions() as session:
        rows = session.scalars(select(AuditEvent)).all()
        assert [(r.event, r.patient_id) for r in rows] == [(audit.INSTANCE_RECEIVED, "PAT-1")]
        audit.record(session, audit.INSTANCE_RECEIVED, "scp", study_uid="1.2.4")  # appending still works
        session.commit()
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 2


def test_failed_upgrade_changes_nothing(empty_db_url: str) -> None:
    """One transaction per migration run, on SQLite too: a failure half-way leaves no table behind."""
    with engine_on(empty_db_url) as engine, engine.begin() as conn:
        conn.execute(text("CREATE TABLE transmissions (id INTEGER PRIMARY KEY)"))  # in the way

    with pytest.raises(DBAPIError):
        migrate.upgrade(empty_db_url)

    assert tables(empty_db_url) - {"alembic_version"} == {"transmissions"}
    assert migrate.current(empty_db_url) is None


def test_ensure_schema_creates_sqlite_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "mammonode.sqlite"
    url = f"sqlite:///{path}"

    migrate.ensure_schema(url)

    assert path.is_file()
    assert migrate.current(url) == migrate.head()
    assert tables(url) == NODE_TABLES | {"alembic_version"}
    migrate.ensure_schema(url)  # a second start finds it ready
    assert migrate.current(url) == migrate.head()


def test_ensure_schema_refuses_a_database_not_at_head(empty_db_url: str, db_kind: str) -> None:
    """PostgreSQL (and SQLite when not allowed to create) must be upgraded by the operator."""
    create_sqlite = db_kind != "sqlite"  # on PostgreSQL the flag must not matter
    expected = f"database schema is at empty, expected {migrate.head()}: run `mammonode db upgrade`"
    with pytest.raises(migrate.SchemaVersionError) as refused:
        migrate.ensure_schema(empty_db_url, create_sqlite=create_sqlite)
    assert str(refused.value) == expected
    assert not tables(empty_db_url) & NODE_TABLES

    migrate.upgrade(empty_db_url)
    migrate.ensure_schema(empty_db_url, create_sqlite=create_sqlite)


def test_ensure_schema_refuses_an_unknown_revision(db_url: str) -> None:
    with engine_on(db_url) as engine, engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    with pytest.raises(migrate.SchemaVersionError, match="f00dfeed, which this version of MammoNode"):
        migrate.ensure_schema(db_url)


def test_ensure_schema_refuses_tables_without_a_revision(db_url: str) -> None:
    with engine_on(db_url) as engine, engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    with pytest.raises(migrate.SchemaVersionError, match="no schema revision"):
        migrate.ensure_schema(db_url)


def mammonode(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, from a folder that holds no project files."""
    exe = shutil.which("mammonode", path=str(Path(sys.executable).parent))
    assert exe is not None, "the mammonode console script is not installed next to this python"
    return subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def node_env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    env["MAMMONODE_DATA_DIR"] = str(tmp_path / "data")
    env["MAMMONODE_DATABASE_URL"] = url
    return env


def test_db_upgrade_command(empty_db_url: str, db_kind: str, tmp_path: Path) -> None:
    url = empty_db_url
    if db_kind == "postgresql":  # trust authentication ignores it; the CLI must not show it
        url = make_url(url).set(password=SECRET).render_as_string(hide_password=False)
    env = node_env(tmp_path, url)

    done = mammonode("db", "upgrade", env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert f"upgraded from empty to {migrate.head()}" in done.stdout
    assert SECRET not in output and url not in output and empty_db_url not in output
    assert migrate.current(empty_db_url) == migrate.head()
    with engine_on(empty_db_url) as engine, Session(engine) as session:
        events = session.scalars(select(AuditEvent)).all()
    assert [(e.event, e.details) for e in events] == [
        (audit.DB_UPGRADED, {"from": None, "to": migrate.head()})
    ]
    assert events[0].actor.startswith("cli:")

    again = mammonode("db", "upgrade", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "already at" in again.stdout
    shown = mammonode("db", "current", env=env, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.strip() == f"{migrate.head()} (head)"
    assert SECRET not in again.stdout + again.stderr + shown.stdout + shown.stderr


def test_db_upgrade_command_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://mammonode:{SECRET}@127.0.0.1:{free_port()}/mammonode"

    done = mammonode("db", "upgrade", env=node_env(tmp_path, url), cwd=tmp_path)

    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the database"), done.stderr
    assert "postgresql+psycopg://mammonode:***@127.0.0.1" in lines[0]
    assert SECRET not in done.stderr
