"""A throwaway PKI for the DICOM TLS tests, made with ``cryptography``: a CA, the node's and the
PACS's certificates (both server and client: the node presents its certificate to destinations,
Orthanc its own when it sends to the node), two modality certificates, and a modality certificate
with the same subject from a rogue CA. RSA 2048 keys (dcmtk's default TLS profile has ECDHE-RSA
suites), unencrypted PEM files; server certificates name ``localhost`` and ``127.0.0.1``."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODALITY_SUBJECT = "CN=mammo1.example/O=Radiology"
"""The subject of the modality's certificate (and of the rogue one), as allowed_aes binds it."""
OTHER_MODALITY_SUBJECT = "CN=mammo2.example/O=Radiology"


@dataclass(frozen=True)
class Identity:
    """A PEM certificate and its PEM key."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class ThrowawayPKI:
    ca: Path
    """The CA certificate every identity but ``rogue`` chains to."""
    node: Identity
    pacs: Identity
    modality: Identity
    other_modality: Identity
    rogue: Identity
    """Subject of ``modality``, signed by another CA."""
    rogue_ca: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(subject: str) -> x509.Name:
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    return x509.Name(
        [x509.NameAttribute(oids[k], v) for k, _, v in (part.partition("=") for part in subject.split("/"))]
    )


def _write(folder: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Identity:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return Identity(cert_path, key_path)


def _builder(subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
    )


def make_ca(folder: Path, name: str) -> tuple[Identity, x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    subject = _name(f"CN={name}/O=MammoNode tests")
    cert = (
        _builder(subject, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, name.lower().replace(" ", "-"), cert, key), cert, key


def issue(
    folder: Path,
    name: str,
    subject: str,
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey],
    *,
    server: bool,
) -> Identity:
    """A leaf certificate for ``subject`` (``CN=x/O=y``): client-only, or server and client with
    SAN DNS localhost and IP 127.0.0.1."""
    ca_cert, ca_key = ca
    key = _key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (
        _builder(_name(subject), ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(folder, name, builder.sign(ca_key, hashes.SHA256()), key)


def make_pki(folder: Path) -> ThrowawayPKI:
    ca, ca_cert, ca_key = make_ca(folder, "Test CA")
    rogue_ca, rogue_cert, rogue_key = make_ca(folder, "Rogue CA")
    signer = (ca_cert, ca_key)
    return ThrowawayPKI(
        ca=ca.certificate,
        node=issue(folder, "node", "CN=localhost/O=MammoNode", signer, server=True),
        pacs=issue(folder, "pacs", "CN=pacs.example/O=Radiology", signer, server=True),
        modality=issue(folder, "modality", MODALITY_SUBJECT, signer, server=False),
        other_modality=issue(folder, "other-modality", OTHER_MODALITY_SUBJECT, signer, server=False),
        rogue=issue(folder, "rogue", MODALITY_SUBJECT, (rogue_cert, rogue_key), server=False),
        rogue_ca=rogue_ca.certificate,
    )
