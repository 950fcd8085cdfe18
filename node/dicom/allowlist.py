"""The SCP's calling-AE allow-list: who may associate, from which host, with which certificate.

Each entry of ``config.allowed_aes`` names a calling AE title, optionally bound to a host (its
names are resolved to addresses once, at start) and to a client-certificate subject (DICOM TLS:
compared with the subject of the certificate the node verified during the handshake). An
association is admitted when one entry for its calling AE matches all of its bindings. The calling
AE title alone is not authenticated; a certificate binding is what makes it so.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from node.config import AllowedPeer, CertificateSubject

log = logging.getLogger(__name__)

NOT_LISTED = "calling AE title not in the allow-list"
WRONG_HOST = "calling AE title not allowed from this host"
NO_CERTIFICATE = "calling AE title needs a verified client certificate (DICOM TLS)"
WRONG_CERTIFICATE = "calling AE title not bound to this client certificate"


def normalise_address(address: str) -> str:
    """An IP address in canonical text (IPv4-mapped IPv6 as plain IPv4); other text unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def resolve_host(host: str) -> frozenset[str]:
    """The addresses ``host`` stands for (itself if an IP address; DNS otherwise, once)."""
    addresses = {normalise_address(host)}
    try:
        ipaddress.ip_address(host)
        return frozenset(addresses)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("allow-list host %s does not resolve (%s); it matches only itself", host, exc)
        return frozenset(addresses)
    addresses.update(normalise_address(str(info[4][0])) for info in infos)
    return frozenset(addresses)


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry, its host resolved: from any host when ``hosts`` is None, with any
    (or no) certificate when ``subject`` is None."""

    ae_title: str
    hosts: frozenset[str] | None = None
    subject: CertificateSubject | None = None


@dataclass(frozen=True)
class AllowList:
    """Calling AE titles the node accepts, each with the host and certificate it is bound to."""

    entries: tuple[AllowEntry, ...] = ()

    @classmethod
    def from_peers(cls, peers: Sequence[AllowedPeer]) -> AllowList:
        return cls(
            tuple(
                AllowEntry(
                    p.ae_title, None if p.host is None else resolve_host(p.host), p.certificate_subject
                )
                for p in peers
            )
        )

    @property
    def open(self) -> bool:
        """No entries: every calling AE is accepted."""
        return not self.entries

    def refusal(
        self, calling_ae: str, address: str, certificate: Sequence[tuple[str, str]] | None = None
    ) -> str | None:
        """None when admitted, else the reason (for the audit log). ``certificate`` is the subject
        of the client certificate the node verified (None: plain TCP, or no certificate)."""
        if self.open:
            return None
        calling_ae = calling_ae.strip()
        address = normalise_address(address)
        reason = NOT_LISTED
        for entry in self.entries:
            if entry.ae_title != calling_ae:
                continue
            if entry.hosts is not None and address not in entry.hosts:
                reason = reason if reason != NOT_LISTED else WRONG_HOST
                continue
            if entry.subject is None or (certificate is not None and entry.subject.matched_by(certificate)):
                return None
            reason = NO_CERTIFICATE if certificate is None else WRONG_CERTIFICATE
        return reason
