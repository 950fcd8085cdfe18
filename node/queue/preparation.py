"""Preparing a claimed job for scoring: every scorable image of its study decoded and preprocessed.

The decoding runs in the pixel pool's child processes, several images at once (a codec that aborts
takes only its child down, design invariant 8). An image that cannot be decoded, or whose child
dies, fails alone: it is marked unscorable, audited (``image.failed``) and named in the study's
report, and the study is scored from its other images. Anything that is not the file's fault (a
full disk, a bug) fails the job as a whole, and the worker retries it by its kind.

A job is prepared either in the round that scores it or, one round ahead, in the worker's
prefetch thread (:mod:`node.queue.prefetch`), which may be told to stop between two images.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference import (
    ImageFailure,
    ImageMeta,
    ImageScore,
    InputError,
    Pipeline,
    PixelPool,
    PreparedImage,
    scrub,
)
from node import audit
from node.config import NodeConfig
from node.db.models import Instance, Job, Study
from node.dicom.spool import read_and_prepare, read_spooled
from node.queue.retry import is_transient

log = logging.getLogger(__name__)

ACTOR = "worker"
UNREADABLE = "unreadable at scoring"
"""Prefix of ``Instance.skip_reason`` for an image the worker could not decode: later versions of
the study still name it in their report."""


class Interrupted(Exception):
    """The worker is stopping: the job's preparation was abandoned and its claim is to be given back."""


def image_fault(result: object) -> bool:
    """An outcome of preparing one image that is that image's fault: unusable or undecodable
    (:class:`InputError`, which includes a decoder child that died), too big to decode, or its
    spool file unreadable. Anything else (a full disk, a bug) is the job's."""
    if isinstance(result, (InputError, MemoryError)):
        return True
    return isinstance(result, OSError) and not is_transient(result)


@dataclass
class Work:
    """One claimed job and its decoded inputs."""

    job_id: int
    version: int
    lateralities: str
    study_id: int
    study_uid: str
    patient_id: str
    instance_ids: list[int] = field(default_factory=list)
    images: list[PreparedImage] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)
    """The study's images that could not be analysed (this run's and earlier versions')."""
    scores: list[ImageScore] | None = None
    """Already scored with the images (DALI prepares and infers in one step); None otherwise."""
    started: float = field(default_factory=time.monotonic)  # claimed at (for the latency metric)


class Preparer:
    """Prepares claimed jobs: reads the study's instances from the database and the spool, decodes
    them in ``pool`` (or with the pipeline's DALI preprocessing) and records the images that fail."""

    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session], pool: PixelPool) -> None:
        self.config = config
        self.sessions = sessions
        self.pool = pool

    def prepare(self, job_id: int, pipeline: Pipeline, stop: threading.Event | None = None) -> Work:
        """Decode every scorable image of the job's study; unusable ones are skipped and audited.

        With ``stop`` set between two images, :class:`Interrupted` is raised and nothing of this
        preparation is recorded (the images it skipped are skipped again by the next one)."""
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} vanished")
            study = session.get(Study, job.study_id)
            if study is None:
                raise LookupError(f"study of job {job_id} vanished")
            work = Work(job.id, job.version, job.lateralities, study.id, study.study_uid, study.patient_id)
            instances = list(
                session.scalars(
                    select(Instance)
                    .where(Instance.study_id == study.id, Instance.scorable.is_(True))
                    .order_by(Instance.id)
                )
            )
            sources = [(self.config.spool_dir / i.spool_path, i.sop_instance_uid) for i in instances]
            work.failures = self.earlier_failures(session, study)
            if pipeline.dali is not None:
                self._prepare_with_dali(session, study, work, instances, sources, pipeline)
            else:
                # Decoded in the pool's workers, several images at once (inference.batching).
                task = functools.partial(
                    read_and_prepare, study_uid=study.study_uid, config=pipeline.manifest.preprocess
                )
                for instance, (_, result) in zip(instances, self.pool.imap(task, sources), strict=True):
                    if stop is not None and stop.is_set():
                        raise Interrupted(f"job {job_id}")
                    if image_fault(result):  # untrusted file: this image fails alone
                        assert isinstance(result, Exception)
                        self._skip_instance(session, study, work, instance, result)
                    elif isinstance(result, Exception):
                        raise result  # not the file's fault (disk, memory...): the job's failure
                    else:
                        work.images.append(result)
                        work.instance_ids.append(instance.id)
            session.commit()
        return work

    def _prepare_with_dali(
        self,
        session: Session,
        study: Study,
        work: Work,
        instances: list[Instance],
        sources: list[tuple[Path, str]],
        pipeline: Pipeline,
    ) -> None:
        """DALI decodes and preprocesses on its device and the batch goes straight to the backend,
        so the job's images are prepared and scored together; files DALI does not take fall back
        to the CPU path inside :meth:`Pipeline.prepare_and_infer`."""
        readable: list[tuple[Instance, tuple[Dataset, ImageMeta]]] = []
        for instance, source in zip(instances, sources, strict=True):
            try:
                readable.append((instance, read_spooled(source, study.study_uid)))
            except InputError as exc:
                self._skip_instance(session, study, work, instance, exc)
        result = pipeline.prepare_and_infer([item for _, item in readable])
        failed = dict(result.failures)
        for index, why in failed.items():
            self._skip_instance(session, study, work, readable[index][0], why)
        kept = [instance for i, (instance, _) in enumerate(readable) if i not in failed]
        work.images = list(result.prepared)
        work.instance_ids = [instance.id for instance in kept]
        work.scores = list(result.scores)

    def _skip_instance(
        self, session: Session, study: Study, work: Work, instance: Instance, error: Exception
    ) -> None:
        """One image cannot be analysed: record it (row, audit, log) and name it in the report."""
        why = scrub(str(error) or type(error).__name__, [study.patient_id])
        instance.scorable = False
        instance.skip_reason = f"{UNREADABLE}: {why}"[:255]
        work.failures.append(
            ImageFailure(
                instance.sop_instance_uid, instance.sop_class_uid, instance.laterality, instance.view, why
            )
        )
        audit.record(
            session,
            audit.IMAGE_FAILED,
            ACTOR,
            patient_id=study.patient_id,
            study_uid=study.study_uid,
            sop_instance_uid=instance.sop_instance_uid,
            details={"stage": "decode", "reason": why, "job_id": work.job_id},
        )
        log.warning("instance %s not analysed: %s", instance.sop_instance_uid, why)

    @staticmethod
    def earlier_failures(session: Session, study: Study) -> list[ImageFailure]:
        """Images of the study that an earlier version could not decode: still not analysed."""
        rows = session.scalars(
            select(Instance).where(
                Instance.study_id == study.id,
                Instance.scorable.is_(False),
                Instance.skip_reason.startswith(UNREADABLE),
            )
        )
        return [
            ImageFailure(
                i.sop_instance_uid,
                i.sop_class_uid,
                i.laterality,
                i.view,
                (i.skip_reason or "").removeprefix(UNREADABLE).lstrip(": "),
            )
            for i in rows
        ]
