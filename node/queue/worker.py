"""The scoring worker: claims queued study versions, scores them and puts the results in the outbox.

Several jobs are claimed per round and their images go through the backend together (one batched
forward pass gives logit and CAM, invariant 3), then each study is aggregated, rendered and
committed on its own, so one bad study never fails its neighbours. A job's images are all of its
study's scorable images, since the exam score and the report need every breast; the secondary
captures are made only for the breasts the job re-scores.

A claim is a conditional UPDATE (``pending`` -> ``claimed``) whose row count says who won, under
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers (threads, processes or nodes)
never score the same job. Finishing is conditional on still holding the claim.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from inference.aggregation import aggregate_studies
from inference.batching import DecodePool, shared_pool
from inference.dicom_io import read_dataset, read_meta
from inference.pipeline import Pipeline, PreparedImage, prepare_image
from inference.types import ImageMeta, ImageScore, InputError, PreprocessConfig, StudyScore
from node import audit
from node.config import NodeConfig
from node.db.models import Breast, Instance, Job, Score, Study, utcnow
from node.dicom.intake import side_code
from node.queue.model import PipelineFactory, register_model, select_model_dir
from node.queue.model import pipeline_factory as default_pipeline_factory
from node.queue.results import KIND_SC, KIND_SR, add_output, score_rows, write_outbox_file

log = logging.getLogger(__name__)

ACTOR = "worker"
MAX_ERROR_CHARS = 2000


def read_spooled(source: tuple[Path, str], study_uid: str) -> tuple[Dataset, ImageMeta]:
    """Read a spooled file (``(path, SOP Instance UID)``) and check it is the one its row names."""
    path, sop_instance_uid = source
    ds = read_dataset(path)
    meta = read_meta(ds)
    if meta.sop_instance_uid != sop_instance_uid or meta.study_instance_uid != study_uid:
        raise InputError("spooled file does not match its database row")
    return ds, meta


def _read_and_prepare(source: tuple[Path, str], study_uid: str, config: PreprocessConfig) -> PreparedImage:
    """The decode workers' task for one instance: :meth:`Pipeline.prepare` of the spooled file."""
    return prepare_image(*read_spooled(source, study_uid), config)


def claim_job(
    sessions: sessionmaker[Session], worker_name: str, now: dt.datetime | None = None
) -> int | None:
    """Claim the oldest pending job for ``worker_name``; its ID, or None when nothing is pending."""
    now = now or utcnow()
    with sessions() as session:
        for _ in range(8):  # another worker may win the candidate; try the next one
            job_id = session.scalar(
                select(Job.id)
                .where(Job.state == "pending")
                .order_by(Job.created_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job_id is None:
                session.rollback()
                return None
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "pending")
                .values(state="claimed", claimed_by=worker_name, claimed_at=now, attempts=Job.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) == 1:
                study_id = select(Job.study_id).where(Job.id == job_id).scalar_subquery()
                session.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == "queued")
                    .values(state="scoring")
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                return job_id
            session.rollback()
    return None


@dataclass
class _Work:
    """One claimed job and its decoded inputs."""

    job_id: int
    version: int
    lateralities: str
    study_id: int
    study_uid: str
    patient_id: str
    instance_ids: list[int] = field(default_factory=list)
    images: list[PreparedImage] = field(default_factory=list)
    scores: list[ImageScore] | None = None
    """Already scored with the images (DALI prepares and infers in one step); None otherwise."""


