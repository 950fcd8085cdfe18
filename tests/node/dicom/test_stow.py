"""DICOMweb destinations: STOW-RS through the same outbox as C-STORE (retries, backoff, dead letters,
audit), against a real Orthanc with its DICOMweb plugin and, for the answers Orthanc never gives
(202, 409 with a FailedSOPSequence, 415, a hang), a small STOW-RS origin on a loopback socket."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from dicom_helpers import NODE_AE, NodeFactory, add_output, events, load, mammogram, scu_store, transmission
from peers import LOOPBACK, Orthanc, OrthancFactory, dicomweb_plugin, free_port, write_study
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node import audit
from node.config import ConfigError, Destination, NodeConfig, StowAuth, StowTarget, load_config
from node.db.models import OutputObject, as_utc, utcnow
from node.dicom import stow
from node.dicom.sender import deliver_due, store_files
from node.dicom.status import DimseStatus

needs_dicomweb = pytest.mark.skipif(
    dicomweb_plugin() is None and not os.environ.get("CI"),
    reason="Orthanc's DICOMweb plugin is not installed (.ci/setup installs orthanc-dicomweb)",
)
SECRET_ENV = "MAMMONODE_TEST_STOW_SECRET"
PASSWORD = "pw-4b1d9e7c"
TOKEN = "tok-93f0c2aa"


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        ae_title=NODE_AE,
        data_dir=tmp_path / "node",
        retry_initial_seconds=30.0,
        retry_max_seconds=100.0,
        retry_max_age_hours=6.0,
    )


def stored_uids(pacs: Orthanc) -> list[str]:
    return sorted(pacs.simplified_tags(i)["SOPInstanceUID"] for i in pacs.instances())


# -- configuration ---------------------------------------------------------------------------------


def test_a_dicomweb_destination_from_a_table_and_from_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[[destinations]]\nurl = "HTTPS://PACS.Hospital.example/dicom-web/"\nauth = "bearer"\n'
        'auth_env = "PACS_TOKEN"\ntimeout_seconds = 20\n\n'
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs.hospital.example"\nport = 104\n',
        encoding="utf-8",
    )
    web, dimse = load_config(toml, environ={}).destinations
    assert web.stow is not None and dimse.stow is None
    assert (web.stow.url, web.stow.auth, web.stow.auth_env, web.stow.timeout_seconds) == (
        "https://pacs.hospital.example/dicom-web",
        StowAuth.BEARER,
        "PACS_TOKEN",
        20.0,
    )
    assert (str(web), web.host, web.port) == (
        "stow:https://pacs.hospital.example/dicom-web",
        "pacs.hospital.example",
        443,
    )
    env = {"MAMMONODE_DESTINATIONS": "stow:http://h:8042/dicom-web;auth=basic;auth_env=CRED, PACS@h:104"}
    web2, dimse2 = load_config(toml, environ=env).destinations  # the environment replaces the tables
    assert web2.stow is not None and (web2.stow.auth, web2.stow.auth_env, web2.port) == (
        StowAuth.BASIC,
        "CRED",
        8042,
    )
    assert str(dimse2) == "PACS@h:104"
    assert Destination.parse(str(web2)) == Destination.web(StowTarget(web2.stow.url))  # the outbox's text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("stow:ftp://h/dicom-web", "must be an http:// or https:// URL"),
        (f"stow:http://user:{PASSWORD}@h/dicom-web", "must not hold credentials"),
        ("stow:http://h:99999/dicom-web", "invalid port"),
        ("stow:http://h/dicom-web?token=x", "no query"),
        ("stow:http://h/dicom-web;auth=basic", "auth and auth_env go together"),
        ("stow:http://h/dicom-web;auth=digest;auth_env=X", "auth must be one of basic, bearer"),
        ("stow:http://h/dicom-web;auth=bearer;auth_env=NOT-A-NAME", "not an environment variable name"),
        ("stow:http://h/dicom-web;timeout_seconds=0", "timeout_seconds must be a number > 0"),
        ("stow:http://h/dicom-web;name=PACSWEB", "unknown key(s) name"),
        ("PACS@h", "must look like AE@HOST:PORT or stow:URL"),
    ],
)
def test_a_bad_destination_is_one_line_naming_the_setting(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"MAMMONODE_DESTINATIONS": value})
    text = str(caught.value)
    assert text.startswith("MAMMONODE_DESTINATIONS: ") and message in text and "\n" not in text
    assert PASSWORD not in text


def test_the_example_config_shows_a_dicomweb_table_that_loads(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[3] / "deploy" / "mammonode.toml.example").read_text(
        encoding="utf-8"
    )
    commented = text[text.index("# [[destinations]]\n# url") :]
    toml = tmp_path / "node.toml"
    toml.write_text("\n".join(line.removeprefix("# ") for line in commented.splitlines()), encoding="utf-8")
    [web] = load_config(toml, environ={}).destinations
    assert web.stow is not None and web.stow.auth == StowAuth.BEARER and web.host.endswith(".example")


def test_a_table_with_both_kinds_of_keys_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[[destinations]]\nurl = "http://h/dicom-web"\nport = 104\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^destinations: DICOMweb destination: unknown key\(s\) port"):
        load_config(toml, environ={})


# -- against Orthanc (DICOMweb plugin) ---------------------------------------------------------


@pytest.mark.peers
@needs_dicomweb
def test_scored_results_arrive_in_orthanc_over_stow(
    sessions: sessionmaker[Session],
    node_scp: NodeFactory,
    orthanc: OrthancFactory,
    test_model: Path,
    tmp_path: Path,
) -> None:
    """A study received over DICOM and scored by the worker: its CAM captures and SR reach the
    PACS by STOW-RS, every transmission is sent and audited with the destination as the peer."""
    from node.queue.assembly import promote_ready
    from node.queue.worker import Worker

    pacs = orthanc(None, dicomweb=True)
    destination = Destination.parse(pacs.stow_destination)
    node = node_scp(model_dir=test_model, destinations=(destination,))
    study = write_study(
        tmp_path / "study",
        patient_id="STOW-1",
        study_uid=derive_uid("tests", "stow"),
        transfer_syntax="explicit",
    )
    assert scu_store(node.port, study) == [0, 0, 0, 0]
    assert len(promote_ready(node.config, sessions, now=utcnow() + dt.timedelta(minutes=5))) == 1
    assert Worker(node.config, sessions).run_once() == 1
    with sessions() as session:
        outputs = sorted(session.scalars(select(OutputObject.sop_instance_uid)))
    assert len(outputs) >= 5  # a CAM capture per image and the SR

    assert deliver_due(node.config, sessions) == len(outputs)

    assert stored_uids(pacs) == outputs
    sent = events(sessions, audit.RESULT_SENT)
    assert sorted(e.sop_instance_uid or "" for e in sent) == outputs
    assert {e.peer for e in sent} == {str(destination)} and {e.patient_id for e in sent} == {"STOW-1"}
    assert deliver_due(node.config, sessions, utcnow() + dt.timedelta(hours=1)) == 0


@pytest.mark.peers
@needs_dicomweb
def test_orthanc_down_is_retried_and_the_results_arrive_once(
    sessions: sessionmaker[Session], config: NodeConfig, orthanc: OrthancFactory, tmp_path: Path
) -> None:
    pacs = orthanc(None, dicomweb=True)
    pacs.kill()  # the PACS is down when the results are due
    files = [mammogram(tmp_path, "a"), mammogram(tmp_path, "b", laterality="R", number=2)]
    t0 = utcnow()
    ids = [add_output(sessions, config, f, pacs.stow_destination, now=t0) for f in files]

    assert deliver_due(config, sessions, t0) == 2
    for tx_id in ids:
        row = transmission(sessions, tx_id)
        assert (row.state, row.attempts) == ("failed", 1)
        assert "no STOW-RS response" in (row.last_error or "") and "Connection refused" in (
            row.last_error or ""
        )
        assert as_utc(row.next_attempt_at) == t0 + dt.timedelta(seconds=30)
    assert deliver_due(config, sessions, t0 + dt.timedelta(seconds=29)) == 0  # backing off

    pacs.start()  # back, same ports
    assert deliver_due(config, sessions, t0 + dt.timedelta(seconds=30)) == 2
    assert [transmission(sessions, i).state for i in ids] == ["sent", "sent"]
    assert stored_uids(pacs) == sorted(str(load(f).SOPInstanceUID) for f in files)
    assert deliver_due(config, sessions, t0 + dt.timedelta(days=1)) == 0
    assert len(events(sessions, audit.RESULT_FAILED)) == 2 and len(events(sessions, audit.RESULT_SENT)) == 2


@pytest.mark.peers
@needs_dicomweb
def test_a_wrong_path_is_retried_then_dead_lettered_with_audit(
    sessions: sessionmaker[Session], config: NodeConfig, orthanc: OrthancFactory, tmp_path: Path
) -> None:
    """404: no STOW-RS service at that URL, a fault of the destination like a refused association:
    retried with backoff, a dead letter once older than retry_max_age_hours."""
    pacs = orthanc(None, dicomweb=True)
    t0 = utcnow()
    tx_id = add_output(sessions, config, mammogram(tmp_path, "a"), f"stow:{pacs.url}/no-such-path", now=t0)
    assert deliver_due(config, sessions, t0) == 1
    row = transmission(sessions, tx_id)
    assert row.state == "failed" and "HTTP 404" in (row.last_error or "")
    [failed] = events(sessions, audit.RESULT_FAILED)
    assert (
        "HTTP 404" in (failed.details or {}).get("status", "")
        and failed.peer == f"stow:{pacs.url}/no-such-path"
    )

    assert deliver_due(config, sessions, t0 + dt.timedelta(hours=config.retry_max_age_hours, minutes=1)) == 1
    assert transmission(sessions, tx_id).state == "dead"
    [dead] = events(sessions, audit.RESULT_DEAD)
    assert (dead.details or {}).get("reason") == "older than retry_max_age_hours"
    assert pacs.instances() == []


@pytest.mark.peers
@needs_dicomweb
def test_basic_auth_from_the_environment_and_401_without_it(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    orthanc: OrthancFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PACS that wants credentials answers 401 until the node has them (retried, like a refused
    association); once ``auth_env`` names a set variable, delivery resumes with no command. The
    secret appears in no log line, outbox row or audit event."""
    caplog.set_level(logging.DEBUG)
    pacs = orthanc(None, dicomweb=True, users={"mammonode": PASSWORD})
    t0 = utcnow()
    tx_id = add_output(sessions, config, mammogram(tmp_path, "a"), pacs.stow_destination, now=t0)

    assert deliver_due(config, sessions, t0) == 1  # no credentials configured
    row = transmission(sessions, tx_id)
    assert row.state == "failed" and "HTTP 401" in (row.last_error or "")

    with_auth = Destination.parse(f"{pacs.stow_destination};auth=basic;auth_env={SECRET_ENV}")
    configured = dataclasses.replace(config, destinations=(with_auth,))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert deliver_due(configured, sessions, t0 + dt.timedelta(seconds=30)) == 1  # variable not set yet
    assert f"environment variable {SECRET_ENV} (auth_env) is not set" in (
        transmission(sessions, tx_id).last_error or ""
    )

    monkeypatch.setenv(SECRET_ENV, f"mammonode:{PASSWORD}")
    assert deliver_due(configured, sessions, t0 + dt.timedelta(minutes=5)) == 1
    assert transmission(sessions, tx_id).state == "sent"
    assert len(stored_uids(pacs)) == 1
    recorded = json.dumps([e.details for e in events(sessions)]) + (
        transmission(sessions, tx_id).last_error or ""
    )
    assert PASSWORD not in caplog.text and PASSWORD not in recorded


