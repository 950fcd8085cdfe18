"""Liveness and readiness of a node: what ``/healthz`` and ``/readyz`` answer.

Liveness (``/healthz``) says the process and its loops run: a failing liveness asks for a restart.
Readiness (``/readyz``) says the node can do its job now: the database answers, the spool takes a
file, the model is loaded (for roles that score) and the backlog of pending jobs is within
``ready_max_backlog`` (for roles that receive studies: a receiver that is not ready should get
no new studies; a worker with a long queue is exactly where it should be). Each check is named
with its state (``ok``, ``failing`` or ``not needed`` for the role) and a short detail that holds
no patient data and no exception text (a database error's text may name the server and user).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from node.config import NodeConfig, Role
from node.observability.collector import ModelSource, pending_jobs

READY_PROBE_PREFIX = ".readyz-"
READY_PROBE_SUFFIX = ".tmp"
"""The spool probe's file is named like an interrupted write, so a start clears a leftover one."""
SCORING_ROLES = (Role.ALL, Role.WORKER)
RECEIVING_ROLES = (Role.ALL, Role.RECEIVER)
SPOOL_ROLES = (Role.ALL, Role.RECEIVER, Role.WORKER)
"""The roles that write the spool (receiving) or read it (scoring)."""

DATABASE_DOWN = "the database does not answer"

Liveness = Callable[[], Mapping[str, bool]]
"""The node's loops by name, and whether each is alive."""


class CheckState(StrEnum):
    OK = "ok"
    FAILING = "failing"
    NOT_NEEDED = "not needed"
    """The check does not apply to this process's role."""


@dataclass(frozen=True)
class Check:
    name: str
    state: CheckState
    detail: str = ""


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.state != CheckState.FAILING for c in self.checks)

    def as_json(self) -> str:
        """``{"ready": bool, "checks": {name: {"state": ..., "detail": ...}}}``."""
        checks = {c.name: {"state": str(c.state), "detail": c.detail} for c in self.checks}
        return json.dumps({"ready": self.ready, "checks": checks}, sort_keys=True)


@dataclass(frozen=True)
class Probes:
    """What the readiness checks look at, for one node."""

    sessions: sessionmaker[Session]
    spool_dir: Path | None
    """None: this role does not use the spool."""
    model: ModelSource | None
    """None: this role does not score."""
    max_backlog: int | None
    """None: the backlog does not make this role unready."""

    @classmethod
    def for_role(
        cls, config: NodeConfig, sessions: sessionmaker[Session], model: ModelSource | None
    ) -> Probes:
        role = Role(config.role)
        return cls(
            sessions,
            config.spool_dir if role in SPOOL_ROLES else None,
            model if role in SCORING_ROLES else None,
            config.ready_max_backlog if role in RECEIVING_ROLES else None,
        )


def check_database(sessions: sessionmaker[Session]) -> Check:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to answer is "not ready", named by type
        return Check("database", CheckState.FAILING, f"does not answer ({type(exc).__name__})")
    return Check("database", CheckState.OK)


def check_spool(folder: Path | None) -> Check:
    """A file can be created in the spool and removed again."""
    if folder is None:
        return Check("spool", CheckState.NOT_NEEDED)
    try:
        fd, name = tempfile.mkstemp(prefix=READY_PROBE_PREFIX, suffix=READY_PROBE_SUFFIX, dir=folder)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            Path(name).unlink()
    except OSError as exc:
        return Check("spool", CheckState.FAILING, f"not writable ({exc.strerror or type(exc).__name__})")
    return Check("spool", CheckState.OK)


def check_model(model: ModelSource | None) -> Check:
    if model is None:
        return Check("model", CheckState.NOT_NEEDED)
    info = model()
    if info is None:
        return Check("model", CheckState.FAILING, "no model loaded")
    return Check("model", CheckState.OK, f"{info.name} {info.version} ({info.backend})")


def check_backlog(sessions: sessionmaker[Session], limit: int | None) -> Check:
    """Pending jobs within ``limit``."""
    if limit is None:
        return Check("backlog", CheckState.NOT_NEEDED)
    try:
        with sessions() as session:
            pending = pending_jobs(session)
    except Exception as exc:  # noqa: BLE001 - reported as a failing check
        return Check("backlog", CheckState.FAILING, f"unknown: {DATABASE_DOWN} ({type(exc).__name__})")
    state = CheckState.OK if pending <= limit else CheckState.FAILING
    return Check("backlog", state, f"{pending} pending job(s), at most {limit}")


def readiness(probes: Probes) -> Readiness:
    database = check_database(probes.sessions)
    backlog = (
        check_backlog(probes.sessions, probes.max_backlog)
        if database.state == CheckState.OK or probes.max_backlog is None
        else Check("backlog", CheckState.FAILING, f"unknown: {DATABASE_DOWN}")
    )
    return Readiness((database, check_spool(probes.spool_dir), check_model(probes.model), backlog))


def liveness_problems(alive: Liveness) -> list[str]:
    """The names of the loops that are not alive (empty: live)."""
    return sorted(name for name, ok in alive().items() if not ok)
