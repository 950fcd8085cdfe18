"""`mammonode queue [list] | retry | drop`: states change as asked, on both databases, audited."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from admin_helpers import T0, add_outbox, audit_events, cli, study_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.db.models import Job, Study, Transmission, as_utc

STUDY = study_uid("queue")
FAILING = study_uid("queue-failing-job")


def _states(sessions: sessionmaker[Session]) -> dict[int, str]:
    with sessions() as session:
        return {t.id: t.state for t in session.scalars(select(Transmission))}


def _listed(output: str) -> dict[str, dict[str, object]]:
    return {
        row["id"]: row for row in (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    }


def test_list_shows_waiting_failing_and_dead_items_and_failed_jobs(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    _, (pending, sent, failed, dead) = add_outbox(
        sessions, STUDY, states=("pending", "sent", "failed", "dead")
    )
    job_id, _ = add_outbox(sessions, FAILING, states=(), job_state="failed")

    default = _listed(cli(["queue", "--json"], db_url, tmp_path).output)
    assert set(default) == {str(pending), str(failed), str(dead), f"job:{job_id}"}
    assert default[str(dead)]["state"] == "dead"
    assert default[str(dead)]["kind"] == "SR"
    assert default[str(dead)]["study_uid"] == STUDY
    assert default[str(dead)]["last_error"] == "association rejected"
    assert default[str(failed)]["destination"] == "PACS2@127.0.0.1:10402"
    assert default[f"job:{job_id}"]["last_error"] == "RuntimeError: backend exploded"

    only_dead = _listed(cli(["queue", "list", "--state", "dead", "--json"], db_url, tmp_path).output)
    assert set(only_dead) == {str(dead)}
    everything = _listed(cli(["queue", "list", "--state", "all", "--json"], db_url, tmp_path).output)
    assert str(sent) in everything

    table = cli(["queue"], db_url, tmp_path)
    assert table.exit_code == 0, table.output
    assert f"job:{job_id}" in table.output and "last error: association rejected" in table.output


def test_retry_and_drop_change_states_and_are_audited(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    _, (pending, sent, failed, dead) = add_outbox(
        sessions, STUDY, states=("pending", "sent", "failed", "dead")
    )
    before = dt.datetime.now(dt.UTC)

    retried = cli(["queue", "retry", "--all-dead"], db_url, tmp_path)
    assert retried.exit_code == 0, retried.output
    assert f"transmission {dead} (SR to PACS3@127.0.0.1:10403): dead -> pending" in retried.output
    assert _states(sessions) == {pending: "pending", sent: "sent", failed: "failed", dead: "pending"}
    with sessions() as session:
        row = session.get(Transmission, dead)
        assert row is not None
        assert as_utc(row.next_attempt_at) >= before - dt.timedelta(seconds=1)
        assert as_utc(row.next_attempt_at) < T0 + dt.timedelta(days=3650)
        assert row.attempts == 3  # history is kept

    dropped = cli(["queue", "drop", str(failed)], db_url, tmp_path)
    assert dropped.exit_code == 0, dropped.output
    assert _states(sessions)[failed] == "dropped"

    again = cli(["queue", "retry", str(failed)], db_url, tmp_path)
    assert again.exit_code == 0, again.output
    assert _states(sessions)[failed] == "pending"

    retries = audit_events(sessions, audit.QUEUE_RETRY)
    drops = audit_events(sessions, audit.QUEUE_DROP)
    assert [(e.details or {})["transmission_id"] for e in retries] == [dead, failed]
    assert [(e.details or {})["from_state"] for e in retries] == ["dead", "dropped"]
    assert [(e.details or {})["transmission_id"] for e in drops] == [failed]
    assert all(e.study_uid == STUDY and e.actor.startswith("cli:") for e in [*retries, *drops])


def test_a_refused_change_changes_nothing(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    _, (failed, sent) = add_outbox(sessions, STUDY, states=("failed", "sent"))

    sent_retry = cli(["queue", "retry", str(failed), str(sent)], db_url, tmp_path)
    assert sent_retry.exit_code != 0
    assert f"transmission {sent} is sent" in str(sent_retry.exception)
    unknown = cli(["queue", "drop", str(failed), "99999"], db_url, tmp_path)
    assert "no transmission with ID 99999" in str(unknown.exception)
    garbage = cli(["queue", "drop", "../1"], db_url, tmp_path)
    assert "is not a queue ID" in str(garbage.exception)
    nothing = cli(["queue", "retry"], db_url, tmp_path)
    assert "name the items to retry" in str(nothing.exception)

    assert _states(sessions) == {failed: "failed", sent: "sent"}
    assert audit_events(sessions, audit.QUEUE_RETRY) == []
    assert audit_events(sessions, audit.QUEUE_DROP) == []


def test_retry_a_failed_scoring_job(sessions: sessionmaker[Session], db_url: str, tmp_path: Path) -> None:
    job_id, _ = add_outbox(sessions, FAILING, states=(), job_state="failed")

    result = cli(["queue", "retry", f"job:{job_id}"], db_url, tmp_path)
    assert result.exit_code == 0, result.output
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "pending" and job.claimed_by is None
        study = session.scalars(select(Study).where(Study.study_uid == FAILING)).one()
        assert study.state == "queued"
    (event,) = audit_events(sessions, audit.QUEUE_RETRY)
    assert event.study_uid == FAILING and (event.details or {})["job_id"] == job_id

    pending_drop = cli(["queue", "drop", f"job:{job_id}"], db_url, tmp_path)
    assert f"job:{job_id} is pending" in str(pending_drop.exception)
