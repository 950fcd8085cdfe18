"""The node's event metrics, counted where the events happen, and the one-line calls that count them.

The SCP, the worker and the sender call the small functions here (``record_*``, and the
:func:`counts_store_status` decorator on the C-STORE handler); nothing else about Prometheus leaks
into them. What the database already knows (queue depth per state, oldest pending age, the model
served) is not counted here but read at scrape time by :mod:`node.observability.collector`.

Registry: the metrics live in :data:`EVENTS`, a registry of this module rather than
prometheus_client's global one, so nothing else in the process (a library registering its own
metrics) ends up on the node's endpoint, and each node's endpoint composes it with its own
collector. Counters are per process, as Prometheus expects of a scrape target: when several
:class:`~node.service.Node` instances share one process (tests), they share these counters, and
tests assert deltas. The per-node figures come from each node's collector on its own database.

Labels have bounded values only. Associations are labelled by the kind of refusal, never by AE
title: a rejected association's calling AE is whatever a stranger typed (unbounded, and an
identifier better read from the audit log, which has it with host and time), and per-AE traffic
of the allowed modalities is in the ``associations`` table. Statuses are the node's own named
DIMSE statuses; destinations are labelled by kind (``dicom`` or ``stow``), not address.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import IntEnum
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import disable_created_metrics

from node.config import STOW_PREFIX
from node.db.states import TransmissionState

# The ``*_created`` series (one per counter and label set, the time it was first used) double the
# exposition for no use on a dashboard; Prometheus handles counter resets without them.
disable_created_metrics()

PREFIX = "mammonode"
EVENTS = CollectorRegistry(auto_describe=True)
"""The registry of the event metrics below (the node's endpoint serves it with its collector)."""

SCORING_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""From a tiny study on a GPU (0.1 s) to a large one on a loaded CPU (10 min)."""
TRANSMISSION_OUTCOMES = (TransmissionState.SENT, TransmissionState.FAILED, TransmissionState.DEAD)
DESTINATION_KINDS = ("dicom", "stow")
ACCEPTED, REJECTED = "accepted", "rejected"
NO_REASON = "none"

ASSOCIATIONS = Counter(
    f"{PREFIX}_associations",
    "Association requests to the SCP, by result and (rejected) the kind of refusal.",
    ["result", "reason"],
    registry=EVENTS,
)
INSTANCES_RECEIVED = Counter(
    f"{PREFIX}_instances_received",
    "C-STORE requests answered Success (stored; or accepted and not stored, for another SOP "
    "class when unknown_sop_classes = ignore).",
    registry=EVENTS,
)
INSTANCES_REFUSED = Counter(
    f"{PREFIX}_instances_refused",
    "C-STORE requests answered with a failure status, by the node's status name and code.",
    ["status", "code"],
    registry=EVENTS,
)
SCORING_SECONDS = Histogram(
    f"{PREFIX}_scoring_duration_seconds",
    "Seconds from claiming a scoring job to committing its results (decode, inference, CAM "
    "captures, reports), per job scored.",
    buckets=SCORING_BUCKETS_SECONDS,
    registry=EVENTS,
)
IMAGES_SCORED = Counter(
    f"{PREFIX}_images_scored",
    "Images scored (rate() of it is the node's images per second).",
    registry=EVENTS,
)
ROUND_IMAGES_PER_SECOND = Gauge(
    f"{PREFIX}_scoring_images_per_second",
    "Images per second of wall time in the last scoring round (one batch: claim, decode, "
    "inference, outputs, commit).",
    registry=EVENTS,
)
TRANSMISSIONS = Counter(
    f"{PREFIX}_transmissions",
    "Outbox sends by outcome (sent; failed, will retry; dead, given up) and destination kind.",
    ["outcome", "destination_kind"],
    registry=EVENTS,
)

for _outcome in TRANSMISSION_OUTCOMES:  # present from the start, so increase() sees the first one
    for _kind in DESTINATION_KINDS:
        TRANSMISSIONS.labels(str(_outcome), _kind)
ASSOCIATIONS.labels(ACCEPTED, NO_REASON)

_REASON_KINDS = (
    ("check failed", "check_failed"),
    ("tls handshake failed", "tls_handshake_failed"),
    ("from this host", "host_not_allowed"),
    ("needs a verified client certificate", "certificate_required"),
    ("certificate", "certificate_not_allowed"),
    ("allow-list", "calling_ae_not_allowed"),
    ("dicom layer", "refused_by_dicom_layer"),
)
"""Phrases of the SCP's refusal reasons (``node.dicom.scp``, ``node.dicom.allowlist``,
``node.dicom.tls``), first match wins, and their label."""


def reason_kind(reason: str | None) -> str:
    """A bounded label for an association's refusal reason (free text in the audit log)."""
    if reason is None:
        return NO_REASON
    text = reason.lower()
    return next((kind for phrase, kind in _REASON_KINDS if phrase in text), "other")


def record_association(accepted: bool, reason: str | None) -> None:
    """An association request was accepted, or rejected for ``reason``."""
    ASSOCIATIONS.labels(ACCEPTED if accepted else REJECTED, reason_kind(reason)).inc()


def record_store_status(status: int) -> None:
    """The SCP answered a C-STORE with ``status`` (a named ``DimseStatus``, or a bare code)."""
    if status == 0:
        INSTANCES_RECEIVED.inc()
        return
    name = status.name.lower() if isinstance(status, IntEnum) else "unnamed"
    INSTANCES_REFUSED.labels(name, f"0x{int(status):04X}").inc()


P = ParamSpec("P")


def counts_store_status(handler: Callable[P, int]) -> Callable[P, int]:
    """Decorates a C-STORE handler: each status it answers is counted (received or refused)."""

    @functools.wraps(handler)
    def counted(*args: P.args, **kwargs: P.kwargs) -> int:
        status = handler(*args, **kwargs)
        record_store_status(status)
        return status

    return counted


def record_job_scored(seconds: float, images: int) -> None:
    """A job's results were committed ``seconds`` after it was claimed; it scored ``images``."""
    SCORING_SECONDS.observe(max(seconds, 0.0))
    IMAGES_SCORED.inc(images)


def record_scoring_round(images: int, seconds: float) -> None:
    """A scoring round handled ``images`` images in ``seconds`` of wall time."""
    if images > 0 and seconds > 0:
        ROUND_IMAGES_PER_SECOND.set(images / seconds)


def destination_kind(destination: str) -> str:
    """``stow`` for a DICOMweb destination's outbox text, else ``dicom``."""
    return DESTINATION_KINDS[1] if destination.lower().startswith(STOW_PREFIX) else DESTINATION_KINDS[0]


def record_transmission(outcome: str, destination: str) -> None:
    """One outbox send ended ``sent``, ``failed`` or ``dead`` for the destination ``destination``."""
    TRANSMISSIONS.labels(str(outcome), destination_kind(destination)).inc()
