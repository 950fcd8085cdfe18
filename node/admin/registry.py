"""The models the node knows (``model_versions``), which one serves, and the pipeline that serves it.

A model is registered from its folder after its weights are checked against the manifest's
SHA-256; promotion makes exactly one row active, on an explicit command only, and is audited
with the old and new version. The worker (:func:`select_model_dir`) serves ``config.model_dir``
if set (an operator pinned one), else the active row's folder, else the bundled demo model.
Every model that scores is registered by the SHA-256 of its weights, so each score and output
object can name it (design invariant 5); registration never promotes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from inference import (
    BUNDLED_MODEL_DIR,
    InputError,
    MammoNodeError,
    ModelManifest,
    Pipeline,
    bundled_model_dir,
    load_manifest,
    resolve_model_dir,
    verify_weights,
)
from node import audit
from node.config import NodeConfig
from node.db.models import ModelVersion, utcnow

log = logging.getLogger(__name__)

PipelineFactory = Callable[[Path], Pipeline]
"""Builds the scoring pipeline for a model folder (the worker calls it again when the model changes)."""

BUNDLED_NAMES = ("bundled", "demo")
_SHA_PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")


class ModelRegistryError(MammoNodeError):
    """A model reference names nothing, several things, or a folder that is not a valid model."""


@dataclass(frozen=True)
class ModelListing:
    """One line of `mammonode model list`."""

    id: int | None
    """None for the bundled demo model while it is not registered."""
    name: str
    version: str
    weights_sha256: str
    path: str
    active: bool
    bundled: bool
    registered_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def active_model_version(session: Session) -> ModelVersion | None:
    """The promoted model, if any has been promoted."""
    return session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)).order_by(ModelVersion.id))


def _describe(row: ModelVersion | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "model_version_id": row.id,
        "name": row.name,
        "version": row.version,
        "weights_sha256": row.weights_sha256,
        "path": row.path,
    }


def _bundled_manifest() -> ModelManifest | None:
    try:
        return load_manifest(bundled_model_dir())
    except InputError:
        return None


def _is_bundled(path: str) -> bool:
    return Path(path).resolve() == BUNDLED_MODEL_DIR


def list_models(session: Session) -> list[ModelListing]:
    """Registered models (oldest first), plus the bundled demo model if it is not registered.

    With no promoted model the bundled one is what serves, so it is then marked active, whether or
    not it is registered (the worker registers the model it serves).
    """
    rows = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
    manifest = _bundled_manifest()
    bundled_serves = not any(r.active for r in rows)
    bundled_sha = manifest.weights_sha256 if manifest is not None else None
    out = [
        ModelListing(
            id=r.id,
            name=r.name,
            version=r.version,
            weights_sha256=r.weights_sha256,
            path=r.path,
            active=r.active or (bundled_serves and r.weights_sha256 == bundled_sha),
            bundled=_is_bundled(r.path),
            registered_at=r.registered_at.isoformat(),
        )
        for r in rows
    ]
    if manifest is not None and not any(r.weights_sha256 == manifest.weights_sha256 for r in rows):
        out.append(
            ModelListing(
                id=None,
                name=manifest.name,
                version=manifest.version,
                weights_sha256=manifest.weights_sha256,
                path=str(BUNDLED_MODEL_DIR),
                active=bundled_serves,
                bundled=True,
                registered_at=None,
            )
        )
    return out


def register_model(
    session: Session,
    model_dir: Path,
    actor: str,
    metrics: dict[str, Any] | None = None,
    *,
    manifest: ModelManifest | None = None,
) -> tuple[ModelVersion, bool]:
    """Register ``model_dir``; returns (row, newly_registered). The caller commits.

    Without ``manifest`` the folder's manifest is read and its weights checked; a caller that
    already loaded the model through a backend (which verifies the hash) passes its manifest.
    A folder whose weights are already registered returns the existing row unchanged and
    records nothing, so registering twice is harmless.
    """
    model_dir = model_dir.expanduser().resolve()
    if manifest is None:
        manifest = load_manifest(model_dir)
        verify_weights(model_dir, manifest)
    existing = session.scalar(
        select(ModelVersion).where(ModelVersion.weights_sha256 == manifest.weights_sha256)
    )
    if existing is not None:
        return existing, False
    row = ModelVersion(
        name=manifest.name,
        version=manifest.version,
        weights_sha256=manifest.weights_sha256,
        path=str(model_dir),
        active=False,
        metrics=metrics if metrics is not None else (manifest.metrics or None),
    )
    session.add(row)
    session.flush()
    audit.record(session, audit.MODEL_REGISTERED, actor, details=_describe(row))
    log.info(
        "registered model %s %s (sha256 %s) from %s",
        row.name,
        row.version,
        row.weights_sha256[:12],
        model_dir,
    )
    return row, True


def resolve_model(session: Session, ref: str, actor: str) -> ModelVersion:
    """The row ``ref`` names: a model folder (registered on the way if new), ``bundled``/``demo``,
    a weights SHA-256 or a prefix of at least 8 hex digits, ``NAME:VERSION`` or a unique NAME."""
    text = ref.strip()
    path = Path(text).expanduser()
    if text.lower() in BUNDLED_NAMES:
        path = bundled_model_dir()
    if path.is_dir():
        return register_model(session, path, actor)[0]
    rows = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
    if _SHA_PREFIX_RE.match(text.lower()):
        matches = [r for r in rows if r.weights_sha256.startswith(text.lower())]
    else:
        name, sep, version = text.partition(":")
        matches = [r for r in rows if r.name == name and (not sep or r.version == version)]
    if not matches:
        raise ModelRegistryError(
            f"no registered model matches {ref!r} (give a model folder, bundled, a weights SHA-256 "
            "prefix, NAME or NAME:VERSION; see `mammonode model list`)"
        )
    if len(matches) > 1:
        names = ", ".join(f"{r.name}:{r.version} ({r.weights_sha256[:12]})" for r in matches)
        raise ModelRegistryError(
            f"{ref!r} matches several models: {names}; give NAME:VERSION or a SHA-256 prefix"
        )
    return matches[0]


@dataclass(frozen=True)
class Promotion:
    """What `model promote` changed."""

    old: dict[str, Any] | None
    """None when the bundled default was serving (no model promoted before)."""
    new: dict[str, Any]
    changed: bool


def promote_model(session: Session, ref: str, actor: str) -> Promotion:
    """Make the model ``ref`` names the only active one and audit the switch; the caller commits.

    The weights are re-checked first: a folder edited since registration is refused rather than
    served under a hash it no longer has.
    """
    target = resolve_model(session, ref, actor)
    # Lock every row first (PostgreSQL), so two concurrent promotions cannot leave two active.
    session.scalars(select(ModelVersion.id).with_for_update()).all()
    target_dir = Path(target.path)
    try:
        verify_weights(target_dir, load_manifest(target_dir))
    except InputError as exc:
        raise ModelRegistryError(f"cannot promote {target.name}:{target.version}: {exc}") from None
    old = active_model_version(session)
    if old is not None and old.id == target.id:
        return Promotion(old=_describe(old), new=_describe(target) or {}, changed=False)
    bundled = _bundled_manifest()
    if old is None and bundled is not None and target.weights_sha256 == bundled.weights_sha256:
        # Nothing promoted yet: the bundled model already serves, so promoting it changes nothing.
        return Promotion(old=_describe(target), new=_describe(target) or {}, changed=False)
    session.execute(update(ModelVersion).where(ModelVersion.id != target.id).values(active=False))
    target.active = True
    target.promoted_at = utcnow()
    old_desc = _describe(old)
    if old_desc is None:
        manifest = bundled
        if manifest is not None:
            old_desc = {
                "name": manifest.name,
                "version": manifest.version,
                "weights_sha256": manifest.weights_sha256,
                "path": str(BUNDLED_MODEL_DIR),
                "bundled_default": True,
            }
    new_desc = _describe(target) or {}
    audit.record(session, audit.MODEL_PROMOTED, actor, details={"old": old_desc, "new": new_desc})
    log.info("promoted model %s %s (sha256 %s)", target.name, target.version, target.weights_sha256[:12])
    return Promotion(old=old_desc, new=new_desc, changed=True)


def ensure_registered(
    sessions: sessionmaker[Session], manifest: ModelManifest, model_dir: Path, *, actor: str
) -> int:
    """The ``model_versions`` row ID of ``manifest``'s weights, registering it (committed) if unknown.

    Two nodes sharing a database may register the same weights at once; the loser of the race
    reads the winner's row.
    """
    with sessions() as session:
        try:
            row, _ = register_model(session, model_dir, actor, manifest=manifest)
            session.commit()
            return row.id
        except IntegrityError:
            session.rollback()
            row_id = session.scalar(
                select(ModelVersion.id).where(ModelVersion.weights_sha256 == manifest.weights_sha256)
            )
            if row_id is None:
                raise
            return row_id


def select_model_dir(config: NodeConfig, session: Session) -> Path:
    """The model folder to serve: the configured one, the promoted one, or the bundled demo."""
    if config.model_dir is not None:
        return resolve_model_dir(config.model_dir)
    active = active_model_version(session)
    return resolve_model_dir(Path(active.path) if active is not None else None)


def pipeline_factory(config: NodeConfig) -> PipelineFactory:
    """The default factory: ``config.backend`` (auto, torch, onnxruntime, tensorrt) on ``config.device``
    for the model folder, with DALI preprocessing when ``config.preprocessing`` says so, and the
    CAM captures' opacity and the presentation states as the output settings say."""

    def build(model_dir: Path) -> Pipeline:
        from inference import load_backend

        backend = load_backend(config.backend, model_dir, device=config.device)
        dali = None
        if config.preprocessing == "dali":
            from inference import DaliPreprocessor

            device_id = None if config.device == "cpu" else int(config.device.partition(":")[2] or "0")
            preprocess = backend.manifest.preprocess
            dali = DaliPreprocessor(preprocess, device_id=device_id, batch_size=config.batch_size)
        return Pipeline(
            backend,
            batch_size=config.batch_size,
            dali=dali,
            cam_opacity_follows_probability=config.cam_opacity_follows_probability,
            write_presentation_states=config.write_presentation_states,
        )

    return build