@pytest.mark.peers
@needs_dicomweb
def test_mammonode_send_to_a_stow_url(orthanc: OrthancFactory, tmp_path: Path) -> None:
    pacs = orthanc(None, dicomweb=True)
    files = [mammogram(tmp_path, "a"), mammogram(tmp_path, "b", laterality="R", number=2)]
    run = subprocess.run(
        [sys.executable, "-m", "node.commands.app", "send", *map(str, files), "--to", pacs.stow_destination],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert f"sent 2 of 2 file(s) to {pacs.stow_destination}" in run.stdout
    assert stored_uids(pacs) == sorted(str(load(f).SOPInstanceUID) for f in files)


# -- a scripted STOW-RS origin: the answers Orthanc does not give ------------------------------------

Answer = Callable[[list[str]], tuple[int, dict[str, Any] | None]]
"""SOP Instance UIDs of one request -> (HTTP status, DICOM JSON body or None)."""
LOGIN_PAGE = 299
"""An answer :func:`fake_stow` turns into a 200 with an HTML page, as a proxy's login page."""


@dataclass
class FakeStow:
    """What a :func:`fake_stow` origin got: per request its headers and the SOP Instance UIDs."""

    port: int
    answer: Answer
    delay: float = 0.0
    requests: list[tuple[dict[str, str], list[str]]] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return f"stow:http://{LOOPBACK}:{self.port}/dicom-web"


def _part_uids(content_type: str, body: bytes) -> list[str]:
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    uids = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        payload = chunk.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n")
        uids.append(str(dcmread(BytesIO(payload), stop_before_pixels=True).SOPInstanceUID))
    return uids


@contextmanager
def fake_stow(answer: Answer, delay: float = 0.0) -> Iterator[FakeStow]:
    state = FakeStow(0, answer, delay)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            uids = _part_uids(self.headers["Content-Type"], body)
            state.requests.append((dict(self.headers), uids))
            time.sleep(state.delay)
            status, payload = state.answer(uids)
            data = json.dumps(payload).encode() if payload is not None else b""
            headers = {"Content-Type": "application/dicom+json"} if payload is not None else {}
            if status in (301, 302, 303):
                headers["Location"] = "/elsewhere"
            if status == LOGIN_PAGE:
                status, data = 200, b"<html>log in</html>"
                headers["Content-Type"] = "text/html; charset=utf-8"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the timeout test's client left
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _sequence(uids: list[str], reason: int | None = None) -> list[dict[str, Any]]:
    items = []
    for uid in uids:
        item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return items


def stow_body(stored: list[str], failed: dict[str, int] | None = None) -> dict[str, Any]:
    """A STOW-RS response: ReferencedSOPSequence (stored) and FailedSOPSequence (UID -> reason)."""
    body: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": _sequence(stored)}}
    for uid, reason in (failed or {}).items():
        body.setdefault("00081198", {"vr": "SQ", "Value": []})["Value"] += _sequence([uid], reason)
    return body


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [mammogram(tmp_path, name, number=n) for n, name in enumerate(("a", "b", "c"), start=1)]


def _uid(path: Path) -> str:
    return str(load(path).SOPInstanceUID)


def _send(files: list[Path], origin: FakeStow, options: str = "") -> list[tuple[bool, bool, str]]:
    outcomes = store_files(files, Destination.parse(origin.destination + options), NODE_AE)
    return [(o.ok, o.permanent, o.detail) for o in outcomes]


def test_one_request_carries_every_due_result_of_a_destination(
    sessions: sessionmaker[Session], config: NodeConfig, three: list[Path]
) -> None:
    with fake_stow(lambda uids: (200, stow_body(uids))) as origin:
        ids = [add_output(sessions, config, f, origin.destination, now=utcnow()) for f in three]
        assert deliver_due(config, sessions) == 3
    [(headers, uids)] = origin.requests
    assert sorted(uids) == sorted(_uid(f) for f in three)
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert "Authorization" not in headers and "Transfer-Encoding" not in headers
    assert {transmission(sessions, i).state for i in ids} == {"sent"}


def test_the_size_cap_splits_requests(three: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stow, "MAX_REQUEST_BYTES", three[0].stat().st_size + 1)
    with fake_stow(lambda uids: (200, None)) as origin:
        assert [ok for ok, _, _ in _send(three, origin)] == [True, True, True]
    assert [len(uids) for _, uids in origin.requests] == [1, 1, 1]


def test_partial_success_and_failure_reasons(three: list[Path]) -> None:
    """202: the listed failures fail by their reason (A7xx is retried, Cxxx is not); an instance
    neither stored nor failed in the body is not confirmed and is retried."""
    a, b, c = (_uid(f) for f in three)
    failed = {b: DimseStatus.OUT_OF_RESOURCES, c: DimseStatus.CANNOT_UNDERSTAND}
    with fake_stow(lambda uids: (202, stow_body([a], failed))) as origin:
        (ok_a, _, _), (ok_b, perm_b, why_b), (ok_c, perm_c, why_c) = _send(three, origin)
    assert ok_a and not ok_b and not perm_b and "OUT_OF_RESOURCES" in why_b
    assert not ok_c and perm_c and "CANNOT_UNDERSTAND" in why_c and "HTTP 202" in why_c
    with fake_stow(lambda uids: (202, stow_body([a]))) as origin:
        results = _send(three, origin)
    assert results[0][0] and results[1][:2] == (False, False) and "does not confirm" in results[1][2]


def test_conflict_fails_the_named_instance_and_retries_the_others(three: list[Path]) -> None:
    a, _, _ = (_uid(f) for f in three)
    with fake_stow(lambda uids: (409, stow_body([], {a: 0xA900}))) as origin:
        results = _send(three, origin)
    assert results[0][:2] == (False, True)  # data set does not match SOP class: permanent
    assert [r[:2] for r in results[1:]] == [(False, False), (False, False)]
    assert len(origin.requests) == 1


@pytest.mark.parametrize("status", [400, 409, 413, 415])
def test_a_refused_request_is_resent_one_by_one_so_only_the_culprit_fails(
    three: list[Path], status: int
) -> None:
    culprit = _uid(three[1])
    with fake_stow(lambda uids: (status, None) if culprit in uids else (200, None)) as origin:
        results = _send(three, origin)
    assert [r[:2] for r in results] == [(True, False), (False, True), (True, False)]
    assert f"HTTP {status}" in results[1][2]
    assert [len(uids) for _, uids in origin.requests] == [3, 1, 1, 1]


@pytest.mark.parametrize("status", [401, 403, 404, 405, 429, 500, 503])
def test_faults_of_the_destination_are_retried(three: list[Path], status: int) -> None:
    with fake_stow(lambda uids: (status, None)) as origin:
        results = _send(three, origin)
    assert all(not ok and not permanent and f"HTTP {status}" in why for ok, permanent, why in results)
    assert len(origin.requests) == 1  # no resend in the pass, and the client's own retries are off


def test_a_redirected_post_or_a_foreign_body_confirms_nothing(three: list[Path]) -> None:
    with fake_stow(lambda uids: (301, None)) as origin:
        [(ok, permanent, why)] = _send(three[:1], origin)
    assert (ok, permanent) == (False, False) and "redirected (HTTP 301)" in why
    with fake_stow(lambda uids: (LOGIN_PAGE, None)) as origin:
        [(ok, permanent, why)] = _send(three[:1], origin)
    assert (ok, permanent) == (False, False) and "a text/html body, not a STOW-RS response" in why


def test_bearer_token_from_the_environment_never_logged(
    three: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(SECRET_ENV, TOKEN)
    with fake_stow(lambda uids: (401, None) if len(origin.requests) == 1 else (200, None)) as origin:
        refused = _send(three[:1], origin, f";auth=bearer;auth_env={SECRET_ENV}")
        accepted = _send(three[:1], origin, f";auth=bearer;auth_env={SECRET_ENV}")
    assert [h.get("Authorization") for h, _ in origin.requests] == [f"Bearer {TOKEN}"] * 2
    assert refused[0][:2] == (False, False) and accepted[0][0]
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(refused)


def test_a_hanging_or_absent_destination_is_transient(three: list[Path]) -> None:
    with fake_stow(lambda uids: (200, None), delay=3.0) as origin:
        [(ok, permanent, why)] = _send(three[:1], origin, ";timeout_seconds=0.5")
    assert (ok, permanent) == (False, False) and "timed out after 0.5 s" in why
    closed = Destination.parse(f"stow:http://{LOOPBACK}:{free_port()}/dicom-web")
    [outcome] = store_files(three[:1], closed, NODE_AE)
    assert not outcome.ok and not outcome.permanent and "[Errno 111] Connection refused" in outcome.detail


def test_unreadable_files_fail_alone(three: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    with fake_stow(lambda uids: (200, None)) as origin:
        results = _send([three[0], junk, tmp_path / "missing.dcm"], origin)
    assert results[0][0] and [r[:2] for r in results[1:]] == [(False, True), (False, True)]
    assert [uids for _, uids in origin.requests] == [[_uid(three[0])]]
