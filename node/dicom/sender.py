"""C-STORE and C-ECHO SCU: `mammonode send` / `echo`, and the outbox sender of `mammonode serve`.

A DICOM TLS destination (``AE@HOST:PORT;tls``) gets the same C-STOREs over TLS
(:mod:`node.dicom.tls`: its server certificate checked, the node's certificate presented).
A DICOMweb destination (``stow:URL``) is sent to by STOW-RS instead (:mod:`node.dicom.stow`),
through the same outbox pass, backoff, dead letters and audit; its HTTP answers map onto the rules
below as that module's docstring tabulates.

Each file is sent in its own transfer syntax (a J2K file stays J2K); a presentation context is
proposed per SOP class and syntax, and an uncompressed file also offers Explicit and Implicit VR
Little Endian in a second context, which pynetdicom converts to if the peer refuses the file's
own. A compressed file is never transcoded: a peer that refuses its syntax refuses it
permanently.

The outbox pass (:func:`deliver_due`) follows the sender contract: one association per
destination per pass; success -> ``sent``; a failure of the destination (connection refused, a
peer that does not answer, abort, out of resources, and a rejected association, permanent or not:
a PACS that does not know the node yet is fixed on the PACS, after which delivery must resume
with no command on the node) -> ``failed`` with exponential backoff; a failure of the object
(refused presentation context, failure statuses that a resend cannot fix, missing outbox file),
or any failure older than ``retry_max_age_hours`` -> ``dead``. Each outcome is audited. Resends
are harmless: output SOP Instance UIDs are deterministic.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # defined at import
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference import InputError, read_dataset
from node import audit
from node.config import ConfigError, Destination, DestinationTLS, NodeConfig
from node.db.models import Job, OutputObject, Study, Transmission, as_utc, utcnow
from node.db.states import TRANSMISSION_DUE, TransmissionState, check_transition
from node.dicom import stow, tls
from node.dicom.outcome import SUCCESS_NAME, SendOutcome
from node.dicom.status import RejectResult, is_success, is_transient_failure, status_name
from node.observability import metrics

log = logging.getLogger(__name__)

ACTOR = "sender"
VERIFICATION = Verification
MAX_CONTEXTS = 120
"""Presentation contexts per association (PS3.8 allows 128 ids); more files -> more associations."""
ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 120.0
NETWORK_TIMEOUT = 60.0
CONNECTION_TIMEOUT = 15.0
MAX_PDU = 1_048_576
DUE_BATCH = 500
"""Transmissions handled per pass at most, so one pass stays bounded."""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None
    detail: str


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class: str
    transfer_syntax: UID
    part10: bool


def _make_ae(calling_ae: str, max_pdu: int) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ACSE_TIMEOUT
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    ae.connection_timeout = CONNECTION_TIMEOUT
    return ae


def _association_failure(assoc: Association, over_tls: bool = False) -> tuple[str, bool]:
    """Why an association was not established, and whether that is permanent for the objects
    (never: no association says anything about the objects; the destination is retried)."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        kind = "permanent" if result == RejectResult.PERMANENT else "transient"
        reason = getattr(primitive, "reason_str", "") or "no reason given"
        return f"association rejected ({kind}): {reason}", False
    if assoc.is_aborted and over_tls:  # pynetdicom logs the handshake's error, it does not keep it
        return "no association: connection refused or timed out, TLS handshake failed, or aborted", False
    if assoc.is_aborted:
        return "no association: connection refused or timed out, or aborted by the peer", False
    return "no association: the peer did not answer", False


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    *,
    max_pdu: int = MAX_PDU,
    over_tls: DestinationTLS | None = None,
    config: NodeConfig | None = None,
) -> EchoResult:
    """One C-ECHO, over DICOM TLS with ``over_tls`` (``config`` gives the node's certificate and
    CAs); ``ok`` when the peer answered Success. Raises ConfigError for unusable TLS files."""
    ae = _make_ae(calling_ae, max_pdu)
    ae.add_requested_context(VERIFICATION)
    tls_args = tls.tls_args(Destination(called_ae, host, port, tls=over_tls), config)
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        detail, _ = _association_failure(assoc, over_tls is not None)
        return EchoResult(False, None, detail)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        return EchoResult(False, None, "no C-ECHO response (timeout or abort)")
    code = int(rsp.Status)
    return EchoResult(code == 0, code, status_name(code))


