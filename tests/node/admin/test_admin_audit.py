"""`mammonode audit list|show|export` on both databases: filters, the study timeline, exports."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest
from admin_helpers import T0, add_association, audit_events, cli, record_event, study_uid
from sqlalchemy.orm import Session, sessionmaker

from node import audit
from node.db.models import Instance, Study

STUDY_A = study_uid("audit-a")
STUDY_B = study_uid("audit-b")


def _seconds(n: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=n)


@pytest.fixture
def log(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Two patients' studies through receipt, scoring and delivery, plus noise around them."""
    ids: dict[str, int] = {}
    assoc = add_association(sessions, "MODALITY", "10.0.0.5", 40001, _seconds(0))
    other = add_association(sessions, "OTHERUNIT", "10.0.0.9", 40002, _seconds(0))
    with sessions() as session:
        study = Study(study_uid=STUDY_A, patient_id="PAT-A")
        session.add(study)
        session.flush()
        session.add(
            Instance(
                sop_instance_uid=f"{STUDY_A}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                study_id=study.id,
                series_uid=f"{STUDY_A}.0",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path="x.dcm",
                size_bytes=1,
                association_id=assoc,
            )
        )
        session.commit()
    # Recorded out of time order on purpose: the timeline sorts by time, not by row ID.
    ids["sent"] = record_event(sessions, audit.RESULT_SENT, _seconds(90), "sender", study_uid=STUDY_A)
    ids["scored"] = record_event(
        sessions,
        audit.STUDY_SCORED,
        _seconds(70),
        "worker",
        patient_id="PAT-A",
        study_uid=STUDY_A,
        details={"model": "m", "exam_probability": 0.25},
    )
    ids["accepted"] = record_event(
        sessions,
        audit.ASSOCIATION_ACCEPTED,
        _seconds(0),
        calling_ae="MODALITY",
        peer="10.0.0.5:40001",
        details={"association_id": assoc},
    )
    ids["accepted_legacy"] = record_event(  # no association_id: matched by AE, host and time
        sessions, audit.ASSOCIATION_ACCEPTED, _seconds(1), calling_ae="MODALITY", peer="10.0.0.5:40001"
    )
    ids["other_assoc"] = record_event(
        sessions,
        audit.ASSOCIATION_ACCEPTED,
        _seconds(0),
        calling_ae="OTHERUNIT",
        peer="10.0.0.9:40002",
        details={"association_id": other},
    )
    ids["late_same_ae"] = record_event(  # same AE and host, an hour later: another association
        sessions, audit.ASSOCIATION_ACCEPTED, _seconds(3600), calling_ae="MODALITY", peer="10.0.0.5:40009"
    )
    ids["received"] = record_event(
        sessions,
        audit.INSTANCE_RECEIVED,
        _seconds(2),
        patient_id="PAT-A",
        study_uid=STUDY_A,
        sop_instance_uid=f"{STUDY_A}.1",
    )
    ids["ready"] = record_event(sessions, audit.STUDY_READY, _seconds(62), "assembly", study_uid=STUDY_A)
    ids["b_received"] = record_event(
        sessions,
        audit.INSTANCE_RECEIVED,
        _seconds(5000),
        patient_id="PAT-B",
        study_uid=STUDY_B,
        sop_instance_uid=f"{STUDY_B}.1",
    )
    ids["b_failed"] = record_event(
        sessions,
        audit.RESULT_FAILED,
        _seconds(7200),
        "sender",
        study_uid=STUDY_B,
        details={"error": "refused"},
    )
    return ids


def _ids(output: str) -> list[int]:
    return [json.loads(line)["id"] for line in output.splitlines() if line.startswith("{")]


