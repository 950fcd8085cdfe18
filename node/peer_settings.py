"""How the config names the node's peers: where results go (``destinations``: DICOM, DICOM TLS or
DICOMweb) and who may send (``allowed_aes``: calling AE titles, each optionally bound to a host
and to the subject of a DICOM TLS client certificate).

Every form has a TOML table and a one-line text (``MAMMONODE_DESTINATIONS``, ``--to``,
``MAMMONODE_ALLOWED_AES``); a bad one is a one-line :class:`ConfigError`. A destination's text
(``str()``) is its identity in the outbox and the audit, so it is stable and never holds a secret.
:mod:`node.config` re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from node.config_values import (
    ConfigError,
    mask_url,
    parse_boolean,
    parse_option,
    split_list,
    validate_ae_title,
    validate_port,
)


class StowAuth(StrEnum):
    """How the node authenticates to a DICOMweb destination; the secret is read at send time from
    the environment variable the destination's ``auth_env`` names, never from the config."""

    BASIC = "basic"
    """HTTP basic authentication: the variable holds ``USER:PASSWORD``."""
    BEARER = "bearer"
    """``Authorization: Bearer TOKEN``: the variable holds the token."""


STOW_PREFIX = "stow:"
"""How a DICOMweb destination is written in ``MAMMONODE_DESTINATIONS``, ``--to`` and the outbox."""
STOW_KEYS = ("url", "auth", "auth_env", "timeout_seconds")
STOW_TIMEOUT_SECONDS = 60.0
DESTINATION_MAX_CHARS = 300
"""A destination's text is stored in each of its outbox rows (``transmissions.destination``)."""
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class StowTarget:
    """A DICOMweb origin server that receives the results by STOW-RS (``POST {url}/studies``)."""

    url: str
    """Base URL of the DICOMweb service, e.g. ``http://pacs:8042/dicom-web``: http or https,
    without credentials, query or trailing slash."""
    auth: StowAuth | None = None
    auth_env: str = ""
    """Name of the environment variable holding the secret (``auth`` says what it holds)."""
    timeout_seconds: float = STOW_TIMEOUT_SECONDS
    """Connect and read timeout of each request."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StowTarget:
        """The keys of a DICOMweb ``[[destinations]]`` table (or of the ``stow:`` text form)."""
        unknown = sorted(set(data) - set(STOW_KEYS))
        if unknown:
            raise ConfigError(
                f"DICOMweb destination: unknown key(s) {', '.join(unknown)} ({', '.join(STOW_KEYS)})"
            )
        auth = parse_option(StowAuth, data["auth"], "destination auth") if "auth" in data else None
        auth_env = str(data.get("auth_env", "")).strip()
        if (auth is None) != (not auth_env):
            raise ConfigError(
                "DICOMweb destination: auth and auth_env go together (basic|bearer, a variable name)"
            )
        if auth_env and not _ENV_NAME_RE.match(auth_env):
            raise ConfigError(f"destination auth_env {auth_env!r} is not an environment variable name")
        try:
            timeout = float(data.get("timeout_seconds", STOW_TIMEOUT_SECONDS))
        except (TypeError, ValueError):
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ConfigError(
                f"destination timeout_seconds must be a number > 0, got {data['timeout_seconds']!r}"
            )
        return cls(_stow_url(data["url"]), auth, auth_env, timeout)

    @classmethod
    def parse(cls, text: str) -> StowTarget:
        """``URL[;key=value...]``: the URL, then any other table key (``;auth=bearer;auth_env=X``)."""
        url, *options = text.strip().split(";")
        return cls.from_mapping({"url": url, **_options(options, flags=())})


def _options(options: Iterable[str], flags: Iterable[str]) -> dict[str, Any]:
    """The ``;key=value`` options of a destination's text; a word in ``flags`` may stand alone
    (``;tls`` is ``;tls=true``)."""
    values: dict[str, Any] = {}
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if (not sep and key not in flags) or not key or key in values:
            raise ConfigError(f"destination option {option!r} must be key=value, each key once")
        values[key] = value if sep else True
    return values


def _stow_url(value: Any) -> str:
    """A DICOMweb base URL as the node stores it (scheme and host in lower case, no trailing
    slash), or a one-line ConfigError (which masks a password written into the URL)."""
    url = str(value).strip().rstrip("/")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or outside 0-65535
        port = -1
    problem = ""
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        problem = "must be an http:// or https:// URL with a host"
    elif port is not None and not 0 < port < 65536:
        problem = "has an invalid port"
    elif "[" in parts.netloc:  # dicomweb-client cannot parse an IPv6 literal
        problem = "must name its host, not an IPv6 address"
    elif parts.username is not None or parts.password is not None:
        problem = "must not hold credentials (use auth and auth_env)"
    elif parts.query or parts.fragment or any(c in url for c in " ,;"):
        problem = "must have no query, fragment, space, comma or semicolon"
    elif len(STOW_PREFIX + url) > DESTINATION_MAX_CHARS:
        problem = f"is longer than {DESTINATION_MAX_CHARS - len(STOW_PREFIX)} characters"
    if problem:
        raise ConfigError(f"destination url {mask_url(str(value))!r} {problem}")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))


TLS_KEYS = ("tls", "tls_ca_certificates", "tls_server_name", "tls_check_hostname")
"""A DICOM destination's TLS keys, in its ``[[destinations]]`` table and its ``;key=value`` text."""
_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


