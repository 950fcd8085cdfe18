"""The model manifest (``model.json``): everything a result must say about the model that made it.

A model directory holds the weights (``model.safetensors``), optionally an ONNX export and
TensorRT engines, and this manifest. The manifest pins the SHA-256 of every artefact, the
preprocessing (shared with training, design invariant 4), the operating threshold and the
aggregation, so each score row and output object is traceable (design invariant 5).

Torch-free on purpose: a serving install without torch reads manifests too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.aggregation import AGGREGATIONS
from inference.jsonsafe import dumps
from inference.types import RESEARCH_NOTICE, AlgorithmInfo, InputError, PreprocessConfig

logger = logging.getLogger(__name__)

MANIFEST_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"

ARCHITECTURES: tuple[str, ...] = (
    *(f"efficientnet_b{i}" for i in range(8)),
    "resnet50",
    "wide_resnet50_2",
    "cancernet",
)
"""Backbones :func:`inference.model.build_model` can build (timm names, plus seed 002's CancerNet).
Listed here, torch-free, so manifests can be validated without torch."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


@dataclass(frozen=True)
class ModelManifest:
    """Contents of ``model.json``. ``metrics`` is ``{level: {metric: value}, "measured_on": str}``."""

    name: str
    version: str
    architecture: str
    in_chans: int = 1
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    threshold: float = 0.5  # operating threshold on the probability (breast/exam level)
    aggregation: str = "pagg"
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""  # filled in by inference.model_io.save_model
    onnx_file: str | None = None
    onnx_sha256: str | None = None
    engines: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    synthetic_training_data: bool = False
    created: str = field(default_factory=_today)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        """Build from parsed JSON; raises :class:`InputError` on missing or ill-typed fields.

        Unknown keys are ignored with a warning so a newer manifest still loads in an older node.
        """
        if not isinstance(data, dict):
            raise InputError("manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown manifest keys: %s", ", ".join(unknown))
        missing = [k for k in ("name", "version", "architecture") if k not in data]
        if missing:
            raise InputError(f"manifest lacks required keys: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        preprocess = kwargs.get("preprocess", {})
        if not isinstance(preprocess, dict):
            raise InputError("manifest 'preprocess' must be an object")
        try:
            kwargs["preprocess"] = PreprocessConfig.from_dict(preprocess)
        except TypeError as exc:
            raise InputError(f"manifest 'preprocess' is invalid: {exc}") from exc
        return cls(**kwargs)


def _check_file_name(value: object, key: str) -> None:
    """Artefact names are joined to the model directory: plain names only, never paths."""
    if not isinstance(value, str) or not value or value in (".", "..") or Path(value).name != value:
        raise InputError(f"manifest {key!r} must be a plain file name, got {value!r}")
    if "\\" in value or "/" in value:
        raise InputError(f"manifest {key!r} must be a plain file name, got {value!r}")


def _check_sha(value: object, key: str, *, allow_empty: bool) -> None:
    if allow_empty and value == "":
        return
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise InputError(f"manifest {key!r} must be a lowercase hex SHA-256, got {value!r}")


def _validate(m: ModelManifest) -> None:
    for key in ("name", "version", "architecture", "aggregation", "created"):
        value = getattr(m, key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"manifest {key!r} must be a non-empty string")
    if m.architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise InputError(f"manifest architecture {m.architecture!r} unknown; known: {known}")
    if isinstance(m.in_chans, bool) or not isinstance(m.in_chans, int) or m.in_chans < 1:
        raise InputError(f"manifest 'in_chans' must be a positive integer, got {m.in_chans!r}")
    if (
        isinstance(m.threshold, bool)
        or not isinstance(m.threshold, int | float)
        or not math.isfinite(m.threshold)
        or not 0.0 <= m.threshold <= 1.0
    ):
        raise InputError(f"manifest 'threshold' must be a probability in [0, 1], got {m.threshold!r}")
    if m.aggregation not in AGGREGATIONS:
        raise InputError(f"manifest aggregation {m.aggregation!r} unknown; known: {', '.join(AGGREGATIONS)}")
    _check_file_name(m.weights_file, "weights_file")
    _check_sha(m.weights_sha256, "weights_sha256", allow_empty=True)
    if (m.onnx_file is None) != (m.onnx_sha256 is None):
        raise InputError("manifest 'onnx_file' and 'onnx_sha256' must be given together")
    if m.onnx_file is not None:
        _check_file_name(m.onnx_file, "onnx_file")
        _check_sha(m.onnx_sha256, "onnx_sha256", allow_empty=False)
    for key in ("engines", "training_data", "metrics"):
        if not isinstance(getattr(m, key), dict):
            raise InputError(f"manifest {key!r} must be an object")
    if not isinstance(m.synthetic_training_data, bool):
        raise InputError("manifest 'synthetic_training_data' must be true or false")
    try:
        datetime.fromisoformat(m.created)
    except ValueError as exc:
        raise InputError(f"manifest 'created' is not an ISO date: {m.created!r}") from exc


def load_manifest(model_dir: Path) -> ModelManifest:
    """Read and validate ``model_dir/model.json``; :class:`InputError` if missing or invalid."""
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"no model manifest at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read model manifest {path}: {exc}") from exc
    try:
        return ModelManifest.from_dict(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


def save_manifest(manifest: ModelManifest, model_dir: Path) -> Path:
    """Write ``model_dir/model.json`` atomically (temp file + rename), so a reader never sees half."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MANIFEST_FILE
    atomic_write_bytes(path, (dumps(manifest.to_dict()) + "\n").encode("utf-8"))
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write via a synced temp file and a rename, so a reader never sees half a file.

    ``mode`` replaces the temp file's private 0600: model artefacts must be readable by the
    service account that serves them; patient data (spool, outbox) passes 0o600 (or 0o640).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks so multi-GB engines do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(path: Path, sha256: str | None, *, what: str) -> bytes:
    """The bytes of an artefact (ONNX graph, engine) after checking them against the manifest.

    The very bytes that were hashed are the ones the caller deserialises, so no window is left in
    which the file could be swapped between check and use. Raises :class:`InputError` if the
    manifest has no hash, the file is unreadable, or the hashes differ (a tampered or stale file).
    """
    if not sha256:
        raise InputError(f"manifest has no SHA-256 for the {what} {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise InputError(
            f"the {what} {path} has SHA-256 {actual}, the manifest says {sha256}: "
            "the file was modified or belongs to other weights; export it again"
        )
    return data


def verify_weights(model_dir: Path, manifest: ModelManifest) -> Path:
    """Check the weights file against the manifest's SHA-256; returns its path.

    Raises :class:`InputError` if the file is missing, the manifest has no hash, or they differ.
    """
    path = model_dir / manifest.weights_file
    if not manifest.weights_sha256:
        raise InputError(f"manifest in {model_dir} has no weights_sha256")
    if not path.is_file():
        raise InputError(f"weights file missing: {path}")
    actual = file_sha256(path)
    if actual != manifest.weights_sha256:
        raise InputError(f"weights {path} have SHA-256 {actual}, manifest says {manifest.weights_sha256}")
    return path


def algorithm_info(manifest: ModelManifest) -> AlgorithmInfo:
    """What every output object states about the model (design invariant 5)."""
    return AlgorithmInfo(
        name=manifest.name,
        version=manifest.version,
        weights_sha256=manifest.weights_sha256,
        threshold=float(manifest.threshold),
        notice=RESEARCH_NOTICE if manifest.synthetic_training_data else None,
    )
