"""The node's C-STORE / C-ECHO SCP (pynetdicom).

Contexts: Verification; Digital Mammography X-Ray For Presentation and For Processing and
Secondary Capture in every transfer syntax the preprocessing can decode; every other storage SOP
class too when ``unknown_sop_classes = "ignore"`` (answered Success, not stored, audited
``instance.ignored``), none of them when ``"reject"`` (pynetdicom refuses those presentation
contexts during negotiation, so the SCU never sends them).

The C-STORE handler is fast: pynetdicom writes the dataset to a file as it arrives; the handler
parses its header (pixel data left unread), checks UIDs, SOP class and pixel-data plausibility,
moves the file as received into the spool (fsync'd) while it records the instance, commits once
the file is durable, and only then answers Success. The node never copies an image in memory
(:mod:`node.dicom.received`). Every
failure is a named status (:mod:`node.dicom.status`) plus an ``instance.rejected`` audit entry
when the database works; an unexpected exception is logged and answered PROCESSING_FAILURE, and
the server keeps serving.

Allow-list (:mod:`node.dicom.allowlist`): ``config.allowed_aes`` lists calling AE titles, each
optionally bound to a host and to a DICOM TLS client-certificate subject. pynetdicom 3 only checks
AE titles itself (``AE.require_calling_aet``); the host and certificate checks are done in an
``EVT_REQUESTED`` handler, which runs after the A-ASSOCIATE-RQ is read and before pynetdicom
negotiates. It answers A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE title not
recognised) through ``assoc.acse.send_reject`` and stops the association, the pattern pynetdicom
documents for that event. Notification handlers' exceptions are swallowed by pynetdicom, so the
handler fails closed on its own errors, and ``require_calling_aet`` is set as well, so an AE
outside the list is refused even if the handler never ran. Host names in the allow-list are
resolved to addresses once, at start.

DICOM TLS (:mod:`node.dicom.tls`): with ``tls_certificate`` and ``tls_private_key`` the port speaks
TLS only. A client whose handshake fails (no valid certificate when one is required, a certificate
from another CA, plain DICOM) is refused before any association exists, and audited as
``association.rejected`` with its address and the reason; the node keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import Future, wait
from pathlib import PurePosixPath
from typing import Any

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # defined at import
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from inference import (
    DX_MAMMO_FOR_PRESENTATION,
    DX_MAMMO_FOR_PROCESSING,
    InputError,
    describe,
    is_valid_uid,
    scrub_library_logs,
)
from node import audit
from node.config import NodeConfig
from node.db.models import Association, utcnow
from node.dicom import codestream, intake, tls
from node.dicom.allowlist import AllowList
from node.dicom.contexts import QuickCopyContexts
from node.dicom.received import discard_unfinished, receive_into, received_instance
from node.dicom.spool import (
    InvalidUIDError,
    SpoolFullError,
    incoming_dir,
    remove_stale_temp_files,
    spool_error,
    spool_relpath,
    write_in_background,
)
from node.dicom.status import DimseStatus, RejectReason, RejectResult, RejectSource
from node.observability import metrics

log = logging.getLogger(__name__)

ACTOR = "scp"
VERIFICATION = Verification
SECONDARY_CAPTURE = SecondaryCaptureImageStorage
STORED_SOP_CLASSES: tuple[str, ...] = (DX_MAMMO_FOR_PRESENTATION, DX_MAMMO_FOR_PROCESSING, SECONDARY_CAPTURE)
"""The SOP classes the node spools and records; other storage classes follow the config."""

CANDIDATE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,  # preferred over implicit when a peer offers both: it keeps the VRs
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)
"""Offered for the stored classes when a decoder for them is installed (see below)."""
_UNSAFE_PLUGINS = frozenset({"gdcm"})  # inference.dicom_pixels never decodes with it (it can abort)

ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 120.0
NETWORK_TIMEOUT = 120.0
"""An idle association is closed after this many seconds."""
REGISTER_ATTEMPTS = 3
"""Transactions retried when concurrent associations race to create the same study or breast."""


def decodable_transfer_syntaxes() -> list[UID]:
    """The candidate syntaxes that inference.dicom_pixels can decode with what is installed here.

    Native syntaxes always; a compressed one only if pydicom has an available decoder plugin
    other than gdcm. Accepting a syntax the worker cannot decode would acknowledge an image that
    can never be scored.
    """
    out: list[UID] = []
    for ts in CANDIDATE_TRANSFER_SYNTAXES:
        if not ts.is_compressed:
            out.append(ts)
            continue
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            continue
        if decoder.is_available and set(decoder.available_plugins) - _UNSAFE_PLUGINS:
            out.append(ts)
    return out


# --------------------------------------------------------------------------------------------
# The SCP
# --------------------------------------------------------------------------------------------


class NodeSCP:
    """Event handlers of the node's SCP, bound to one config and one session factory."""

    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.sessions = sessions
        self.allow_list = AllowList.from_peers(config.allowed_aes)
        self._rows: dict[PynetAssociation, int] = {}
        self._lock = threading.Lock()

    @property
    def handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def build_ae(self) -> AE:
        """The pynetdicom AE: identity, PDU size, timeouts and presentation contexts."""
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu
        ae.maximum_associations = self.config.max_associations
        ae.acse_timeout = ACSE_TIMEOUT
        ae.dimse_timeout = DIMSE_TIMEOUT
        ae.network_timeout = NETWORK_TIMEOUT
        ae.require_calling_aet = sorted({p.ae_title for p in self.config.allowed_aes})
        ae.add_supported_context(VERIFICATION)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORED_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        if self.config.unknown_sop_classes == "ignore":
            for cx in AllStoragePresentationContexts:
                sop_class = str(cx.abstract_syntax)
                if sop_class not in STORED_SOP_CLASSES:
                    ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        return ae

    # -- associations ------------------------------------------------------------------------

    def on_requested(self, event: Event) -> None:
        """Refuse a calling AE / host / certificate outside the allow-list before negotiation (fail
        closed)."""
        assoc = event.assoc
        calling_ae = _calling_ae(assoc)
        try:
            peer = tls.peer_certificate(assoc)
            subject = peer[1] if peer is not None else None
            reason = self.allow_list.refusal(calling_ae, str(assoc.requestor.address), subject)
        except Exception:
            log.exception("allow-list check failed; rejecting the association")
            reason = "allow-list check failed"
        if reason is None:
            return
        log.warning("rejecting association from %s at %s: %s", calling_ae, assoc.requestor.address, reason)
        try:  # audited before the peer hears of it; a database failure must not let it in
            self._record_association(assoc, accepted=False, reason=reason)
        finally:
            assoc.acse.send_reject(
                RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNISED
            )
            assoc.kill()

    def on_accepted(self, event: Event) -> None:
        row_id = self._record_association(event.assoc, accepted=True, reason=None)
        if row_id is not None:
            with self._lock:
                self._rows[event.assoc] = row_id

    def on_rejected(self, event: Event) -> None:
        """pynetdicom's own rejections (called AE, too many associations, AE outside the list)."""
        primitive = event.assoc.acceptor.primitive
        diagnostic = getattr(primitive, "diagnostic", None)
        reason = f"rejected by the DICOM layer (diagnostic {diagnostic})"
        if diagnostic == RejectReason.CALLING_AE_NOT_RECOGNISED:
            reason = "calling AE title not in the allow-list"
        self._record_association(event.assoc, accepted=False, reason=reason)

    def on_conn_close(self, event: Event) -> None:
        if discard_unfinished(event.assoc):
            log.info("discarded a dataset cut off when its association ended")
        with self._lock:
            row_id = self._rows.pop(event.assoc, None)
        if row_id is None:
            return
        try:
            with self.sessions() as session:
                row = session.get(Association, row_id)
                if row is not None:
                    row.ended_at = utcnow()
                    session.commit()
        except SQLAlchemyError as exc:  # bookkeeping only (e.g. the database went away at shutdown)
            log.warning("could not record the end of association %d: %s", row_id, type(exc).__name__)

    def association_id(self, assoc: PynetAssociation) -> int | None:
        with self._lock:
            return self._rows.get(assoc)

    def on_handshake_failure(self, host: str, port: int, reason: str) -> None:
        """A client refused during the TLS handshake (no association, no AE titles yet): audited
        as ``association.rejected`` with its address and the reason."""
        self._record(host, port, "", "", accepted=False, reason=reason, details={"tls": "handshake failed"})

    def _record_association(
        self, assoc: PynetAssociation, *, accepted: bool, reason: str | None
    ) -> int | None:
        called_ae = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        details: dict[str, Any] = {}
        peer = tls.peer_certificate(assoc)
        if peer is not None:  # over DICOM TLS: the version and the verified client certificate
            subject = "/".join(f"{name}={value}" for name, value in peer[1]) if peer[1] else None
            details = {"tls": peer[0], "client_certificate": subject}
        host, port = str(assoc.requestor.address), int(assoc.requestor.port or 0)
        calling_ae = _calling_ae(assoc)
        return self._record(
            host, port, calling_ae, called_ae, accepted=accepted, reason=reason, details=details
        )

    def _record(
        self,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        *,
        accepted: bool,
        reason: str | None,
        details: dict[str, Any],
    ) -> int | None:
        """An ``associations`` row and its audit event; the row id (None if the database failed)."""
        metrics.record_association(accepted, reason)
        try:
            with self.sessions() as session:
                row = Association(
                    calling_ae=calling_ae[:64],
                    called_ae=called_ae[:64],
                    peer_host=host[:255],
                    peer_port=port,
                    accepted=accepted,
                    reason=reason[:255] if reason else reason,
                )
                session.add(row)
                session.flush()
                audit.record(
                    session,
                    audit.ASSOCIATION_ACCEPTED if accepted else audit.ASSOCIATION_REJECTED,
                    ACTOR,
                    calling_ae=calling_ae or None,
                    peer=f"{host}:{port}",
                    details={"association_id": row.id, "called_ae": called_ae, "reason": reason, **details},
                )
                session.commit()
                return row.id
        except SQLAlchemyError:
            log.exception("could not record an association from %s (%s)", calling_ae or "-", host)
            return None

    # -- C-STORE -----------------------------------------------------------------------------

    @metrics.counts_store_status
    def on_store(self, event: Event) -> int:
        """Store one instance; Success only once its file is synced and its row committed."""
        started = time.monotonic()
        context_class = str(event.context.abstract_syntax)
        receipt = intake.Receipt()
        try:
            if context_class not in STORED_SOP_CLASSES:
                return self._ignore(event, context_class)
            return self._store(event, context_class, started, receipt)
        except Exception as exc:  # noqa: BLE001 - a bug: answered, logged without values, audited
            _log_error(
                f"unexpected error storing an instance of SOP class {context_class}", exc, receipt.known
            )
            status = DimseStatus.PROCESSING_FAILURE
            self._audit_refusal(event, status, describe(exc, receipt.known, limit=300), receipt)
            return status

    def _store(self, event: Event, context_class: str, started: float, receipt: intake.Receipt) -> int:
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            try:
                data = received_instance(event)
            except OSError as exc:  # the spool's disk failed (filled) while it arrived
                raise spool_error(exc) from exc
            try:
                intake.examine(
                    data,
                    transfer_syntax=transfer_syntax,
                    context_sop_class=context_class,
                    affected_sop_instance=str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""),
                    max_pixels=self.config.max_image_pixels,
                    receipt=receipt,
                )
            finally:
                data.close()  # the checks' view of a received file; the spool takes the file itself
            assert receipt.uids is not None and receipt.info is not None  # examine fills both
            uids, info = receipt.uids, receipt.info
            rel = spool_relpath(uids.study, uids.series, uids.sop_instance)
            writing = write_in_background(self.config, uids.study, uids.series, uids.sop_instance, data)
            try:
                registration = self._register(event, info, str(rel), len(data), transfer_syntax, writing)
            finally:
                wait([writing])  # never answer while the file is still being written
        except (InvalidUIDError, InputError, SpoolFullError, OperationalError) as exc:
            status = _failure_status(exc)
            reason = describe(exc, receipt.known, limit=300)
            sop = receipt.uids.sop_instance if receipt.uids else "?"
            log.warning("refused instance %s: %s (%s)", sop, status.name, reason)
            self._audit_refusal(event, status, reason, receipt)
            return status
        if receipt.ignored:
            log.info(
                "instance %s: left out unreadable element(s) %s",
                uids.sop_instance,
                ", ".join(receipt.ignored),
            )
        log.info(
            "stored %s %s (%s, %d bytes%s) in %.0f ms",
            "scorable" if info.scorable else "skipped",
            uids.sop_instance,
            UID(transfer_syntax).name,
            len(data),
            ", resend" if not registration.new else "",
            1000 * (time.monotonic() - started),
        )
        return DimseStatus.SUCCESS

    def _register(
        self,
        event: Event,
        info: intake.InstanceInfo,
        rel: str,
        size: int,
        transfer_syntax: str,
        writing: Future[PurePosixPath],
    ) -> intake.Registration:
        """Record the instance and commit once ``writing`` (its spool file) is durable.

        The rows are prepared while the file is written and synced in another thread (the
        handler's two slowest steps overlap), and committed only after the file is on disk, so
        a committed row always names a durable file; a failed write rolls the rows back.
        """
        assoc = event.assoc
        for attempt in range(1, REGISTER_ATTEMPTS + 1):
            try:
                with self.sessions() as session:
                    registration = intake.register_instance(
                        session,
                        info,
                        spool_path=rel,
                        size_bytes=size,
                        transfer_syntax_uid=transfer_syntax,
                        association_id=self.association_id(assoc),
                        calling_ae=_calling_ae(assoc),
                        peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                    )
                    writing.result()  # SpoolFullError, OSError: the rows are rolled back
                    session.commit()
                    return registration
            except IntegrityError:
                if attempt == REGISTER_ATTEMPTS:
                    raise
                log.info("concurrent receipt of study %s; retrying", info.meta.study_instance_uid)
        raise AssertionError("unreachable")  # pragma: no cover

    def _ignore(self, event: Event, context_class: str) -> int:
        """Another storage SOP class, accepted by configuration: audit it, store nothing."""
        header: Dataset | None = None
        with contextlib.suppress(InputError):  # unparsable: the audit entry carries no UIDs
            try:
                data = received_instance(event)
            except OSError as exc:  # the spool's disk failed (filled) while it arrived
                raise spool_error(exc) from exc
            try:
                header = intake.header_of(intake.parse_encoded(data), data)
            finally:
                data.close()
        study_uid = _valid_uid_tag(header, "StudyInstanceUID")
        sop_uid = _valid_uid_tag(header, "SOPInstanceUID")
        try:
            with self.sessions() as session:
                audit.record(
                    session,
                    audit.INSTANCE_IGNORED,
                    ACTOR,
                    patient_id=_patient_id(header),
                    study_uid=study_uid,
                    sop_instance_uid=sop_uid,
                    calling_ae=_calling_ae(event.assoc),
                    peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
                    details={"sop_class_uid": context_class, "reason": "SOP class not stored by the node"},
                )
                session.commit()
        except OperationalError as exc:
            _log_error(f"could not audit an ignored instance of SOP class {context_class}", exc)
            return DimseStatus.DATABASE_UNAVAILABLE
        log.info("ignored an instance of SOP class %s (not stored by the node)", context_class)
        return DimseStatus.SUCCESS

    def _audit_refusal(self, event: Event, status: DimseStatus, reason: str, receipt: intake.Receipt) -> None:
        """``instance.rejected`` with the status name and a short scrubbed reason; an instance
        refused before its dataset was read (a full disk) is named by its C-STORE request."""
        uids = receipt.uids
        requested = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        sop_instance = uids.sop_instance if uids else requested if is_valid_uid(requested) else None
        try:
            with self.sessions() as session:
                audit.record(
                    session,
                    audit.INSTANCE_REJECTED,
                    ACTOR,
                    patient_id=receipt.patient_id,
                    study_uid=uids.study if uids else None,
                    sop_instance_uid=sop_instance,
                    calling_ae=_calling_ae(event.assoc),
                    peer=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
                    details={"status": status.name, "reason": reason[:500]},
                )
                session.commit()
        except SQLAlchemyError as exc:
            _log_error("could not audit a refused instance", exc, receipt.known)


