"""How a failed scoring job is retried: by the kind of fault, not by how often it was claimed.

Three kinds (design invariant 9, failures have the size of their cause):

- a worker that dies while holding a job (kill -9, power cut, OOM) charges the job nothing: its
  claim is put back on the next start, or by the same worker at its next round;
- a transient fault -- the disk is full, the database went away -- is no fault of the job: it
  goes back to the queue after a backoff of :func:`transient_delay` seconds, as often as needed,
  so that once the disk has space again every acknowledged study is scored and delivered with no
  operator command;
- an exception the job raised itself (a bug, an unusable study) is charged as an attempt and
  retried after :func:`failure_delay`; after :data:`MAX_ATTEMPTS` the job fails for good and
  ``mammonode queue retry job:N`` is the way back. One bad image never gets here: it fails alone.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from node.dicom.spool import SpoolFullError

MAX_ATTEMPTS = 3
"""Failures a job may raise before it is failed for good."""
TRANSIENT_BASE_SECONDS = 2.0
TRANSIENT_MAX_SECONDS = 30.0
"""A job held back by a full disk or a database outage looks again at least this often."""
FAILURE_BASE_SECONDS = 30.0
FAILURE_MAX_SECONDS = 600.0

_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """A fault of the machine, not of the job: no space, no database, too many open files."""
    for item in _chain(exc):
        if isinstance(item, SpoolFullError):
            return True
        if isinstance(item, OSError) and item.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(item, (OperationalError, InterfaceError, DisconnectionError)):
            return True
        if isinstance(item, DBAPIError) and item.connection_invalidated:
            return True
    return False


def transient_delay(retries: int) -> float:
    """Seconds before a job deferred ``retries`` times already is tried again."""
    return min(TRANSIENT_BASE_SECONDS * 2 ** min(retries, 16), TRANSIENT_MAX_SECONDS)


def failure_delay(attempts: int) -> float:
    """Seconds before a job that failed ``attempts`` times (>= 1) is tried again."""
    return min(FAILURE_BASE_SECONDS * 2 ** max(attempts - 1, 0), FAILURE_MAX_SECONDS)
