"""DICOM TLS: the ssl contexts of the node's SCP and of its SCU to a TLS destination, and the
SCP's server, which does each TLS handshake in the connection's own thread and reports failures.

**Profile.** DICOM PS3.15 Annex B.12, the *BCP 195 RFC 8996 TLS Secure Transport Connection
Profile*, with the TLS 1.2 cipher suites narrowed to those of B.13 (*Modified BCP 195*):

- TLS 1.2 at least (RFC 8996 retires 1.0 and 1.1, so no downgrade either: B.10's requirement);
  TLS 1.3 whenever the peer has it (B.12: clients try it, servers prefer it).
- TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM (AEAD), RSA or ECDSA
  certificates, the four suites RFC 9325 recommends. No static-RSA key exchange, no CBC, no SHA-1
  MACs, and no DHE (Python cannot set its group size, which B.13 requires to be >= 2048 bits).
- TLS 1.3 suites: OpenSSL's (AES-GCM and ChaCha20-Poly1305, all AEAD); compression and
  renegotiation are off (OpenSSL's defaults).

Why this one: it is the profile the standard currently recommends, and its TLS 1.2 suites are the
ones dcmtk's default profile proposes, so dcmtk-based peers (storescu, Orthanc) and the node always
share a suite while nothing weaker is ever negotiated.

**Certificates.** Both sides verify: the SCP checks client certificates against
``tls_ca_certificates`` (required with ``tls_require_client_certificate``, else checked when one
is presented), and the SCU checks a destination's server certificate against the destination's
``tls_ca_certificates``, the node's, or the system's, with its host name (or
``tls_server_name``) unless the destination turns that off. A file that cannot be read, a key that
does not belong to its certificate, or an encrypted key is a one-line :class:`ConfigError` when the
context is built: at start, before the port opens.

**Handshakes.** pynetdicom's server wraps each accepted socket in its accept loop, where a failed
handshake is dropped without a trace and a silent client stalls every other caller.
:class:`TLSAssociationServer` wraps without handshaking and does the handshake, with a timeout, in
the thread that serves the connection; a failure closes the socket and is reported (the SCP audits
it as ``association.rejected`` with the peer's address and the reason). The thread then ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from node.config import ConfigError, Destination, DestinationTLS, NodeConfig
from node.peer_settings import subject_attributes

log = logging.getLogger(__name__)

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
    )
)
"""TLS 1.2 suites (OpenSSL names) of PS3.15 B.13; TLS 1.3 suites are OpenSSL's, all AEAD."""
HANDSHAKE_TIMEOUT = 30.0
"""A client that has not finished its TLS handshake after this many seconds is dropped."""

Subject = tuple[tuple[str, str], ...]
"""A certificate subject as (short attribute name, value) pairs, e.g. (("CN", "mg1"),)."""
HandshakeFailure = Callable[[str, int, str], None]
"""Called with the client's host, port and the reason when a TLS handshake fails."""


# -- contexts -----------------------------------------------------------------------------------


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _readable(path: Path, setting: str) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(
            f"{setting} {path}: cannot read it ({exc.strerror or type(exc).__name__})"
        ) from None


def _load_identity(context: ssl.SSLContext, certificate: Path, key: Path) -> None:
    """The node's certificate (chain) and key; a one-line ConfigError if they do not make a pair."""
    _readable(certificate, "tls_certificate")
    _readable(key, "tls_private_key")
    try:  # an encrypted key gets an empty password instead of a prompt on the terminal
        context.load_cert_chain(certificate, key, password=lambda: b"")
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "KEY_VALUES_MISMATCH" in reason:
            message = f"tls_private_key {key} is not the key of tls_certificate {certificate}"
        else:
            message = (
                f"tls_certificate {certificate} and tls_private_key {key} must be a PEM certificate "
                f"and its unencrypted PEM key ({_words(reason)})"
            )
        raise ConfigError(message) from None


def _load_cas(context: ssl.SSLContext, path: Path, setting: str) -> None:
    _readable(path, setting)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{setting} {path} is not a PEM certificate bundle ({_words(exc.reason)})"
        ) from None


def _words(reason: object) -> str:
    """OpenSSL's reason code as words: ``NO_START_LINE`` -> ``no start line``."""
    return str(reason or "unknown error").replace("_", " ").lower()


