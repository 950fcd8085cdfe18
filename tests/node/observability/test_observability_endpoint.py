"""The node's ``/metrics``, ``/healthz`` and ``/readyz`` (node.observability), on SQLite and PostgreSQL.

The collector and the readiness checks read a real database filled the way the node fills it;
every readiness check is made to fail for real (a database that does not answer, a spool that
cannot take a file, a backlog over the limit, no model), and the endpoint is asked over HTTP.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import LOOPBACK, free_port
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node.config import NodeConfig, Role
from node.db.models import Job, OutputObject, Study, Transmission, utcnow
from node.db.session import make_engine, session_factory
from node.observability.collector import ModelInfo, ModelSource, NodeCollector
from node.observability.health import CheckState, Probes, readiness
from node.observability.server import Endpoint
from node.service import Node

PATIENT = "OBS-PATIENT-0001"
MODEL = ModelInfo("mammonode-test", "0.0.1", "ab" * 32, "onnxruntime")
PENDING_AGE = dt.timedelta(minutes=10)
UNSENT_AGE = dt.timedelta(hours=2)


def loaded() -> ModelInfo | None:
    return MODEL


def not_loaded() -> ModelInfo | None:
    return None


def _study(session: Session, name: str, state: str) -> Study:
    study = Study(study_uid=derive_uid("tests", "observability", name), patient_id=PATIENT, state=state)
    session.add(study)
    session.flush()
    return study


def fill(sessions: sessionmaker[Session], *, pending: int) -> None:
    """``pending`` queued studies with a pending job each (the oldest ``PENDING_AGE`` old), and one
    scored study whose two results are sent and failing (created ``UNSENT_AGE`` ago)."""
    now = utcnow()
    with sessions() as session:
        for i in range(pending):
            study = _study(session, f"queued-{i}", "queued")
            age = PENDING_AGE - dt.timedelta(minutes=i)
            session.add(
                Job(study_id=study.id, version=1, lateralities="LR", state="pending", created_at=now - age)
            )
        scored = _study(session, "scored", "scored")
        job = Job(study_id=scored.id, version=1, lateralities="LR", state="done")
        session.add(job)
        session.flush()
        for i, state in enumerate(("sent", "failed")):
            output = OutputObject(
                job_id=job.id,
                kind="SC",
                sop_instance_uid=derive_uid("tests", "observability", "output", str(i)),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                outbox_path=f"out-{i}.dcm",
            )
            session.add(output)
            session.flush()
            session.add(
                Transmission(
                    output_id=output.id,
                    destination="PACS@127.0.0.1:104",
                    state=state,
                    created_at=now - UNSENT_AGE,
                )
            )
        session.commit()


def collect(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


@pytest.fixture
def down_sessions(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a database that does not answer: the same kind as ``db_url``, a missing SQLite
    folder or a PostgreSQL port where nothing listens."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        url = url.set(database=str(tmp_path / "gone" / "node.sqlite"))
    else:
        url = url.set(host=LOOPBACK, port=free_port())
    engine = make_engine(url.render_as_string(hide_password=False))
    yield session_factory(engine)
    engine.dispose()


def test_the_collector_reads_queue_depth_per_state_and_the_oldest_waiting_work(
    sessions: sessionmaker[Session],
) -> None:
    fill(sessions, pending=3)
    registry = collect(NodeCollector(sessions, loaded))
    value = registry.get_sample_value
    assert value("mammonode_database_up") == 1
    jobs = {
        s: value("mammonode_jobs", {"state": s}) for s in ("pending", "claimed", "done", "failed", "dropped")
    }
    assert jobs == {"pending": 3, "claimed": 0, "done": 1, "failed": 0, "dropped": 0}
    assert value("mammonode_studies", {"state": "queued"}) == 3
    assert value("mammonode_studies", {"state": "scored"}) == 1
    assert value("mammonode_studies", {"state": "receiving"}) == 0
    outbox = {
        s: value("mammonode_outbox_transmissions", {"state": s})
        for s in ("pending", "sent", "failed", "dead")
    }
    assert outbox == {"pending": 0, "sent": 1, "failed": 1, "dead": 0}
    pending_age = value("mammonode_oldest_pending_job_age_seconds") or 0
    assert PENDING_AGE.total_seconds() <= pending_age < PENDING_AGE.total_seconds() + 60
    unsent_age = value("mammonode_oldest_unsent_transmission_age_seconds") or 0
    assert UNSENT_AGE.total_seconds() <= unsent_age < UNSENT_AGE.total_seconds() + 60
    assert value("mammonode_model_info", MODEL._asdict()) == 1


def test_an_empty_queue_reads_zero_and_no_model_means_no_model_info(sessions: sessionmaker[Session]) -> None:
    registry = collect(NodeCollector(sessions, not_loaded))
    assert registry.get_sample_value("mammonode_jobs", {"state": "pending"}) == 0
    assert registry.get_sample_value("mammonode_oldest_pending_job_age_seconds") == 0
    names = {m.name for m in registry.collect()}
    assert "mammonode_model_info" not in names and "mammonode_jobs" in names


def test_a_database_that_does_not_answer_is_a_gauge_not_a_broken_scrape(
    down_sessions: sessionmaker[Session],
) -> None:
    registry = collect(NodeCollector(down_sessions, loaded))
    assert registry.get_sample_value("mammonode_database_up") == 0
    names = {m.name for m in registry.collect()}
    assert names == {"mammonode_database_up", "mammonode_model_info"}  # no made-up queue figures


def _probes(
    sessions: sessionmaker[Session], spool: Path, model: ModelSource | None = loaded, limit: int | None = 2
) -> Probes:
    spool.mkdir(parents=True, exist_ok=True)
    return Probes(sessions, spool, model, limit)


def states(probes: Probes) -> dict[str, CheckState]:
    return {check.name: check.state for check in readiness(probes).checks}


def test_ready_when_every_check_passes_and_the_probe_leaves_nothing_behind(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    fill(sessions, pending=2)  # exactly the limit
    spool = tmp_path / "spool"
    result = readiness(_probes(sessions, spool))
    assert result.ready and {c.name: c.state for c in result.checks} == dict.fromkeys(
        ("database", "spool", "model", "backlog"), CheckState.OK
    )
    assert list(spool.iterdir()) == []


def test_a_backlog_over_the_limit_is_not_ready(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    fill(sessions, pending=3)
    result = readiness(_probes(sessions, tmp_path / "spool"))
    assert not result.ready
    [backlog] = [c for c in result.checks if c.name == "backlog"]
    assert backlog.state == CheckState.FAILING and backlog.detail == "3 pending job(s), at most 2"


def test_no_model_loaded_is_not_ready(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    checks = states(_probes(sessions, tmp_path / "spool", model=not_loaded))
    assert checks["model"] == CheckState.FAILING and checks["database"] == CheckState.OK


def test_a_spool_that_takes_no_file_is_not_ready(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    probes = _probes(sessions, spool)
    spool.rmdir()
    spool.write_bytes(b"")  # a file where the folder should be: creating a file in it fails
    assert states(probes)["spool"] == CheckState.FAILING
    spool.unlink()  # gone altogether (an unmounted share)
    assert states(probes)["spool"] == CheckState.FAILING


def test_a_database_that_does_not_answer_is_not_ready(
    down_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    checks = states(_probes(down_sessions, tmp_path / "spool"))
    assert checks == {
        "database": CheckState.FAILING,
        "spool": CheckState.OK,
        "model": CheckState.OK,
        "backlog": CheckState.FAILING,
    }


@pytest.mark.parametrize(
    ("role", "not_needed"),
    [
        (Role.ALL, set()),
        (Role.RECEIVER, {"model"}),
        (Role.WORKER, {"backlog"}),
        (Role.SENDER, {"spool", "model", "backlog"}),
    ],
)
def test_each_role_is_checked_for_what_it_does(
    sessions: sessionmaker[Session], tmp_path: Path, role: Role, not_needed: set[str]
) -> None:
    """A receiver scores nothing, a worker with a long queue is where it should be, a sender
    needs no spool: those checks say "not needed" and cannot fail."""
    fill(sessions, pending=3)  # over the limit
    config = NodeConfig(data_dir=tmp_path / "data", role=role, ready_max_backlog=2)
    config.spool_dir.mkdir(parents=True)
    checks = states(Probes.for_role(config, sessions, not_loaded))
    assert {name for name, state in checks.items() if state == CheckState.NOT_NEEDED} == not_needed
    assert checks["database"] == CheckState.OK
    for name in {"model", "backlog"} - not_needed:
        assert checks[name] == CheckState.FAILING


# -- over HTTP ------------------------------------------------------------------------------------


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    """Status, content type and body of one request."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    started: list[Endpoint] = []

    def start(probes: Probes, collector: NodeCollector, alive: dict[str, bool]) -> Endpoint:
        config = NodeConfig(
            data_dir=tmp_path / "data", metrics_port=free_port(), metrics_bind_address=LOOPBACK
        )
        served = Endpoint(config, probes, collector, lambda: alive)
        served.start()
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def test_the_endpoint_serves_metrics_liveness_and_readiness(
    sessions: sessionmaker[Session], tmp_path: Path, endpoint: Callable[..., Endpoint]
) -> None:
    fill(sessions, pending=1)
    loops = {"scoring": True, "sending": True}
    served = endpoint(_probes(sessions, tmp_path / "spool"), NodeCollector(sessions, loaded), loops)
    assert served.url == f"http://{LOOPBACK}:{served.config.metrics_port}"

    status, kind, body = get(f"{served.url}/metrics")
    assert status == 200 and kind.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["mammonode_database_up"].samples[0].value == 1
    pending = [s for s in families["mammonode_jobs"].samples if s.labels == {"state": "pending"}]
    assert [s.value for s in pending] == [1]
    assert families["mammonode_transmissions"].type == "counter"  # the process's event metrics too
    assert families["mammonode_scoring_duration_seconds"].type == "histogram"
    assert "process_resident_memory_bytes" in families

    assert get(f"{served.url}/healthz")[::2] == (200, "ok\n")
    status, kind, body = get(f"{served.url}/readyz")
    assert (status, kind) == (200, "application/json")
    assert json.loads(body) == {
        "ready": True,
        "checks": {
            "database": {"state": "ok", "detail": ""},
            "spool": {"state": "ok", "detail": ""},
            "model": {"state": "ok", "detail": "mammonode-test 0.0.1 (onnxruntime)"},
            "backlog": {"state": "ok", "detail": "1 pending job(s), at most 2"},
        },
    }
    fill_more = 2
    with sessions() as session:  # the backlog grows past the limit: not ready any more
        for i in range(fill_more):
            study = _study(session, f"more-{i}", "queued")
            session.add(Job(study_id=study.id, version=1, lateralities="L", state="pending"))
        session.commit()
    status, _, body = get(f"{served.url}/readyz")
    assert status == 503 and json.loads(body)["checks"]["backlog"]["state"] == "failing"

    loops["sending"] = False  # a loop died
    assert get(f"{served.url}/healthz")[::2] == (503, "stopped: sending\n")
    assert get(f"{served.url}/nothing")[0] == 404
    assert get(f"{served.url}/readyz", method="POST")[0] == 405
    for path in ("/metrics", "/healthz", "/readyz"):
        assert PATIENT not in get(f"{served.url}{path}")[2]  # no patient data anywhere