class Worker:
    """Scores claimed jobs with the serving model; ``run_once`` is one claim-score-commit round.

    ``pipeline_factory`` builds a pipeline for a model folder; the default loads ``config.backend``.
    The model folder is chosen by :func:`node.queue.model.select_model_dir` before every round, so
    a promotion takes effect for the next job without a restart. ``decode_pool`` decodes a job's
    images in parallel (default: the process-wide pool of one worker process per CPU).
    """

    def __init__(
        self,
        config: NodeConfig,
        sessions: sessionmaker[Session],
        pipeline_factory: PipelineFactory | None = None,
        *,
        name: str | None = None,
        decode_pool: DecodePool | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = decode_pool or shared_pool()
        self._factory = pipeline_factory or default_pipeline_factory(config)
        self._pipeline: Pipeline | None = None
        self._model_dir: Path | None = None
        self._model_id: int | None = None

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline loaded so far (None before the first :meth:`load`)."""
        return self._pipeline

    def load(self) -> Pipeline:
        """The pipeline of the model to serve now, (re)loading it when the selection changed."""
        with self.sessions() as session:
            model_dir = select_model_dir(self.config, session).resolve()
        if self._pipeline is None or model_dir != self._model_dir:
            pipeline = self._factory(model_dir)
            self._model_id = register_model(self.sessions, pipeline.manifest, model_dir, actor=ACTOR)
            self._pipeline, self._model_dir = pipeline, model_dir
            m = pipeline.manifest
            log.info(
                "serving model %s %s (sha256 %s) with backend %s",
                m.name,
                m.version,
                m.weights_sha256[:12],
                pipeline.backend.name,
            )
        return self._pipeline

    def run_once(self) -> int:
        """Claim jobs until a batch is full, score them together, commit each; returns jobs handled."""
        with self.sessions() as session:
            if session.scalar(select(Job.id).where(Job.state == "pending").limit(1)) is None:
                return 0
        pipeline = self.load()
        works: list[_Work] = []
        claimed = n_images = 0
        while n_images < pipeline.batch_size:
            job_id = claim_job(self.sessions, self.name)
            if job_id is None:
                break
            claimed += 1
            try:
                work = self._prepare(job_id, pipeline)
            except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
                self._fail(job_id, exc)
                continue
            works.append(work)
            n_images += len(work.images)
        for work in works:
            if not work.images:
                try:
                    self._finish_empty(work)
                except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
                    self._fail(work.job_id, exc)
        for work, scores in self._infer(pipeline, [w for w in works if w.images]):
            if isinstance(scores, Exception):
                self._fail(work.job_id, scores)
                continue
            try:
                self._finish(work, scores, pipeline)
            except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
                self._fail(work.job_id, exc)
        return claimed

    # ---------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------

    def _prepare(self, job_id: int, pipeline: Pipeline) -> _Work:
        """Decode every scorable image of the job's study; unusable ones are skipped and audited."""
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} vanished")
            study = session.get(Study, job.study_id)
            if study is None:
                raise LookupError(f"study of job {job_id} vanished")
            work = _Work(job.id, job.version, job.lateralities, study.id, study.study_uid, study.patient_id)
            instances = list(
                session.scalars(
                    select(Instance)
                    .where(Instance.study_id == study.id, Instance.scorable.is_(True))
                    .order_by(Instance.id)
                )
            )
            sources = [(self.config.spool_dir / i.spool_path, i.sop_instance_uid) for i in instances]
            if pipeline.dali is not None:
                self._prepare_with_dali(session, study, work, instances, sources, pipeline)
            else:
                # Decoded in the pool's workers, several images at once (inference.batching).
                task = functools.partial(
                    _read_and_prepare, study_uid=study.study_uid, config=pipeline.manifest.preprocess
                )
                for instance, (_, result) in zip(instances, self._pool.imap(task, sources), strict=True):
                    if isinstance(result, Exception):  # untrusted file: skip this image only
                        self._skip_instance(session, study, instance, str(result) or type(result).__name__)
                    else:
                        work.images.append(result)
                        work.instance_ids.append(instance.id)
            session.commit()
        return work

    def _prepare_with_dali(
        self,
        session: Session,
        study: Study,
        work: _Work,
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
            except (InputError, OSError) as exc:
                self._skip_instance(session, study, instance, str(exc) or type(exc).__name__)
        result = pipeline.prepare_and_infer([item for _, item in readable])
        failed = dict(result.failures)
        for index, why in failed.items():
            self._skip_instance(session, study, readable[index][0], str(why) or type(why).__name__)
        kept = [instance for i, (instance, _) in enumerate(readable) if i not in failed]
        work.images = list(result.prepared)
        work.instance_ids = [instance.id for instance in kept]
        work.scores = list(result.scores)

    def _skip_instance(self, session: Session, study: Study, instance: Instance, reason: str) -> None:
        instance.scorable = False
        instance.skip_reason = f"unreadable at scoring: {reason}"[:255]
        audit.record(
            session,
            audit.INSTANCE_IGNORED,
            ACTOR,
            patient_id=study.patient_id,
            study_uid=study.study_uid,
            sop_instance_uid=instance.sop_instance_uid,
            details={"reason": instance.skip_reason},
        )
        log.warning("instance %s skipped: %s", instance.sop_instance_uid, instance.skip_reason)

    def _infer(
        self, pipeline: Pipeline, works: list[_Work]
    ) -> list[tuple[_Work, list[ImageScore] | Exception]]:
        """Score the union of the jobs' images in shared batches; if that fails, each job alone,
        so the error lands on the job that caused it."""
        done = [(work, work.scores) for work in works if work.scores is not None]
        works = [work for work in works if work.scores is None]
        if not works:
            return list(done)
        images = [image for work in works for image in work.images]
        try:
            scores = pipeline.infer(images)
        except Exception:
            log.warning(
                "batched inference of %d jobs failed; scoring them one by one", len(works), exc_info=True
            )
        else:
            out: list[tuple[_Work, list[ImageScore] | Exception]] = list(done)
            start = 0
            for work in works:
                out.append((work, scores[start : start + len(work.images)]))
                start += len(work.images)
            return out
        results: list[tuple[_Work, list[ImageScore] | Exception]] = list(done)
        for work in works:
            try:
                results.append((work, pipeline.infer(work.images)))
            except Exception as exc:  # noqa: BLE001 - handed to _fail by the caller
                results.append((work, exc))
        return results

    def _aggregate(self, work: _Work, scores: list[ImageScore], pipeline: Pipeline) -> StudyScore:
        # One study per job: files of a study that disagree on PatientID are still one exam.
        same_patient = [
            dataclasses.replace(s, meta=dataclasses.replace(s.meta, patient_id=work.patient_id))
            for s in scores
        ]
        (study,) = aggregate_studies(same_patient, pipeline.aggregation, pipeline.manifest.threshold)
        return study

    def _finish(self, work: _Work, scores: list[ImageScore], pipeline: Pipeline) -> None:
        """Write the job's SCs and SR, then commit scores, outputs, transmissions and states."""
        study_score = self._aggregate(work, scores, pipeline)
        result = pipeline.outputs(study_score, work.images, result_version=work.version)
        all_sources = [i.meta.sop_instance_uid for i in study_score.images]
        files: list[tuple[str, Dataset, str, list[str]]] = []
        for image, sc in zip(study_score.images, result.secondary_captures, strict=True):
            if side_code(image.meta.laterality) in work.lateralities:
                path = write_outbox_file(self.config.outbox_dir, work.study_uid, sc)
                files.append((KIND_SC, sc, path, [image.meta.sop_instance_uid]))
        sr_path = write_outbox_file(self.config.outbox_dir, work.study_uid, result.report)
        files.append((KIND_SR, result.report, sr_path, all_sources))

        m = pipeline.manifest
        with self.sessions() as session:
            if not self._complete_job(session, work):
                return
            if session.scalar(select(Score.id).where(Score.job_id == work.job_id).limit(1)) is None:
                session.add_all(score_rows(work.job_id, study_score, pipeline))
            outputs = [
                add_output(
                    session,
                    job_id=work.job_id,
                    kind=kind,
                    ds=ds,
                    outbox_path=path,
                    source_uids=sources,
                    destinations=self.config.destinations,
                )
                for kind, ds, path, sources in files
            ]
            state = self._update_study(session, work, "scored")
            breasts = {side_code(b.laterality): round(b.probability, 6) for b in study_score.breasts}
            audit.record(
                session,
                audit.STUDY_SCORED,
                ACTOR,
                patient_id=work.patient_id,
                study_uid=work.study_uid,
                details={
                    "job_id": work.job_id,
                    "version": work.version,
                    "lateralities": work.lateralities,
                    "model_name": m.name,
                    "model_version": m.version,
                    "weights_sha256": m.weights_sha256,
                    "backend": pipeline.backend.name,
                    "aggregation": pipeline.aggregation,
                    "threshold": study_score.threshold,
                    "breast_probabilities": breasts,
                    "exam_probability": round(study_score.exam_probability, 6),
                    "recall": bool(study_score.recall_recommended),
                    "images": len(study_score.images),
                    "outputs": [o.sop_instance_uid for o in outputs],
                },
            )
            session.commit()
        log.info(
            "study %s version %d scored: exam %.3f, %d outputs, study now %s",
            work.study_uid,
            work.version,
            study_score.exam_probability,
            len(outputs),
            state,
        )

    def _finish_empty(self, work: _Work) -> None:
        """No image of the study could be scored: the job is done, without outputs."""
        with self.sessions() as session:
            if not self._complete_job(session, work):
                return
            state = self._update_study(session, work, "skipped")
            audit.record(
                session,
                audit.STUDY_SKIPPED,
                ACTOR,
                patient_id=work.patient_id,
                study_uid=work.study_uid,
                details={"job_id": work.job_id, "version": work.version, "reason": "no scorable image left"},
            )
            session.commit()
        log.info(
            "study %s version %d: no scorable image left (study %s)", work.study_uid, work.version, state
        )

    def _complete_job(self, session: Session, work: _Work) -> bool:
        """Mark the job done if this worker still holds its claim (False: leave it alone)."""
        done = session.execute(
            update(Job)
            .where(Job.id == work.job_id, Job.state == "claimed", Job.claimed_by == self.name)
            .values(state="done", finished_at=utcnow(), error=None, model_version_id=self._model_id)
            .execution_options(synchronize_session=False)
        )
        if getattr(done, "rowcount", 0) != 1:
            session.rollback()
            log.warning(
                "job %d is no longer claimed by this worker; its results are not committed", work.job_id
            )
            return False
        return True

    def _update_study(self, session: Session, work: _Work, state: str) -> str:
        """Clear the re-scored breasts and set the study's state; returns the state it ends in.

        A breast with a scorable instance this run did not see (it arrived while scoring) stays
        dirty and sends the study back to ``receiving``, so assembly queues the next version.
        """
        late = set(
            session.scalars(
                select(Instance.laterality).where(
                    Instance.study_id == work.study_id,
                    Instance.scorable.is_(True),
                    Instance.id.not_in(work.instance_ids) if work.instance_ids else Instance.id.is_not(None),
                )
            )
        )
        clean = [side for side in work.lateralities if side not in late]
        if clean:
            session.execute(
                update(Breast)
                .where(Breast.study_id == work.study_id, Breast.laterality.in_(clean))
                .values(dirty=False, scored_version=work.version)
                .execution_options(synchronize_session=False)
            )
        if state == "scored":
            session.execute(
                update(Study)
                .where(Study.id == work.study_id, Study.scored_version < work.version)
                .values(scored_version=work.version)
                .execution_options(synchronize_session=False)
            )
        new_state = "receiving" if late else state
        session.execute(
            update(Study)
            .where(Study.id == work.study_id, Study.state != "receiving")
            .values(state=new_state)
            .execution_options(synchronize_session=False)
        )
        return session.scalar(select(Study.state).where(Study.id == work.study_id)) or new_state

    def _fail(self, job_id: int, exc: BaseException) -> None:
        """The job failed: record why (job row + audit); the worker carries on with the others."""
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        log.error("job %d failed: %s", job_id, error, exc_info=exc)
        with self.sessions() as session:
            failed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "claimed", Job.claimed_by == self.name)
                .values(state="failed", error=error, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if getattr(failed, "rowcount", 0) != 1:
                session.rollback()
                return
            job = session.get(Job, job_id)
            study = session.get(Study, job.study_id) if job is not None else None
            if job is not None and study is not None:
                session.execute(
                    update(Study)
                    .where(Study.id == study.id, Study.state != "receiving")
                    .values(state="failed")
                    .execution_options(synchronize_session=False)
                )
                audit.record(
                    session,
                    audit.STUDY_FAILED,
                    ACTOR,
                    patient_id=study.patient_id,
                    study_uid=study.study_uid,
                    details={"job_id": job_id, "version": job.version, "error": error},
                )
            session.commit()
