"""What the database and the node know, read at scrape time: queue depth per state, the oldest
waiting work, the model served, and whether the database answers at all.

Computed on each scrape rather than counted, because the database is the truth the node shares
between its roles and processes: a worker on another machine moves a job, and every node's
``/metrics`` shows it. The queries are a ``GROUP BY state`` per table (each ``state`` column is
indexed) and two ``MIN(created_at)`` over the waiting rows. A database error does not break
``/metrics``: ``mammonode_database_up`` goes to 0, the queue figures are left out (absent, not
zero: no false "queue empty"), the event counters are served as usual, and the error is logged
once per outage, without its text (which may name the server).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import Any, NamedTuple

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job, Study, Transmission, as_utc, utcnow
from node.db.states import TRANSMISSION_DUE, JobState, StudyState, TransmissionState
from node.observability.metrics import PREFIX
from node.queue.worker import Worker

log = logging.getLogger(__name__)


class ModelInfo(NamedTuple):
    """The model a worker serves, as the ``mammonode_model_info`` labels show it."""

    name: str
    version: str
    weights_sha256: str
    backend: str


ModelSource = Callable[[], ModelInfo | None]
"""The model loaded now (None: none loaded yet)."""


def worker_model(worker: Worker) -> ModelSource:
    """The model ``worker`` serves at each call (a promotion reloads it between rounds)."""

    def current() -> ModelInfo | None:
        pipeline = worker.pipeline
        if pipeline is None:
            return None
        m = pipeline.manifest
        return ModelInfo(m.name, m.version, m.weights_sha256, pipeline.backend.name)

    return current


class QueueFigures(NamedTuple):
    """One scrape's reading of the database."""

    jobs: dict[str, int]
    studies: dict[str, int]
    transmissions: dict[str, int]
    oldest_pending_job_seconds: float
    oldest_unsent_transmission_seconds: float


def count_by_state(session: Session, column: Any, states: Iterable[StrEnum]) -> dict[str, int]:
    """Rows per state of one table's ``state`` column; every state present (0 when none)."""
    counts = {str(s): 0 for s in states}
    for state, n in session.execute(select(column, func.count()).group_by(column)):
        counts[str(state)] = int(n)
    return counts


def pending_jobs(session: Session) -> int:
    """Jobs waiting to be scored (pending, due now or after a backoff): the node's backlog."""
    stmt = select(func.count()).select_from(Job).where(Job.state == JobState.PENDING)
    return int(session.scalar(stmt) or 0)


def _age_seconds(oldest: dt.datetime | None, now: dt.datetime) -> float:
    return 0.0 if oldest is None else max((now - as_utc(oldest)).total_seconds(), 0.0)


def read_queue(sessions: sessionmaker[Session], now: dt.datetime | None = None) -> QueueFigures:
    """Queue depth per state and the age of the oldest waiting job and transmission."""
    now = now or utcnow()
    with sessions() as session:
        oldest_job = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.PENDING))
        oldest_send = session.scalar(
            select(func.min(Transmission.created_at)).where(Transmission.state.in_(TRANSMISSION_DUE))
        )
        return QueueFigures(
            jobs=count_by_state(session, Job.state, JobState),
            studies=count_by_state(session, Study.state, StudyState),
            transmissions=count_by_state(session, Transmission.state, TransmissionState),
            oldest_pending_job_seconds=_age_seconds(oldest_job, now),
            oldest_unsent_transmission_seconds=_age_seconds(oldest_send, now),
        )


def _by_state(name: str, documentation: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state, n in counts.items():
        family.add_metric([state], n)
    return family


class NodeCollector(Collector):
    """The per-node figures of one node's endpoint: its database's queue and its model."""

    def __init__(self, sessions: sessionmaker[Session], model: ModelSource | None = None) -> None:
        self.sessions = sessions
        self.model = model
        self._lock = threading.Lock()
        self._database_down = False

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe: the names are fixed and reading them at registration is a query."""
        return []

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        yield GaugeMetricFamily(
            f"{PREFIX}_database_up",
            "1 when the node's database answered this scrape's queries, else 0.",
            value=0 if figures is None else 1,
        )
        if figures is not None:
            yield from self._queue_metrics(figures)
        info = self.model() if self.model is not None else None
        if info is not None:
            family = GaugeMetricFamily(
                f"{PREFIX}_model_info",
                "The model this node scores with (always 1; the labels say which).",
                labels=list(ModelInfo._fields),
            )
            family.add_metric(list(info), 1)
            yield family

    @staticmethod
    def _queue_metrics(figures: QueueFigures) -> Iterator[Metric]:
        yield _by_state(f"{PREFIX}_jobs", "Scoring jobs in the database, by state.", figures.jobs)
        yield _by_state(f"{PREFIX}_studies", "Studies in the database, by state.", figures.studies)
        yield _by_state(
            f"{PREFIX}_outbox_transmissions",
            "Outbox transmissions (one result to one destination) in the database, by state.",
            figures.transmissions,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_job_age_seconds",
            "Age of the oldest job waiting to be scored (0 when none waits).",
            value=figures.oldest_pending_job_seconds,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_unsent_transmission_age_seconds",
            "Age of the oldest transmission not yet sent (pending or failed; 0 when none).",
            value=figures.oldest_unsent_transmission_seconds,
        )

    def _read(self) -> QueueFigures | None:
        """The figures, or None when the database fails (logged when an outage starts and ends)."""
        try:
            figures = read_queue(self.sessions)
        except Exception as exc:  # noqa: BLE001 - /metrics must keep serving; database_up says it
            with self._lock:
                first, self._database_down = not self._database_down, True
            if first:
                log.warning("metrics: the database does not answer (%s)", type(exc).__name__)
            return None
        with self._lock:
            recovered, self._database_down = self._database_down, False
        if recovered:
            log.info("metrics: the database answers again")
        return figures