def test_metrics_keep_serving_while_the_database_is_down(
    down_sessions: sessionmaker[Session], tmp_path: Path, endpoint: Callable[..., Endpoint]
) -> None:
    served = endpoint(_probes(down_sessions, tmp_path / "spool"), NodeCollector(down_sessions, loaded), {})
    status, _, body = get(f"{served.url}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["mammonode_database_up"].samples[0].value == 0
    assert "mammonode_jobs" not in families and "mammonode_instances_received" in families
    status, _, body = get(f"{served.url}/readyz")
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["database"]["state"] == checks["backlog"]["state"] == "failing"
    assert checks["database"]["detail"] == "does not answer (OperationalError)"


# -- wired into the node ----------------------------------------------------------------------------


def _node_config(tmp_path: Path, db_url: str, role: Role, metrics_port: int) -> NodeConfig:
    return NodeConfig(
        port=free_port(),
        bind_address=LOOPBACK,
        data_dir=tmp_path / "data",
        database_url=db_url,
        role=role,
        poll_seconds=0.2,
        metrics_port=metrics_port,
        metrics_bind_address=LOOPBACK,
    )


@pytest.mark.parametrize(
    ("role", "loops", "not_needed"),
    [
        (Role.RECEIVER, {"assembly"}, {"model"}),
        (Role.SENDER, {"sending"}, {"spool", "model", "backlog"}),
    ],
)
def test_a_node_serves_its_endpoint_from_start_to_stop(
    db_url: str, tmp_path: Path, role: Role, loops: set[str], not_needed: set[str]
) -> None:
    """Roles that need no model start in a moment: the endpoint comes up with the node, reports
    its loops and its role's checks, and goes away with it."""
    metrics_port = free_port()
    node = Node(_node_config(tmp_path, db_url, role, metrics_port))
    node.start()
    try:
        assert node.metrics_url == f"http://{LOOPBACK}:{metrics_port}"
        assert get(f"{node.metrics_url}/healthz")[::2] == (200, "ok\n")
        status, _, body = get(f"{node.metrics_url}/readyz")
        checks = json.loads(body)["checks"]
        assert status == 200
        assert {name for name, check in checks.items() if check["state"] == "not needed"} == not_needed
        assert set(node._loops_alive()) == loops
        families = {f.name for f in text_string_to_metric_families(get(f"{node.metrics_url}/metrics")[2])}
        assert {"mammonode_database_up", "mammonode_jobs"} <= families
        assert "mammonode_model_info" not in families  # this role serves no model
    finally:
        node.stop()
    assert node.metrics_url is None
    with pytest.raises(OSError):  # closed with the node
        urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/healthz", timeout=5)


def test_no_metrics_port_means_no_endpoint(db_url: str, tmp_path: Path) -> None:
    node = Node(_node_config(tmp_path, db_url, Role.SENDER, 0))
    node.start()
    try:
        assert node.metrics_url is None
    finally:
        node.stop()


def test_a_taken_metrics_port_fails_the_start_and_leaves_nothing_running(db_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        config = _node_config(tmp_path, db_url, Role.RECEIVER, taken.getsockname()[1])
        node = Node(config)
        with pytest.raises(OSError, match=f"metrics endpoint {LOOPBACK}:{config.metrics_port}"):
            node.start()
    assert not node.running and node.metrics_url is None
    with socket.socket() as dicom:  # the SCP let its port go again
        dicom.bind((LOOPBACK, config.port))