def server_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The SCP's context (None: the node speaks plain DICOM); client certificates are required
    with ``tls_require_client_certificate``, checked when presented if ``tls_ca_certificates`` is
    set, and not asked for otherwise. Raises ConfigError for unusable files, or for an allow-list
    that binds AE titles to certificate subjects the node cannot verify."""
    bound = [str(p) for p in config.allowed_aes if p.certificate_subject is not None]
    if bound and (config.tls_certificate is None or config.tls_ca_certificates is None):
        raise ConfigError(
            f"allowed_aes binds {bound[0]} to a certificate subject: the SCP needs "
            "tls_certificate, tls_private_key and tls_ca_certificates"
        )
    if config.tls_certificate is None or config.tls_private_key is None:
        return None
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_identity(context, config.tls_certificate, config.tls_private_key)
    if config.tls_ca_certificates is not None:
        _load_cas(context, config.tls_ca_certificates, "tls_ca_certificates")
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.tls_require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(tls: DestinationTLS, config: NodeConfig | None) -> ssl.SSLContext:
    """The SCU's context for one TLS destination: its server certificate is checked against the
    destination's CAs, else the node's ``tls_ca_certificates``, else the system's trust store; the
    node's certificate, if configured, is its client certificate."""
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = tls.check_hostname  # the CA check (CERT_REQUIRED) stays on
    node_cas = config.tls_ca_certificates if config is not None else None
    if tls.ca_certificates is not None:
        _load_cas(context, tls.ca_certificates, "destination tls_ca_certificates")
    elif node_cas is not None:
        _load_cas(context, node_cas, "tls_ca_certificates")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config is not None and config.tls_certificate is not None and config.tls_private_key is not None:
        _load_identity(context, config.tls_certificate, config.tls_private_key)
    return context


def tls_args(destination: Destination, config: NodeConfig | None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``associate(tls_args=...)`` for ``destination``: None without TLS."""
    if destination.tls is None:
        return None
    return client_context(destination.tls, config), destination.tls.server_name or destination.host


def check_tls(config: NodeConfig) -> None:
    """Build every context the config asks for (the SCP's and each TLS destination's), so that a
    bad certificate, key or CA file stops ``serve`` at start with one line instead of failing
    each association later. Raises ConfigError."""
    server_context(config)
    for destination in config.destinations:
        if destination.tls is not None:
            try:
                client_context(destination.tls, config)
            except ConfigError as exc:
                raise ConfigError(f"destination {destination}: {exc}") from None


# -- the SCP's server ---------------------------------------------------------------------------


def peer_certificate(assoc: Association) -> tuple[str, Subject | None] | None:
    """(TLS version, verified client certificate subject or None) of an association over TLS;
    None over plain TCP."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()  # {} unless the chain was verified against tls_ca_certificates
    rdns = cast("Sequence[Sequence[tuple[str, str]]]", cert.get("subject", ())) if cert else None
    subject = subject_attributes(rdns) if rdns is not None else None
    return str(sock.version() or "TLS"), subject


def handshake_failure(exc: BaseException, timeout: float) -> str:
    """Why a server-side TLS handshake failed, in words for the audit log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: no valid client certificate ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "TLS handshake failed: no valid client certificate (none presented)"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"):
            return f"TLS handshake failed: the client does not speak TLS ({_words(reason)})"
        if "ALERT" in reason:
            return f"TLS handshake failed: the client refused the connection ({_words(reason)})"
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "TLS handshake failed: the client closed the connection"
        return f"TLS handshake failed: {_words(reason or type(exc).__name__)}"
    if isinstance(exc, TimeoutError):
        return f"TLS handshake failed: not finished within {timeout:.0f} s"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return f"TLS handshake failed: connection lost ({text})"


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into the connection's thread.

    ``on_handshake_failure(host, port, reason)`` is told of each failed handshake (its own
    exceptions are logged, never raised into the server). Without an ssl context it is
    pynetdicom's server unchanged.
    """

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    on_handshake_failure: HandshakeFailure | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        if self.ssl_context is None:
            return super().get_request()
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:  # SSLError and timeouts are OSErrors
            self._refuse(sock, client_address, handshake_failure(exc, self.handshake_timeout))
            return False
        sock.settimeout(previous)
        return True

    def _refuse(self, sock: ssl.SSLSocket, client_address: Any, reason: str) -> None:
        with contextlib.suppress(OSError):
            sock.close()
        host, port = str(client_address[0]), int(client_address[1])
        log.warning("refused a connection from %s:%d: %s", host, port, reason)
        if self.on_handshake_failure is None:
            return
        try:
            self.on_handshake_failure(host, port, reason)
        except Exception:  # the server keeps serving; the failure is logged
            log.exception("could not report a failed TLS handshake from %s", host)


def start_server(
    ae: AE,
    address: tuple[str, int],
    context: ssl.SSLContext | None,
    handlers: Sequence[EventHandlerType],
    on_handshake_failure: HandshakeFailure | None = None,
) -> TLSAssociationServer:
    """``ae.start_server(address, block=False, ssl_context=context, evt_handlers=handlers)`` with a
    :class:`TLSAssociationServer`; stop it with ``server.shutdown()``. OSError if the port is taken."""
    made = ae.make_server(
        address, ssl_context=context, evt_handlers=list(handlers), server_class=TLSAssociationServer
    )
    server = cast(TLSAssociationServer, made)
    server.on_handshake_failure = on_handshake_failure
    name = f"AcceptorServer@{dt.datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
    return server