def _inspect(path: Path) -> _File:
    """SOP class and transfer syntax of a file, read without its pixel data."""
    ds = read_dataset(path, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if not sop_class or not ts:
        raise InputError(f"{path.name} has no SOP Class UID or Transfer Syntax UID")
    return _File(path, sop_class, UID(ts), ds.preamble is not None)


def _contexts(ts: UID) -> list[list[str]]:
    """Presentation contexts (transfer-syntax lists) to propose for files in syntax ``ts``.

    The file's own syntax gets a context of its own, so a peer that supports it is never talked
    into another one; an uncompressed file also offers Explicit/Implicit VR Little Endian in a
    second context, which pynetdicom converts to if the first is refused.
    """
    own = [str(ts)]
    if ts.is_compressed or ts.is_deflated:
        return [own]
    fallback = [str(t) for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts]
    return [own, fallback]


def _chunks(files: Sequence[_File]) -> list[list[_File]]:
    """Split files so no association proposes more than MAX_CONTEXTS presentation contexts."""
    chunks: list[list[_File]] = []
    keys: set[tuple[str, UID]] = set()
    used = 0
    for f in files:
        key = (f.sop_class, f.transfer_syntax)
        cost = 0 if key in keys else len(_contexts(f.transfer_syntax))
        if not chunks or used + cost > MAX_CONTEXTS:
            chunks.append([])
            keys, used = set(), 0
            cost = len(_contexts(f.transfer_syntax))
        keys.add(key)
        used += cost
        chunks[-1].append(f)
    return chunks


def store_files(
    paths: Iterable[Path],
    destination: Destination,
    calling_ae: str,
    *,
    max_pdu: int = MAX_PDU,
    config: NodeConfig | None = None,
) -> list[SendOutcome]:
    """C-STORE ``paths`` to ``destination``, one association (per 120 contexts); one outcome per
    path, in order. Unreadable and non-DICOM files fail permanently without stopping the rest.
    A TLS destination is checked against, and shown, the TLS files of ``config`` (the node's).
    A DICOMweb destination gets them by STOW-RS instead (:func:`node.dicom.stow.store_instances`)."""
    if destination.stow is not None:
        return stow.store_instances([Path(p) for p in paths], destination.stow)
    outcomes: dict[Path, SendOutcome] = {}
    order: list[Path] = []
    files: list[_File] = []
    for raw in paths:
        path = Path(raw)
        order.append(path)
        try:
            files.append(_inspect(path))
        except (InputError, OSError) as exc:
            outcomes[path] = SendOutcome(path, None, f"not sent: {exc}", permanent=True)
    for chunk in _chunks(files):
        for outcome in _store_chunk(chunk, destination, calling_ae, max_pdu, config):
            outcomes[outcome.path] = outcome
    return [outcomes[p] for p in order]


def _store_chunk(
    files: list[_File], destination: Destination, calling_ae: str, max_pdu: int, config: NodeConfig | None
) -> list[SendOutcome]:
    try:
        tls_args = tls.tls_args(destination, config)
    except ConfigError as exc:  # fixed on the node (a file restored), after which delivery resumes
        log.warning("cannot send to %s: DICOM TLS: %s", destination, exc)
        return [SendOutcome(f.path, None, f"DICOM TLS not usable: {exc}") for f in files]
    ae = _make_ae(calling_ae, max_pdu)
    for sop_class, ts in dict.fromkeys((f.sop_class, f.transfer_syntax) for f in files):
        for syntaxes in _contexts(ts):
            ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        detail, permanent = _association_failure(assoc, tls_args is not None)
        log.warning("cannot send to %s: %s", destination, detail)
        return [SendOutcome(f.path, None, detail, permanent) for f in files]
    outcomes: list[SendOutcome] = []
    try:
        for f in files:
            if not assoc.is_established:
                outcomes.append(SendOutcome(f.path, None, "association lost before this file was sent"))
                continue
            outcomes.append(_store_one(assoc, f))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store_one(assoc: Association, f: _File) -> SendOutcome:
    try:
        payload: Path | Dataset = f.path if f.part10 else read_dataset(f.path)
        rsp = assoc.send_c_store(payload)
    except ValueError as exc:  # pynetdicom: no accepted context for this class/syntax
        return SendOutcome(f.path, None, f"peer accepted no presentation context: {exc}", permanent=True)
    except (InputError, OSError, AttributeError) as exc:
        return SendOutcome(f.path, None, f"not sent: {exc}", permanent=True)
    if "Status" not in rsp:
        return SendOutcome(f.path, None, "no C-STORE response (timeout or abort)")
    code = int(rsp.Status)
    if is_success(code):
        return SendOutcome(f.path, code, SUCCESS_NAME if code == 0 else status_name(code))
    return SendOutcome(f.path, code, status_name(code), permanent=not is_transient_failure(code))


def send_files(
    paths: Iterable[Path], destination: Destination, calling_ae: str, *, max_pdu: int = MAX_PDU
) -> list[tuple[Path, str]]:
    """C-STORE files to ``destination``; ``(path, status name)`` per file (``SUCCESS`` when
    stored). See :func:`store_files` for the outcome with the raw status and permanence."""
    return [(o.path, o.detail) for o in store_files(paths, destination, calling_ae, max_pdu=max_pdu)]


# --------------------------------------------------------------------------------------------
# The outbox
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Due:
    id: int
    destination: str
    created_at: dt.datetime
    outbox_path: str
    sop_instance_uid: str
    study_uid: str
    patient_id: str


def backoff_seconds(config: NodeConfig, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed tries (1, 2, ...)."""
    exponent = max(attempts - 1, 0)
    if exponent > 62:  # 2**63 seconds is beyond any cap; avoid float overflow
        return config.retry_max_seconds
    return float(min(config.retry_initial_seconds * 2**exponent, config.retry_max_seconds))


def deliver_due(config: NodeConfig, sessions: sessionmaker[Session], now: dt.datetime | None = None) -> int:
    """One pass over the outbox: send every transmission due at ``now``; returns how many were
    attempted (sent, failed or dead). Network I/O happens outside any database transaction."""
    now = now or utcnow()
    with sessions() as session:
        due = _due(session, now)
    by_destination: dict[str, list[_Due]] = {}
    for item in due:
        by_destination.setdefault(item.destination, []).append(item)
    for destination_text, items in by_destination.items():
        outcomes = _send_to(config, destination_text, items)
        with sessions() as session:
            for item, outcome in zip(items, outcomes, strict=True):
                _apply(session, config, item, outcome, now)
            session.commit()
    return len(due)


def _due(session: Session, now: dt.datetime) -> list[_Due]:
    stmt = (
        select(
            Transmission.id,
            Transmission.destination,
            Transmission.created_at,
            OutputObject.outbox_path,
            OutputObject.sop_instance_uid,
            Study.study_uid,
            Study.patient_id,
        )
        .join(OutputObject, Transmission.output_id == OutputObject.id)
        .join(Job, OutputObject.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Transmission.state.in_(TRANSMISSION_DUE), Transmission.next_attempt_at <= now)
        .order_by(Transmission.next_attempt_at, Transmission.id)
        .limit(DUE_BATCH)
    )
    return [_Due(*row) for row in session.execute(stmt)]


def _send_to(config: NodeConfig, destination_text: str, items: list[_Due]) -> list[SendOutcome]:
    paths = [config.outbox_dir / item.outbox_path for item in items]
    try:
        destination = _destination(config, destination_text)
    except ConfigError as exc:
        return [SendOutcome(p, None, f"invalid destination: {exc}", permanent=True) for p in paths]
    present = [p for p in paths if p.is_file()]
    sent = {
        o.path: o
        for o in store_files(present, destination, config.ae_title, max_pdu=config.max_pdu, config=config)
    }
    return [sent.get(p) or SendOutcome(p, None, "outbox file is missing", permanent=True) for p in paths]


def _destination(config: NodeConfig, text: str) -> Destination:
    """The configured destination an outbox row names (a DICOMweb one carries its auth and timeout,
    a TLS one its CA and server name), else the row's own text parsed: a destination removed from
    the config still gets its rows. A DICOM row follows its AE@HOST:PORT's current TLS setting, so
    rows queued before TLS was turned on for it are not sent in clear."""
    for destination in config.destinations:
        if str(destination) == text:
            return destination
    parsed = Destination.parse(text)
    for destination in config.destinations:
        if parsed.stow is None and destination.stow is None and destination.address == parsed.address:
            return destination
    return parsed


def _apply(session: Session, config: NodeConfig, item: _Due, outcome: SendOutcome, now: dt.datetime) -> None:
    row = session.get(Transmission, item.id)
    if row is None or row.state not in TRANSMISSION_DUE:
        return  # dropped or retried by an operator meanwhile
    row.attempts += 1
    details = {
        "transmission_id": row.id,
        "destination": item.destination,
        "attempts": row.attempts,
        "status": outcome.detail,
    }
    if outcome.ok:
        row.state = check_transition(row.state, TransmissionState.SENT)
        row.sent_at, row.last_error = now, None
        event = audit.RESULT_SENT
        log.info("sent %s to %s", item.sop_instance_uid, item.destination)
    else:
        row.last_error = outcome.detail[:2000]
        too_old = now - as_utc(item.created_at) > dt.timedelta(hours=config.retry_max_age_hours)
        if outcome.permanent or too_old:
            row.state = check_transition(row.state, TransmissionState.DEAD)
            event = audit.RESULT_DEAD
            details["reason"] = "permanent failure" if outcome.permanent else "older than retry_max_age_hours"
            log.warning(
                "gave up sending %s to %s: %s", item.sop_instance_uid, item.destination, outcome.detail
            )
        else:
            row.state = check_transition(row.state, TransmissionState.FAILED)
            delay = backoff_seconds(config, row.attempts)
            row.next_attempt_at = now + dt.timedelta(seconds=delay)
            event = audit.RESULT_FAILED
            details["retry_in_seconds"] = delay
            log.info(
                "sending %s to %s failed (%s); retry in %.0f s",
                item.sop_instance_uid,
                item.destination,
                outcome.detail,
                delay,
            )
    metrics.record_transmission(row.state, item.destination)
    audit.record(
        session,
        event,
        ACTOR,
        patient_id=item.patient_id,
        study_uid=item.study_uid,
        sop_instance_uid=item.sop_instance_uid,
        peer=item.destination,
        details=details,
    )
