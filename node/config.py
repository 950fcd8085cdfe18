"""Node configuration: a TOML file, then ``MAMMONODE_*`` environment overrides, then defaults.

Deployments rely on the names in :data:`ENVIRONMENT` (issue 3's table); each setting has one
name in TOML (the field name) and one in the environment. The database URL may hold a password,
so it is never printed: :meth:`NodeConfig.describe` masks it and ``repr`` leaves it out.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from inference import SCREENING_VIEWS, MammoNodeError, parse_device

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash


class ConfigError(MammoNodeError):
    """The configuration file or an environment variable is invalid."""


class UnknownSopClasses(StrEnum):
    """What the SCP does with storage SOP classes it does not score (CT, US, ...)."""

    IGNORE = "ignore"
    """Accept them (Success), store nothing, audit."""
    REJECT = "reject"
    """Refuse their presentation contexts."""


class InferenceBackend(StrEnum):
    """The ``backend`` setting: a name :func:`inference.backends.loader.load_backend` knows."""

    AUTO = "auto"
    """ONNX Runtime when the model ships an ONNX export, else torch."""
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Role(StrEnum):
    """What one ``mammonode serve`` process does (``--role``); ``all`` is a whole node."""

    ALL = "all"
    """Receive, assemble, score and send in one process (the single-machine node)."""
    RECEIVER = "receiver"
    """The SCP, and assembly of complete studies into jobs."""
    WORKER = "worker"
    """Claims jobs under a lease and scores them (any number, on one or several machines)."""
    SENDER = "sender"
    """Delivers the outbox to the destinations."""


class Preprocessing(StrEnum):
    """Where images are decoded and prepared."""

    CPU = "cpu"
    """pydicom + OpenCV."""
    DALI = "dali"
    """DALI on ``device`` (its CPU mode without a GPU)."""


E = TypeVar("E", bound=StrEnum)


def parse_option(option: type[E], value: Any, what: str) -> E:
    """``value`` (a member or its word) as a member of ``option``; a one-line :class:`ConfigError`
    naming ``what`` and the allowed words otherwise."""
    try:
        return option(value)
    except ValueError:
        allowed = ", ".join(option)
        raise ConfigError(f"{what} must be one of {allowed}, not {value!r}") from None


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """An AE title as PS3.5 allows it (1-16 printable characters, no backslash), stripped."""
    text = str(value).strip()
    if not text or not AE_TITLE_RE.match(text):
        raise ConfigError(f"{what} {value!r} is not a valid AE title (1-16 printable characters)")
    return text


def validate_port(value: Any, what: str = "port") -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what} {port} is outside 1-65535")
    return port


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
        values: dict[str, Any] = {"url": url}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key.strip() in values:
                raise ConfigError(f"destination option {option!r} must be key=value, each key once")
            values[key.strip()] = value.strip()
        return cls.from_mapping(values)


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


@dataclass(frozen=True)
class Destination:
    """Where the results go: a DICOM peer (C-STORE SCP at ``ae_title``, ``host``, ``port``), or,
    when ``stow`` is set, a DICOMweb server (STOW-RS; ``host`` and ``port`` are its URL's and
    ``ae_title`` is empty). ``str()`` is the destination's identity in the outbox and the audit:
    ``AE@HOST:PORT`` or ``stow:URL`` (never a secret)."""

    ae_title: str
    host: str
    port: int
    stow: StowTarget | None = None

    @classmethod
    def web(cls, target: StowTarget) -> Destination:
        """The destination that STOW-RSes to ``target``."""
        parts = urlsplit(target.url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        return cls("", parts.hostname or "", port, target)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT`` or ``stow:URL[;key=value...]`` (the ``--to`` and
        ``MAMMONODE_DESTINATIONS`` forms; the keys are those of a DICOMweb table)."""
        stripped = text.strip()
        if stripped.lower().startswith(STOW_PREFIX):
            return cls.web(StowTarget.parse(stripped[len(STOW_PREFIX) :]))
        ae, sep, rest = stripped.partition("@")
        host, sep2, port = rest.rpartition(":")
        if not sep or not sep2 or not host:
            raise ConfigError(f"destination {text!r} must look like AE@HOST:PORT or stow:URL")
        ae_title = validate_ae_title(ae, "destination AE title")
        return cls(ae_title, host, validate_port(port, "destination port"))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Destination:
        """A ``[[destinations]]`` table: ``ae_title``, ``host``, ``port``, or ``url`` and its keys."""
        if "url" in data:
            return cls.web(StowTarget.from_mapping(data))
        missing = {"ae_title", "host", "port"} - set(data)
        if missing:
            raise ConfigError(f"[[destinations]] entry needs {', '.join(sorted(missing))} (or a url)")
        unknown = sorted(set(data) - {"ae_title", "host", "port"})
        if unknown:
            raise ConfigError(f"[[destinations]] entry: unknown key(s) {', '.join(unknown)}")
        return cls(
            validate_ae_title(data["ae_title"], "destination AE title"),
            str(data["host"]),
            validate_port(data["port"], "destination port"),
        )

    def __str__(self) -> str:
        if self.stow is not None:
            return f"{STOW_PREFIX}{self.stow.url}"
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: a calling AE title, and optionally the host it must come from."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        """``AE`` or ``AE@HOST``."""
        ae, _, host = text.strip().partition("@")
        return cls(validate_ae_title(ae, "allowed calling AE"), host.strip() or None)

    def admits(self, calling_ae: str, host: str) -> bool:
        return calling_ae.strip() == self.ae_title and (self.host is None or self.host == host)

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything `mammonode serve` and the admin commands need; defaults run a demo node."""

    ae_title: str = "MAMMONODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("mammonode-data")
    database_url: str = field(default="", repr=False)
    """Empty: SQLite (WAL) in ``data_dir/mammonode.sqlite``, created on first start."""
    study_quiet_seconds: float = 60.0
    grace_seconds: float = 5.0
    """Wait after the last expected view arrived, for stragglers of the same push."""
    expected_views: tuple[str, ...] = SCREENING_VIEWS
    allowed_aes: tuple[AllowedPeer, ...] = ()
    """Empty: every calling AE is accepted (a warning is logged at start)."""
    unknown_sop_classes: UnknownSopClasses = UnknownSopClasses.IGNORE
    """``ignore``: accept other storage SOP classes, store nothing and audit; ``reject``: refuse."""
    destinations: tuple[Destination, ...] = ()
    backend: InferenceBackend = InferenceBackend.AUTO
    """torch, onnxruntime, tensorrt, or auto: onnxruntime when the model ships ONNX, else torch."""
    model_dir: Path | None = None
    """None: the promoted model in the database, else the bundled demo model."""
    device: str = "cpu"
    """Where the backend runs: ``cpu``, or ``cuda`` / ``cuda:N`` (tensorrt needs a GPU)."""
    preprocessing: Preprocessing = Preprocessing.CPU
    """``cpu`` (pydicom + OpenCV) or ``dali`` (DALI on ``device``; CPU mode without a GPU)."""
    batch_size: int = 8
    cam_opacity_follows_probability: bool = False
    """Off: every CAM capture shows its map at the same opacity (its colour scale says what the
    colours mean); on: a low-probability image's map fades out."""
    write_presentation_states: bool = False
    """Also send a Grayscale Softcopy Presentation State per source image with the marks and the
    notice, for viewers that show neither CAD SR nor colour captures."""
    max_pdu: int = 1_048_576
    max_associations: int = 10
    """Associations served at once; one more is rejected (A-ASSOCIATE-RJ, transient)."""
    max_image_pixels: int = 50_000_000
    """Largest Rows x Columns accepted at receipt (a 4700 x 2900 mammogram is 14 million)."""
    retry_initial_seconds: float = 30.0
    retry_max_seconds: float = 1800.0
    retry_max_age_hours: float = 24.0
    """An outbox item still failing after this long goes to the dead-letter state."""
    poll_seconds: float = 1.0
    role: Role = Role.ALL
    """What ``mammonode serve`` runs: all, receiver, worker or sender (``--role`` overrides)."""
    lease_seconds: float = 60.0
    """A worker's claim on a job expires this long after its last heartbeat; another worker then
    takes the job over. The heartbeat renews it every third of this."""
    tls_certificate: Path | None = None
    """PEM certificate (chain) the node presents: the SCP speaks DICOM TLS when this and
    ``tls_private_key`` are set, and TLS destinations get it as the client certificate."""
    tls_private_key: Path | None = None
    """PEM private key of ``tls_certificate`` (keep it 0600; set it from the environment)."""
    tls_ca_certificates: Path | None = None
    """PEM bundle of the CAs whose certificates the node trusts: calling modalities' client
    certificates and TLS destinations' server certificates."""
    tls_require_client_certificate: bool = False
    """Refuse a TLS connection whose client has no certificate signed by ``tls_ca_certificates``."""
    metrics_port: int = 0
    """HTTP port of ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``; 0: no endpoint."""
    metrics_bind_address: str = "127.0.0.1"
    ready_max_backlog: int = 1000
    """``/readyz`` fails while more jobs than this wait to be scored."""

    def __post_init__(self) -> None:
        validate_ae_title(self.ae_title)
        validate_port(self.port)
        if self.study_quiet_seconds <= 0 or self.grace_seconds < 0:
            raise ConfigError("study_quiet_seconds must be > 0 and grace_seconds >= 0")
        for name, option in _OPTIONS.items():  # the words are accepted too: NodeConfig(backend="torch")
            object.__setattr__(self, name, parse_option(option, getattr(self, name), name))
        try:
            parse_device(self.device)
        except ValueError:
            raise ConfigError(f"device must be cpu, cuda or cuda:N, not {self.device!r}") from None
        if self.batch_size < 1 or self.max_pdu < 0:
            raise ConfigError("batch_size must be >= 1 and max_pdu >= 0")
        if self.max_associations < 1 or self.max_image_pixels < 1:
            raise ConfigError("max_associations and max_image_pixels must be >= 1")
        if not 0 < self.retry_initial_seconds <= self.retry_max_seconds or self.retry_max_age_hours <= 0:
            raise ConfigError("need 0 < retry_initial_seconds <= retry_max_seconds, retry_max_age_hours > 0")
        if self.lease_seconds <= 0 or self.ready_max_backlog < 1:
            raise ConfigError("lease_seconds must be > 0 and ready_max_backlog >= 1")
        if self.metrics_port:
            validate_port(self.metrics_port, "metrics_port")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ConfigError("tls_certificate and tls_private_key go together")
        if self.tls_require_client_certificate and self.tls_ca_certificates is None:
            raise ConfigError("tls_require_client_certificate needs tls_ca_certificates")
        for view in self.expected_views:
            side, _, position = view.partition("-")
            if side not in ("L", "R") or not position:
                raise ConfigError(f"expected view {view!r} must look like L-CC or R-MLO")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def resolved_database_url(self) -> str:
        """The URL to connect to: the configured one, or the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mammonode.sqlite').resolve()}"

    def describe(self) -> dict[str, Any]:
        """The settings as a plain dict for display, with the database URL's password masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url":
                value = mask_url(self.resolved_database_url)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            elif isinstance(value, (Path, StrEnum)):
                value = str(value)
            out[f.name] = value
        return out