def _log_error(message: str, exc: BaseException, known: Iterable[str] = ()) -> None:
    """An error line with the exception scrubbed (invariant 10) and its traceback's frames.

    ``log.exception`` would print the exception's own text, which may quote a patient's value
    (pydicom, SQLAlchemy parameters); the frames hold only code locations.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error("%s: %s\nTraceback (most recent call last):\n%s", message, describe(exc, known), frames)


def _failure_status(exc: Exception) -> DimseStatus:
    """The named status for an expected failure (subclasses before their bases)."""
    if isinstance(exc, InvalidUIDError):
        return DimseStatus.INVALID_UID
    if isinstance(exc, intake.SOPClassMismatchError):
        return DimseStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, intake.ImageTooLargeError):
        return DimseStatus.IMAGE_TOO_LARGE
    if isinstance(exc, intake.PixelDataError | codestream.FragmentError):
        return DimseStatus.UNUSABLE_PIXEL_DATA
    if isinstance(exc, codestream.CodestreamError):
        return DimseStatus.CODESTREAM_MISMATCH
    if isinstance(exc, intake.MalformedElementError):
        return DimseStatus.MALFORMED_ELEMENT
    if isinstance(exc, InputError):
        return DimseStatus.CANNOT_UNDERSTAND
    if isinstance(exc, SpoolFullError):
        return DimseStatus.OUT_OF_RESOURCES
    return DimseStatus.DATABASE_UNAVAILABLE


def _calling_ae(assoc: PynetAssociation) -> str:
    primitive = assoc.requestor.primitive
    title = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title
    return str(title or "").strip()


def _patient_id(header: Dataset | None) -> str | None:
    if header is None:
        return None
    return intake.tag_text(header, "PatientID")[:64] or None


def _valid_uid_tag(header: Dataset | None, keyword: str) -> str | None:
    value = intake.tag_text(header, keyword) if header is not None else ""
    return value if is_valid_uid(value) else None


def start_scp(config: NodeConfig, sessions: sessionmaker[Session]) -> ThreadedAssociationServer:
    """Start the node's SCP in background threads on ``config.bind_address:config.port``.

    Speaks DICOM TLS when the config has a certificate and key (:mod:`node.dicom.tls`). Removes
    interrupted spool writes first. Stop it with ``server.shutdown()``. Raises ConfigError for
    unusable TLS files (before the port opens) and OSError when the port cannot be bound.

    Sets pynetdicom's process-wide ``STORE_RECV_CHUNKED_DATASET``: every C-STORE SCP in this
    process receives datasets into temporary files (``event.dataset`` reads them as before), and
    the node's, in the spool's incoming folder, are renamed into place instead of being held and
    copied in memory.
    """
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    context = tls.server_context(config)
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(config)
    scrub_library_logs()
    scp = NodeSCP(config, sessions)
    ae = scp.build_ae()
    receive_into(ae, incoming_dir(config))
    if scp.allow_list.open:
        log.warning("no allowed_aes configured: every calling AE may store to this node")
    address = (config.bind_address, config.port)
    server = tls.start_server(ae, address, context, scp.handlers, scp.on_handshake_failure)
    server.contexts = QuickCopyContexts(server.contexts)
    log.info(
        "DICOM SCP %s listening on %s:%d%s (other storage SOP classes: %s)",
        config.ae_title,
        config.bind_address,
        config.port,
        "" if context is None else " with DICOM TLS",
        config.unknown_sop_classes,
    )
    return server


def stop_scp(server: ThreadedAssociationServer, timeout: float = 10.0) -> None:
    """Stop listening, abort associations still open and wait for their threads.

    An instance being stored while its association is aborted may still be committed; the peer
    got no Success and resends it, which the spool and the rows absorb (idempotent).
    """
    open_associations = list(server.active_associations)
    server.shutdown()
    for assoc in open_associations:
        if assoc.is_alive():
            assoc.abort()
        assoc.join(timeout)