def test_list_filters_by_patient_study_event_and_time(
    log: dict[str, int], db_url: str, tmp_path: Path
) -> None:
    by_patient = cli(["audit", "list", "--patient", "PAT-B", "--json"], db_url, tmp_path)
    assert by_patient.exit_code == 0, by_patient.output
    assert _ids(by_patient.output) == [log["b_received"]]

    by_study = cli(["audit", "list", "--study", STUDY_A, "--json"], db_url, tmp_path)
    assert _ids(by_study.output) == [log["received"], log["ready"], log["scored"], log["sent"]]

    by_event = cli(["audit", "list", "--event", "result.*", "--json"], db_url, tmp_path)
    assert _ids(by_event.output) == [log["sent"], log["b_failed"]]

    two_events = cli(
        ["audit", "list", "--event", audit.STUDY_READY, "--event", audit.RESULT_SENT, "--json"],
        db_url,
        tmp_path,
    )
    assert _ids(two_events.output) == [log["ready"], log["sent"]]

    window = cli(
        ["audit", "list", "--since", _seconds(60).isoformat(), "--until", "2026-03-02T08:01:30", "--json"],
        db_url,
        tmp_path,
    )
    assert _ids(window.output) == [log["ready"], log["scored"], log["sent"]]

    # An offset is honoured: 09:01:00+01:00 is 08:01:00 UTC.
    since_offset = cli(
        ["audit", "list", "--since", "2026-03-02T09:01:00+01:00", "--study", STUDY_A, "--json"],
        db_url,
        tmp_path,
    )
    assert _ids(since_offset.output) == [log["ready"], log["scored"], log["sent"]]

    newest = cli(["audit", "list", "--limit", "2"], db_url, tmp_path)
    assert newest.exit_code == 0
    assert "2 of 10 event(s)" in newest.output
    assert STUDY_B in newest.output and audit.RESULT_FAILED in newest.output


def test_list_rejects_unknown_event_and_bad_time(log: dict[str, int], db_url: str, tmp_path: Path) -> None:
    bad_event = cli(["audit", "list", "--event", "study.scroed"], db_url, tmp_path)
    assert bad_event.exit_code != 0
    assert "unknown audit event 'study.scroed'" in str(bad_event.exception)
    bad_time = cli(["audit", "list", "--since", "yesterday"], db_url, tmp_path)
    assert "is not an ISO date" in str(bad_time.exception)


def test_show_prints_the_study_timeline_in_time_order(
    log: dict[str, int], db_url: str, tmp_path: Path
) -> None:
    shown = cli(["audit", "show", STUDY_A, "--json"], db_url, tmp_path)
    assert shown.exit_code == 0, shown.output
    assert _ids(shown.output) == [
        log["accepted"],
        log["accepted_legacy"],
        log["received"],
        log["ready"],
        log["scored"],
        log["sent"],
    ]
    text = cli(["audit", "show", STUDY_A], db_url, tmp_path)
    lines = text.output.splitlines()
    assert lines[0] == f"study {STUDY_A} (patient PAT-A)"
    order = [
        audit.ASSOCIATION_ACCEPTED,
        audit.ASSOCIATION_ACCEPTED,
        audit.INSTANCE_RECEIVED,
        audit.STUDY_READY,
        audit.STUDY_SCORED,
        audit.RESULT_SENT,
    ]
    assert [line.split()[2] for line in lines[1:-1]] == order
    assert "MODALITY@10.0.0.5:40001" in lines[1]
    assert "exam_probability=0.25" in text.output
    assert lines[-1] == "6 event(s)"

    unknown = cli(["audit", "show", study_uid("never-seen")], db_url, tmp_path)
    assert unknown.exit_code != 0 and "no study" in str(unknown.exception)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_writes_what_list_shows_and_is_audited(
    fmt: str, log: dict[str, int], sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    listed = cli(["audit", "list", "--study", STUDY_A, "--json", "--limit", "1000"], db_url, tmp_path)
    expected = [json.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    out = tmp_path / f"audit.{fmt}"
    result = cli(
        ["audit", "export", "--format", fmt, "--out", str(out), "--study", STUDY_A], db_url, tmp_path
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {len(expected)} event(s)" in result.output

    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        with out.open(newline="", encoding="utf-8") as fh:
            rows = [
                {
                    **{k: (v if v != "" else None) for k, v in row.items()},
                    "id": int(row["id"]),
                    "seq": int(row["seq"]),
                    "details": json.loads(row["details"]) if row["details"] else None,
                }
                for row in csv.DictReader(fh)
            ]
    assert rows == expected
    assert [r["id"] for r in rows] == [log["received"], log["ready"], log["scored"], log["sent"]]

    exported = audit_events(sessions, audit.DATA_EXPORTED)
    assert len(exported) == 1
    assert exported[0].study_uid == STUDY_A
    assert exported[0].actor.startswith("cli:")
    assert exported[0].details is not None
    assert exported[0].details["rows"] == 4 and exported[0].details["format"] == fmt
    assert exported[0].details["out"] == str(out.resolve())