_OPTIONS: dict[str, type[StrEnum]] = {
    "unknown_sop_classes": UnknownSopClasses,
    "backend": InferenceBackend,
    "preprocessing": Preprocessing,
    "role": Role,
}
"""Settings that take one of a fixed set of words, and the enum of those words."""


def mask_url(url: str) -> str:
    """``scheme://user:***@host/db``: the database URL without its password."""
    return re.sub(r"(?<=://)([^:/@]+):[^@]*@", r"\1:***@", url)


# Environment names deployments rely on; every other field is MAMMONODE_<FIELD NAME IN CAPITALS>.
ENVIRONMENT: dict[str, str] = {
    "ae_title": "MAMMONODE_AE_TITLE",
    "port": "MAMMONODE_PORT",
    "data_dir": "MAMMONODE_DATA_DIR",
    "database_url": "MAMMONODE_DATABASE_URL",
    "study_quiet_seconds": "MAMMONODE_STUDY_QUIET_SECONDS",
    "allowed_aes": "MAMMONODE_ALLOWED_AES",
    "destinations": "MAMMONODE_DESTINATIONS",
}


def _env_name(name: str) -> str:
    return ENVIRONMENT.get(name, f"MAMMONODE_{name.upper()}")


def _coerce(name: str, value: Any, *, from_env: bool) -> Any:
    """Turn a TOML value or an environment string into the field's type; errors name the
    environment variable when the value came from there (``MAMMONODE_PORT must be ...``)."""
    what = _env_name(name) if from_env else name
    if name in _OPTIONS:
        return parse_option(_OPTIONS[name], value, what)
    try:
        if name in (
            "port",
            "batch_size",
            "max_pdu",
            "max_associations",
            "max_image_pixels",
            "metrics_port",
            "ready_max_backlog",
        ):
            return int(value)
        if name in (
            "study_quiet_seconds",
            "grace_seconds",
            "retry_initial_seconds",
            "retry_max_seconds",
            "retry_max_age_hours",
            "poll_seconds",
            "lease_seconds",
        ):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if name in BOOLEAN_SETTINGS:
        return _boolean(value, what)
    if name == "model_dir":
        return Path(str(value)).expanduser() if str(value) else None
    if name in PATH_SETTINGS:
        return Path(str(value)).expanduser() if str(value) else None
    if name == "data_dir":
        return Path(str(value) or ".").expanduser()
    if name == "allowed_aes":
        items = _split(value) if from_env or isinstance(value, str) else [str(v) for v in value]
        return tuple(AllowedPeer.parse(v) for v in items)
    if name == "expected_views":
        items = _split(value) if from_env or isinstance(value, str) else [str(v) for v in value]
        return tuple(v.upper() for v in items)
    if name == "destinations":
        return _destinations(value, what, from_env=from_env)
    return str(value)