@dataclass(frozen=True)
class DestinationTLS:
    """DICOM TLS to one destination (``tls = true``): the node checks the destination's server
    certificate and presents its own ``tls_certificate`` as client certificate, if it has one."""

    ca_certificates: Path | None = None
    """``tls_ca_certificates``: PEM CAs that sign the destination's certificate; None: the node's
    ``tls_ca_certificates``, else the system's trust store."""
    server_name: str | None = None
    """``tls_server_name``: the name its certificate must carry (and the SNI); None: its host."""
    check_hostname: bool = True
    """``tls_check_hostname = false`` accepts any name in a certificate the CAs signed (PACS
    certificates without the right subjectAltName are common; the CA check stays on)."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DestinationTLS | None:
        """The TLS keys of a DICOM destination; None when ``tls`` is off (other TLS keys then are
        an error: a destination that was meant to be encrypted must not silently go in clear)."""
        enabled = parse_boolean(data.get("tls", False), "destination tls")
        others = [key for key in TLS_KEYS[1:] if key in data]
        if not enabled:
            if others:
                raise ConfigError(f"destination {', '.join(others)} need(s) tls = true")
            return None
        ca = str(data.get("tls_ca_certificates", "") or "").strip()
        server_name = str(data.get("tls_server_name", "") or "").strip()
        if server_name and not _HOST_NAME_RE.match(server_name):
            raise ConfigError(f"destination tls_server_name {server_name!r} is not a host name")
        check = parse_boolean(data.get("tls_check_hostname", True), "destination tls_check_hostname")
        return cls(Path(ca).expanduser() if ca else None, server_name or None, check)


@dataclass(frozen=True)
class Destination:
    """Where the results go: a DICOM peer (C-STORE SCP at ``ae_title``, ``host``, ``port``, over
    DICOM TLS when ``tls`` is set), or, when ``stow`` is set, a DICOMweb server (STOW-RS; ``host``
    and ``port`` are its URL's and ``ae_title`` is empty). ``str()`` is the destination's identity
    in the outbox and the audit: ``AE@HOST:PORT``, ``AE@HOST:PORT;tls`` or ``stow:URL`` (never a
    secret; the CA file and server name are looked up in the config by it)."""

    ae_title: str
    host: str
    port: int
    stow: StowTarget | None = None
    tls: DestinationTLS | None = None

    @classmethod
    def web(cls, target: StowTarget) -> Destination:
        """The destination that STOW-RSes to ``target``."""
        parts = urlsplit(target.url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        return cls("", parts.hostname or "", port, target)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT[;tls[;key=value...]]`` or ``stow:URL[;key=value...]`` (the ``--to`` and
        ``MAMMONODE_DESTINATIONS`` forms; the keys are those of the ``[[destinations]]`` table,
        e.g. ``PACS@pacs:2762;tls;tls_server_name=pacs.example``)."""
        stripped = text.strip()
        if stripped.lower().startswith(STOW_PREFIX):
            return cls.web(StowTarget.parse(stripped[len(STOW_PREFIX) :]))
        address, *options = stripped.split(";")
        ae, sep, rest = address.strip().partition("@")
        host, sep2, port = rest.rpartition(":")
        if not sep or not sep2 or not host.strip():
            raise ConfigError(
                f"destination {text!r} must look like AE@HOST:PORT or stow:URL (TLS: AE@HOST:PORT;tls)"
            )
        values = _options(options, flags=("tls",))
        unknown = sorted(set(values) - set(TLS_KEYS))
        if unknown:
            raise ConfigError(
                f"DICOM destination: unknown option(s) {', '.join(unknown)} ({', '.join(TLS_KEYS)})"
            )
        return cls(
            validate_ae_title(ae, "destination AE title"),
            host.strip(),
            validate_port(port, "destination port"),
            tls=DestinationTLS.from_mapping(values),
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Destination:
        """A ``[[destinations]]`` table: ``ae_title``, ``host``, ``port`` and the TLS keys, or
        ``url`` and its keys."""
        if "url" in data:
            return cls.web(StowTarget.from_mapping(data))
        missing = {"ae_title", "host", "port"} - set(data)
        if missing:
            raise ConfigError(f"[[destinations]] entry needs {', '.join(sorted(missing))} (or a url)")
        unknown = sorted(set(data) - {"ae_title", "host", "port", *TLS_KEYS})
        if unknown:
            raise ConfigError(f"[[destinations]] entry: unknown key(s) {', '.join(unknown)}")
        return cls(
            validate_ae_title(data["ae_title"], "destination AE title"),
            str(data["host"]),
            validate_port(data["port"], "destination port"),
            tls=DestinationTLS.from_mapping(data),
        )

    @property
    def address(self) -> str:
        """``AE@HOST:PORT`` of a DICOM destination, with or without TLS."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.stow is not None:
            return f"{STOW_PREFIX}{self.stow.url}"
        return f"{self.address};tls" if self.tls is not None else self.address


def parse_destinations(value: Any, what: str, *, from_env: bool) -> tuple[Destination, ...]:
    """``destinations``: texts (comma-separated) or ``[[destinations]]`` tables; a bad one is a
    one-line ConfigError naming the setting (``what``)."""
    try:
        if from_env or isinstance(value, str):
            return tuple(Destination.parse(v) for v in split_list(value))
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError("must be [[destinations]] tables with ae_title, host, port or a url")
        return tuple(Destination.from_mapping(v) for v in value)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


# -- the allow-list ---------------------------------------------------------------------------

SUBJECT_ATTRIBUTES: dict[str, str] = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "ST": "stateOrProvinceName",
    "L": "localityName",
    "DC": "domainComponent",
    "UID": "userId",
    "serialNumber": "serialNumber",
    "emailAddress": "emailAddress",
}
"""Subject attributes a binding may name: the short name (as in ``openssl req -subj``) and the
long name Python's ``SSLSocket.getpeercert()`` reports."""
_ATTRIBUTE_BY_NAME = {
    name.lower(): short for short, long in SUBJECT_ATTRIBUTES.items() for name in (short, long)
}


@dataclass(frozen=True)
class CertificateSubject:
    """The subject attributes a calling AE's client certificate must carry, written
    ``CN=mammo1.example/O=Radiology`` (OpenSSL's ``-subj`` form; the leading ``/`` is optional).

    A certificate matches when every listed attribute is in its subject with exactly that value;
    attributes not listed are not checked, so name enough to identify the device (the CN alone
    suffices with a CA that gives each device its own CN). Only certificates whose chain the node
    verified against ``tls_ca_certificates`` are compared.
    """

    attributes: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> CertificateSubject:
        parts = str(text).strip().removeprefix("/").split("/")
        attributes: list[tuple[str, str]] = []
        for part in parts:
            name, sep, value = (p.strip() for p in part.partition("="))
            short = _ATTRIBUTE_BY_NAME.get(name.lower())
            if not sep or not value or any(ord(c) < 32 for c in value):
                raise ConfigError(f"certificate subject {text!r} must look like CN=name/O=organisation")
            if short is None:
                known = ", ".join(SUBJECT_ATTRIBUTES)
                raise ConfigError(f"certificate subject attribute {name!r} is not one of {known}")
            attributes.append((short, value))
        return cls(tuple(attributes))

    def matched_by(self, subject: Iterable[tuple[str, str]]) -> bool:
        """Whether a certificate subject (short name, value pairs) carries every attribute."""
        present = set(subject)
        return all(pair in present for pair in self.attributes)

    def __str__(self) -> str:
        return "/".join(f"{name}={value}" for name, value in self.attributes)


def subject_attributes(subject: Iterable[Iterable[tuple[str, str]]]) -> tuple[tuple[str, str], ...]:
    """The (short name, value) pairs of a subject as ``getpeercert()['subject']`` gives it (a
    tuple of RDNs, each a tuple of (long name, value)); attributes a binding cannot name are left
    out."""
    pairs: list[tuple[str, str]] = []
    for rdn in subject:
        for name, value in rdn:
            short = _ATTRIBUTE_BY_NAME.get(str(name).lower())
            if short is not None:
                pairs.append((short, str(value)))
    return tuple(pairs)


ALLOWED_KEYS = ("ae_title", "host", "certificate_subject")


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: a calling AE title, optionally bound to the host it must come from
    and to the subject of the client certificate it must present (DICOM TLS).

    Text forms (``MAMMONODE_ALLOWED_AES``, a TOML string list): ``AE``, ``AE@HOST``,
    ``AE#SUBJECT``, ``AE@HOST#SUBJECT``, e.g. ``MG1@10.1.2.3#CN=mg1.radiology.example``; a TOML
    table (``[[allowed_aes]]``) has the keys ``ae_title``, ``host`` and ``certificate_subject``.
    An AE title may appear in several entries; one matching entry admits the association.
    """

    ae_title: str
    host: str | None = None
    certificate_subject: CertificateSubject | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        """``AE[@HOST][#SUBJECT]``."""
        entry, sep, subject = text.strip().partition("#")
        ae, _, host = entry.partition("@")
        if sep and not subject.strip():
            raise ConfigError(f"allowed calling AE {text!r}: a certificate subject must follow #")
        return cls.from_mapping({"ae_title": ae, "host": host, "certificate_subject": subject})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AllowedPeer:
        """An ``[[allowed_aes]]`` table."""
        unknown = sorted(set(data) - set(ALLOWED_KEYS))
        if unknown or "ae_title" not in data:
            raise ConfigError(f"[[allowed_aes]] entry takes {', '.join(ALLOWED_KEYS)} (ae_title required)")
        host = str(data.get("host", "") or "").strip()
        if host and not _HOST_NAME_RE.match(host):
            raise ConfigError(f"allowed calling AE host {host!r} is not a host name or address")
        subject = str(data.get("certificate_subject", "") or "").strip()
        return cls(
            validate_ae_title(data["ae_title"], "allowed calling AE"),
            host or None,
            CertificateSubject.parse(subject) if subject else None,
        )

    def __str__(self) -> str:
        text = self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"
        return text if self.certificate_subject is None else f"{text}#{self.certificate_subject}"


def parse_allowed_aes(value: Any, what: str, *, from_env: bool) -> tuple[AllowedPeer, ...]:
    """``allowed_aes``: texts (comma-separated, or a TOML list) or ``[[allowed_aes]]`` tables; a
    bad one is a one-line ConfigError naming the setting (``what``)."""
    try:
        if from_env or isinstance(value, str):
            return tuple(AllowedPeer.parse(v) for v in split_list(value))
        if not isinstance(value, list):
            raise ConfigError("must be a list of AE titles or [[allowed_aes]] tables")
        return tuple(
            AllowedPeer.from_mapping(v) if isinstance(v, Mapping) else AllowedPeer.parse(str(v))
            for v in value
        )
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
