"""Which model the worker serves, and its row in ``model_versions``.

The serving model is chosen in this order: ``config.model_dir`` (an operator pinned one), else the
model promoted in the database (`mammonode model promote`), else the bundled demo model. Every
model that scores is registered by the SHA-256 of its weights, so each score and output object can
name it (design invariant 5); registration never promotes, since switching models is an explicit,
audited command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from inference.bundled import resolve_model_dir
from inference.manifest import ModelManifest
from inference.pipeline import Pipeline
from node import audit
from node.config import NodeConfig
from node.db.models import ModelVersion

log = logging.getLogger(__name__)

PipelineFactory = Callable[[Path], Pipeline]
"""Builds the scoring pipeline for a model folder (the worker calls it again when the model changes)."""


def select_model_dir(config: NodeConfig, session: Session) -> Path:
    """The model folder to serve: the configured one, the promoted one, or the bundled demo."""
    if config.model_dir is not None:
        return resolve_model_dir(config.model_dir)
    active = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.active.is_(True))
        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
        .limit(1)
    ).first()
    if active is not None:
        return resolve_model_dir(Path(active.path))
    return resolve_model_dir(None)


def pipeline_factory(config: NodeConfig) -> PipelineFactory:
    """The default factory: ``config.backend`` (auto, torch, onnxruntime, tensorrt) on ``config.device``
    for the model folder, with DALI preprocessing when ``config.preprocessing`` says so."""

    def build(model_dir: Path) -> Pipeline:
        from inference.backends.registry import load_backend

        backend = load_backend(config.backend, model_dir, device=config.device)
        dali = None
        if config.preprocessing == "dali":
            from inference.preprocessing_dali import DaliPreprocessor

            device_id = None if config.device == "cpu" else int(config.device.partition(":")[2] or "0")
            preprocess = backend.manifest.preprocess
            dali = DaliPreprocessor(preprocess, device_id=device_id, batch_size=config.batch_size)
        return Pipeline(backend, batch_size=config.batch_size, dali=dali)

    return build


def register_model(
    sessions: sessionmaker[Session], manifest: ModelManifest, model_dir: Path, *, actor: str = "worker"
) -> int:
    """The ``model_versions`` row ID of ``manifest``'s weights, adding it (audited) if unknown."""
    sha = manifest.weights_sha256
    with sessions() as session:
        row_id = session.scalar(select(ModelVersion.id).where(ModelVersion.weights_sha256 == sha))
        if row_id is not None:
            return row_id
        row = ModelVersion(
            name=manifest.name,
            version=manifest.version,
            weights_sha256=sha,
            path=str(model_dir.resolve()),
            active=False,
            metrics=manifest.metrics or None,
        )
        session.add(row)
        try:
            session.flush()
            audit.record(
                session,
                audit.MODEL_REGISTERED,
                actor,
                details={
                    "model_version_id": row.id,
                    "name": manifest.name,
                    "version": manifest.version,
                    "weights_sha256": sha,
                    "path": row.path,
                },
            )
            session.commit()
        except IntegrityError:
            session.rollback()  # registered concurrently by another node
            row_id = session.scalar(select(ModelVersion.id).where(ModelVersion.weights_sha256 == sha))
            if row_id is None:
                raise
            return row_id
        log.info("registered model %s %s (sha256 %s)", manifest.name, manifest.version, sha[:12])
        return row.id
