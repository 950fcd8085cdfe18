"""Node configuration: a TOML file, then ``MAMMONODE_*`` environment overrides, then defaults.

Deployments rely on the names in :data:`ENVIRONMENT` (issue 3's table); each setting has one
name in TOML (the field name) and one in the environment. The database URL may hold a password,
so it is never printed: :meth:`NodeConfig.describe` masks it and ``repr`` leaves it out.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from inference import SCREENING_VIEWS, parse_device
from node.config_values import (
    ConfigError,
    mask_url,
    parse_boolean,
    parse_option,
    split_list,
    validate_ae_title,
    validate_port,
)
from node.peer_settings import (
    DESTINATION_MAX_CHARS,
    STOW_KEYS,
    STOW_PREFIX,
    STOW_TIMEOUT_SECONDS,
    AllowedPeer,
    CertificateSubject,
    Destination,
    DestinationTLS,
    StowAuth,
    StowTarget,
    parse_allowed_aes,
    parse_destinations,
)

__all__ = [  # the shared value checks and the peer settings are taken from here
    "DESTINATION_MAX_CHARS",
    "ENVIRONMENT",
    "STOW_KEYS",
    "STOW_PREFIX",
    "STOW_TIMEOUT_SECONDS",
    "AllowedPeer",
    "CertificateSubject",
    "ConfigError",
    "Destination",
    "DestinationTLS",
    "InferenceBackend",
    "NodeConfig",
    "Preprocessing",
    "Role",
    "StowAuth",
    "StowTarget",
    "UnknownSopClasses",
    "load_config",
    "mask_url",
    "parse_option",
    "validate_ae_title",
    "validate_port",
]


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
        return parse_boolean(value, what)
    if name == "model_dir":
        return Path(str(value)).expanduser() if str(value) else None
    if name in PATH_SETTINGS:
        return Path(str(value)).expanduser() if str(value) else None
    if name == "data_dir":
        return Path(str(value) or ".").expanduser()
    if name == "allowed_aes":
        return parse_allowed_aes(value, what, from_env=from_env)
    if name == "expected_views":
        items = split_list(value) if from_env or isinstance(value, str) else [str(v) for v in value]
        return tuple(v.upper() for v in items)
    if name == "destinations":
        return parse_destinations(value, what, from_env=from_env)
    return str(value)


BOOLEAN_SETTINGS = (
    "cam_opacity_follows_probability",
    "write_presentation_states",
    "tls_require_client_certificate",
)
PATH_SETTINGS = ("tls_certificate", "tls_private_key", "tls_ca_certificates")


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