def _destinations(value: Any, what: str, *, from_env: bool) -> tuple[Destination, ...]:
    """``AE@HOST:PORT`` / ``stow:URL`` texts (comma-separated) or ``[[destinations]]`` tables;
    a bad one is a one-line ConfigError naming the setting."""
    try:
        if from_env or isinstance(value, str):
            return tuple(Destination.parse(v) for v in _split(value))
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError("must be [[destinations]] tables with ae_title, host, port or a url")
        return tuple(Destination.from_mapping(v) for v in value)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


BOOLEAN_SETTINGS = (
    "cam_opacity_follows_probability",
    "write_presentation_states",
    "tls_require_client_certificate",
)
PATH_SETTINGS = ("tls_certificate", "tls_private_key", "tls_ca_certificates")


def _boolean(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def _split(value: Any) -> list[str]:
    return [part.strip() for part in str(value).split(",") if part.strip()]


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Defaults, overridden by the TOML file ``path`` (if given), overridden by ``MAMMONODE_*``."""
    env = os.environ if environ is None else environ
    names = {f.name for f in fields(NodeConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
        values.update({k: _coerce(k, v, from_env=False) for k, v in data.items()})
    for name in names:
        raw = env.get(_env_name(name))
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw, from_env=True)
    try:
        return replace(NodeConfig(), **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
