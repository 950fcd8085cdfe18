"""`mammonode serve`: the node's roles -- receiver (SCP and assembly), worker, sender -- in one
process (``role = all``) or one role per process (scale-out on PostgreSQL: one receiver, any
number of workers on one or several machines sharing the spool, one sender).

Everything durable lives in the database and in files (spool, outbox), never only in memory, so
the node can be killed at any moment (``kill -9`` included) and resumes on restart: jobs a dead
worker had claimed are requeued, pending jobs are scored, pending transmissions are sent, and the
deterministic result UIDs plus unique constraints make sure exactly one set of results exists.

The activities: the pynetdicom server (its own threads; the C-STORE handler only spools and
records) and a loop that promotes ready studies to jobs (receiver); a loop that claims jobs and
scores them, and a heartbeat that renews the leases of the jobs being scored (worker); a loop that
delivers due transmissions (sender). The loops poll every ``config.poll_seconds``; a loop that
found work goes round again at once. An error in one round is logged and the loop carries on
(invariant 2).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from inference import describe, limit_heap_growth, quiet_value_checks, scrub_library_logs, where
from node import audit
from node.admin.registry import PipelineFactory
from node.config import NodeConfig, Role
from node.db.session import make_engine, session_factory
from node.observability.server import Endpoint, start_endpoint
from node.private_files import private_dir
from node.queue.assembly import promote_ready
from node.queue.claims import requeue_stale_claims
from node.queue.worker import Worker

log = logging.getLogger(__name__)

ACTOR = "node"
ERROR_LOG_INTERVAL_SECONDS = 60.0
"""A round failing the same way again is logged at most this often."""
STOP_TIMEOUT_SECONDS = 60.0
"""How long :meth:`Node.stop` waits for a scoring round in progress before giving up on it (its
job stays claimed and is requeued on the next start)."""


RECEIVES = (Role.ALL, Role.RECEIVER)
SCORES = (Role.ALL, Role.WORKER)
SENDS = (Role.ALL, Role.SENDER)


def database_kind(url: str) -> str:
    """``sqlite`` or ``postgresql`` (the dialect, never the URL: it may hold a password)."""
    return url.split(":", 1)[0].split("+", 1)[0] or "unknown"


class Node:
    """One MammoNode service: ``start()``, then ``stop()``; or ``serve_forever()`` until a signal."""

    def __init__(self, config: NodeConfig, *, pipeline_factory: PipelineFactory | None = None) -> None:
        self.config = config
        self._pipeline_factory = pipeline_factory
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._started = False
        self.worker: Worker | None = None
        self._endpoint: Endpoint | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            raise RuntimeError("the node is not started")
        return self._sessions

    @property
    def running(self) -> bool:
        return self._started

    @property
    def role(self) -> Role:
        return Role(self.config.role)

    def start(self) -> None:
        """Prepare the data folder and database, load the model, then start receiving and working.

        The model is loaded before the SCP opens its port, so a node that cannot score (model
        missing, backend unavailable) fails at start instead of accepting studies it cannot handle.
        A worker-only process loads the model too; a receiver or sender alone does not need one.
        """
        from node.db.migrate import ensure_schema
        from node.dicom.scp import start_scp
        from node.dicom.tls import check_tls

        config = self.config
        check_tls(config)  # a bad certificate, key or CA file stops the start, not a send hours later
        limit_heap_growth()  # decoded mammograms pass through: keep them out of a heap that never shrinks
        quiet_value_checks()  # pydicom would log invalid values it reads, quoting them
        scrub_library_logs()
        # pynetdicom narrates every association at INFO and dumps datasets (names, IDs) at DEBUG:
        # application logs carry no PHI, so its messages start at WARNING here.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        for folder in (config.data_dir, config.spool_dir, config.outbox_dir):
            private_dir(folder)  # patient data: owner-only whatever the umask
        url = config.resolved_database_url
        ensure_schema(url, create_sqlite=True)
        self._engine = make_engine(url)
        self._sessions = session_factory(self._engine)
        requeued = 0
        pipeline = None
        try:
            if self.role in SCORES:
                requeued = requeue_stale_claims(self._sessions)
                if requeued:
                    log.info("requeued %d job(s) whose worker is gone", requeued)
                self.worker = Worker(config, self._sessions, self._pipeline_factory)
                pipeline = self.worker.load()
            self._stop.clear()
            if self.role in RECEIVES:
                self._server = start_scp(config, self._sessions)
        except BaseException:
            self._engine.dispose()
            self._engine = self._sessions = None
            raise
        self._started = True
        self._threads = self._role_threads()
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        self._record_start(url, pipeline, requeued)
        self._start_endpoint()

    def _role_threads(self) -> list[threading.Thread]:
        """The loops of this process's role (the SCP runs its own threads)."""
        loops: list[tuple[str, Callable[[], None]]] = []
        if self.role == Role.RECEIVER:
            loops.append(("assembly", lambda: self._loop("assembly", self._assembly_round)))
        if self.role in SCORES:
            loops.append(("scoring", lambda: self._loop("scoring", self._score_round)))
            loops.append(("heartbeat", self._heartbeat_loop))
        if self.role in SENDS:
            loops.append(("sending", lambda: self._loop("sending", self._send_round)))
        return [threading.Thread(target=target, name=f"mammonode-{name}") for name, target in loops]

    def _record_start(self, url: str, pipeline: Any, requeued: int) -> None:
        config = self.config
        m = pipeline.manifest if pipeline is not None else None
        with self.sessions() as session:
            audit.record(
                session,
                audit.NODE_STARTED,
                ACTOR,
                details={
                    "ae_title": config.ae_title,
                    "role": str(self.role),
                    "port": config.port if self.role in RECEIVES else None,
                    "database": database_kind(url),
                    "worker": self.worker.name if self.worker is not None else None,
                    "backend": pipeline.backend.name if pipeline is not None else None,
                    "model_name": m.name if m is not None else None,
                    "model_version": m.version if m is not None else None,
                    "weights_sha256": m.weights_sha256 if m is not None else None,
                    "destinations": [str(d) for d in config.destinations] if self.role in SENDS else [],
                    "requeued_jobs": requeued,
                },
            )
            session.commit()
        where = f"listening on {config.bind_address}:{config.port}" if self.role in RECEIVES else "started"
        model = f", model {m.name} {m.version}" if m is not None else ""
        log.info(
            "node %s (%s) %s (%s database%s)", config.ae_title, self.role, where, database_kind(url), model
        )

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop receiving, let the loops finish their round, record the stop, close the database."""
        if not self._started:
            return
        from node.dicom.scp import stop_scp

        if self._server is not None:
            stop_scp(self._server)  # also lets association handlers finish before the engine goes
            self._server = None
        self._stop_endpoint()
        self._started = False
        self._stop.set()
        if self.worker is not None:
            self.worker.close()  # no more claims; the jobs claimed ahead of a round are given back
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s did not finish within %.0f s; leaving it", thread.name, timeout)
        self._threads = []
        if self._sessions is not None:
            with self._sessions() as session:
                details = {"ae_title": self.config.ae_title, "role": str(self.role)}
                audit.record(session, audit.NODE_STOPPED, ACTOR, details=details)
                session.commit()
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._sessions = None
        log.info("node %s stopped", self.config.ae_title)

    # -- metrics and health endpoint (node.observability; none while metrics_port = 0) ----------

    @property
    def metrics_url(self) -> str | None:
        """Base URL of ``/metrics``, ``/healthz`` and ``/readyz`` (None: no endpoint)."""
        return self._endpoint.url if self._endpoint is not None else None

    def _start_endpoint(self) -> None:
        try:
            self._endpoint = start_endpoint(
                self.config, self.sessions, worker=self.worker, alive=self._loops_alive
            )
        except OSError:  # the port is taken: a node asked for an endpoint does not run without it
            self.stop()
            raise

    def _stop_endpoint(self) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None

    def _loops_alive(self) -> dict[str, bool]:
        """``/healthz``: each of this role's loops, alive or not."""
        return {thread.name.removeprefix("mammonode-"): thread.is_alive() for thread in self._threads}

    def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then stop gracefully (must run in the main thread)."""
        stop = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---------------------------------------------------------------------------------------
    # Background loops
    # ---------------------------------------------------------------------------------------

    def _assembly_round(self) -> int:
        """Queue the studies that became ready (a receiver-only process)."""
        return len(promote_ready(self.config, self.sessions))

    def _score_round(self) -> int:
        """Score one batch of jobs; a whole node first queues the studies that became ready."""
        if self.role in RECEIVES:
            promote_ready(self.config, self.sessions)
        return self.worker.run_once() if self.worker is not None else 0

    def _heartbeat_loop(self) -> None:
        """Renew the leases of the jobs being scored every third of ``lease_seconds``, from a
        thread of its own: a scoring round may spend minutes in one batch. A failed renewal is
        logged and tried again; if it keeps failing, the lease lapses and another worker takes
        the job over (this worker's results are then not committed)."""
        interval = self.config.lease_seconds / 3
        while not self._stop.wait(interval):
            if self.worker is None:
                continue
            try:
                self.worker.heartbeat()
            except Exception as exc:  # noqa: BLE001 - logged; the lease may lapse, nothing is lost
                log.warning("could not renew the leases of worker %s: %s", self.worker.name, describe(exc))

    def _send_round(self) -> int:
        from node.dicom.sender import deliver_due

        return deliver_due(self.config, self.sessions)

    def _loop(self, what: str, round_: Callable[[], int]) -> None:
        """Run ``round_`` until stopped. A failure that repeats (a model that cannot load, a
        database that is down) is logged in full once, then once a minute with a count, so a
        persistent fault does not flood the log at the polling rate."""
        last_error, last_logged, repeats = "", 0.0, 0
        while not self._stop.is_set():
            try:
                busy = round_() > 0
                last_error, repeats = "", 0
            except Exception as exc:  # noqa: BLE001 - logged; the loop must keep serving
                busy = False
                text = describe(exc)  # exception texts may quote DICOM values (invariant 10)
                now = time.monotonic()
                if text != last_error:
                    log.error(
                        "%s round failed; retrying every %.1f s: %s", what, self.config.poll_seconds, text
                    )
                    log.debug("%s round failed at %s", what, where(exc))
                    last_error, last_logged, repeats = text, now, 0
                else:
                    repeats += 1
                    if now - last_logged >= ERROR_LOG_INTERVAL_SECONDS:
                        log.error("%s round still failing (%d more times): %s", what, repeats, text)
                        last_logged, repeats = now, 0
            if not busy:
                self._stop.wait(self.config.poll_seconds)
