"""The scoring worker: claims queued study versions, scores them and puts the results in the outbox.

Several jobs are claimed per round and their images go through the backend together (one batched
forward pass gives logit and CAM, invariant 3), then each study is aggregated, rendered and
committed on its own, so one bad study never fails its neighbours. A job's images are all of its
study's scorable images, since the exam score and the report need every breast; the secondary
captures are made only for the breasts the job re-scores.

A claim is a conditional UPDATE (``pending`` -> ``claimed``) whose row count says who won, under
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two workers (threads, processes or nodes)
never score the same job. Finishing is conditional on still holding the claim.

All pixel work happens in the pixel pool's child processes: decoding and preprocessing before the
backend pass (:mod:`node.queue.preparation`), rendering and encoding the CAM captures and the
report after it. While one round is scored, the next is claimed and decoded in a thread
(:mod:`node.queue.prefetch`), so the pool does not wait for the backend, the writing and the
commits. An image that cannot be decoded, or whose child dies, fails alone: it is audited
(``image.failed``), the study is scored from its other images and its report is PARTIAL and names
it. Failures of the job as a whole are retried by their kind (:mod:`node.queue.retry`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from inference import (
    ImageScore,
    Pipeline,
    PixelPool,
    StudyOutputs,
    StudyScore,
    aggregate_studies,
    describe,
    release_memory,
    shared_pool,
    where,
)
from node import audit
from node.admin.registry import PipelineFactory, ensure_registered, select_model_dir
from node.admin.registry import pipeline_factory as default_pipeline_factory
from node.config import NodeConfig
from node.db.models import Breast, Instance, Job, Score, Study, utcnow
from node.db.states import JobState, StudyState, check_transition, move
from node.dicom.intake import side_code
from node.observability import metrics
from node.queue.claims import is_claimable, renew_leases, requeue_stale_claims, worker_name
from node.queue.prefetch import Round, Rounds
from node.queue.preparation import ACTOR, Preparer, Work
from node.queue.results import add_output, score_rows, write_outputs
from node.queue.retry import MAX_ATTEMPTS, failure_delay, is_transient, transient_delay

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
COMPLETE = move(JobState.CLAIMED, JobState.DONE)
POOL_IDLE_SECONDS = 15.0
"""With no job for this long the pixel pool's children are stopped (idle memory back to the node
process alone); the next job starts them again, which costs about a second."""


class Worker:
    """Scores claimed jobs with the serving model; ``run_once`` is one claim-score-commit round.

    ``pipeline_factory`` builds a pipeline for a model folder; the default loads ``config.backend``.
    The model folder is chosen by :func:`node.admin.registry.select_model_dir` before every round, so
    a promotion takes effect for the next job without a restart. ``decode_pool`` decodes a job's
    images in parallel (default: the process-wide pool of one worker process per CPU). A worker
    holds the claims of the round after the one it scores: :meth:`close` gives them back.
    """

    def __init__(
        self,
        config: NodeConfig,
        sessions: sessionmaker[Session],
        pipeline_factory: PipelineFactory | None = None,
        *,
        name: str | None = None,
        decode_pool: PixelPool | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.name = name or worker_name()
        self._pool = decode_pool or shared_pool()
        self._factory = pipeline_factory or default_pipeline_factory(config)
        self._pipeline: Pipeline | None = None
        self._model_dir: Path | None = None
        self._model_id: int | None = None
        preparer = Preparer(config, sessions, self._pool)
        self._rounds = Rounds(sessions, self.name, config.lease_seconds, preparer, self._fail)

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
            self._model_id = ensure_registered(self.sessions, pipeline.manifest, model_dir, actor=ACTOR)
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

    def heartbeat(self) -> int:
        """Renew the leases of the jobs this worker holds (from a thread of its own, since a round
        may spend minutes in one batch); returns how many."""
        return renew_leases(self.sessions, self.name, self.config.lease_seconds)

    def run_once(self) -> int:
        """Score one round (jobs claimed until a batch is full) together, commit each job; returns
        the jobs handled.

        The round is the one claimed and decoded during the previous call, if any; while it is
        scored, the next one is claimed and decoded in a thread (:mod:`node.queue.prefetch`), and
        this call returns once that is done, so no thread outlives it. A job this worker still
        holds from an earlier round, other than those held ahead, is one it could not release (the
        database was gone when it failed): it goes back to the queue first, uncharged.
        """
        if self._rounds.stopping:
            return 0
        requeue_stale_claims(self.sessions, worker=self.name, keep=self._rounds.held)
        if not self._rounds.held and not self._claimable():
            self._pool.close_if_idle(POOL_IDLE_SECONDS)
            return 0
        try:
            pipeline = self.load()
        except BaseException:
            self._rounds.release_held()  # claimed ahead, but not to be scored by this worker soon
            raise
        started = time.monotonic()
        round_ = self._rounds.next(pipeline)
        if round_.claimed:
            self._rounds.start_ahead(pipeline)
        try:
            self._score(round_, pipeline)
        finally:
            self._rounds.wait_ahead()
        # wall time from round to round: the next round's decoding, under way meanwhile, included
        metrics.record_scoring_round(round_.n_images, time.monotonic() - started)
        claimed = round_.claimed
        del round_
        release_memory()  # a burst of mammograms must not leave the node's heap at its peak
        return claimed

    @property
    def stopping(self) -> bool:
        """:meth:`close` was called: this worker claims nothing more."""
        return self._rounds.stopping

    def close(self) -> None:
        """Stop claiming, and give back the jobs claimed ahead of a round (pending, uncharged); a
        round being scored still finishes. Called by :meth:`node.service.Node.stop`."""
        self._rounds.close()

    def _claimable(self) -> bool:
        with self.sessions() as session:
            return session.scalar(select(Job.id).where(is_claimable(utcnow())).limit(1)) is not None

    def _score(self, round_: Round, pipeline: Pipeline) -> None:
        """Infer the round's images together, then aggregate, render, write and commit each job."""
        for work in round_.works:
            if not work.images:
                try:
                    self._finish_empty(work)
                except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
                    self._fail(work.job_id, exc)
        for work, scores in self._infer(pipeline, [w for w in round_.works if w.images]):
            if isinstance(scores, Exception):
                self._fail(work.job_id, scores)
                continue
            try:
                self._finish(work, scores, pipeline)
            except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
                self._fail(work.job_id, exc)

    # ---------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------

    def _infer(
        self, pipeline: Pipeline, works: list[Work]
    ) -> list[tuple[Work, list[ImageScore] | Exception]]:
        """Score the union of the jobs' images in shared batches; if that fails, each job alone,
        so the error lands on the job that caused it."""
        done = [(work, work.scores) for work in works if work.scores is not None]
        works = [work for work in works if work.scores is None]
        if not works:
            return list(done)
        images = [image for work in works for image in work.images]
        try:
            scores = pipeline.infer(images)
        except Exception as exc:  # noqa: BLE001 - each job is tried alone next, so its own error is kept
            log.warning(
                "batched inference of %d jobs failed (%s); scoring them one by one", len(works), describe(exc)
            )
        else:
            out: list[tuple[Work, list[ImageScore] | Exception]] = list(done)
            start = 0
            for work in works:
                out.append((work, scores[start : start + len(work.images)]))
                start += len(work.images)
            return out
        results: list[tuple[Work, list[ImageScore] | Exception]] = list(done)
        for work in works:
            try:
                results.append((work, pipeline.infer(work.images)))
            except Exception as exc:  # noqa: BLE001 - handed to _fail by the caller
                results.append((work, exc))
        return results

    def _aggregate(self, work: Work, scores: list[ImageScore], pipeline: Pipeline) -> StudyScore:
        # One study per job: files of a study that disagree on PatientID are still one exam.
        same_patient = [
            dataclasses.replace(s, meta=dataclasses.replace(s.meta, patient_id=work.patient_id))
            for s in scores
        ]
        (study,) = aggregate_studies(same_patient, pipeline.aggregation, pipeline.manifest.threshold)
        return study

    def _finish(self, work: Work, scores: list[ImageScore], pipeline: Pipeline) -> None:
        """Render the job's SCs and SR in the pool, write them, then commit scores, outputs,
        transmissions and states."""
        study_score = self._aggregate(work, scores, pipeline)
        for image in work.images:
            if image.dropped:
                log.warning(
                    "instance %s: attributes with invalid values left out of the results: %s",
                    image.meta.sop_instance_uid,
                    ", ".join(image.dropped),
                )
        result = pipeline.outputs(
            study_score,
            work.images,
            pool=self._pool,
            result_version=work.version,
            not_analysed=work.failures,
            expected_views=self.config.expected_views,
        )
        for failure in result.object_failures:
            log.warning("study %s version %d: %s", work.study_uid, work.version, failure)
        files = write_outputs(self.config.outbox_dir, work.study_uid, work.lateralities, result)
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
                    obj=obj,
                    outbox_path=path,
                    source_uids=sources,
                    destinations=self.config.destinations,
                )
                for kind, obj, path, sources in files
            ]
            state = self._update_study(session, work, StudyState.SCORED)
            self._audit_capture_failures(session, work, result)
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
                    "complete": result.complete,
                    "not_analysed": [f.sop_instance_uid for f in result.not_analysed],
                    "missing_views": list(result.missing_views),
                    "outputs": [o.sop_instance_uid for o in outputs],
                },
            )
            session.commit()
        metrics.record_job_scored(time.monotonic() - work.started, len(work.images))
        log.info(
            "study %s version %d scored: exam %.3f, %d outputs, study now %s",
            work.study_uid,
            work.version,
            study_score.exam_probability,
            len(outputs),
            state,
        )

    def _audit_capture_failures(self, session: Session, work: Work, result: StudyOutputs) -> None:
        for failure in result.capture_failures:
            audit.record(
                session,
                audit.IMAGE_FAILED,
                ACTOR,
                patient_id=work.patient_id,
                study_uid=work.study_uid,
                sop_instance_uid=failure.sop_instance_uid,
                details={"stage": "render", "reason": failure.reason, "job_id": work.job_id},
            )
            log.warning("no CAM capture for instance %s: %s", failure.sop_instance_uid, failure.reason)

    def _finish_empty(self, work: Work) -> None:
        """No image of the study could be scored: the job is done, without outputs."""
        with self.sessions() as session:
            if not self._complete_job(session, work):
                return
            state = self._update_study(session, work, StudyState.SKIPPED)
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

    def _complete_job(self, session: Session, work: Work) -> bool:
        """Mark the job done if this worker still holds its claim (False: leave it alone)."""
        done = session.execute(
            update(Job)
            .where(Job.id == work.job_id, Job.state == COMPLETE.old, Job.claimed_by == self.name)
            .values(state=COMPLETE.new, finished_at=utcnow(), error=None, model_version_id=self._model_id)
            .execution_options(synchronize_session=False)
        )
        if getattr(done, "rowcount", 0) != 1:
            session.rollback()
            log.warning(
                "job %d is no longer claimed by this worker; its results are not committed", work.job_id
            )
            return False
        return True

    def _update_study(self, session: Session, work: Work, state: StudyState) -> str:
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
        if state == StudyState.SCORED:
            session.execute(
                update(Study)
                .where(Study.id == work.study_id, Study.scored_version < work.version)
                .values(scored_version=work.version)
                .execution_options(synchronize_session=False)
            )
        new_state = StudyState.RECEIVING if late else state
        session.execute(  # from any state but receiving (STUDY_TRANSITIONS): a late image wins
            update(Study)
            .where(Study.id == work.study_id, Study.state != StudyState.RECEIVING)
            .values(state=new_state)
            .execution_options(synchronize_session=False)
        )
        return session.scalar(select(Study.state).where(Study.id == work.study_id)) or new_state

    def _fail(self, job_id: int, exc: BaseException) -> None:
        """The job failed as a whole: retry it by the kind of fault (:mod:`node.queue.retry`) and
        record why (job row, audit, log: all scrubbed of DICOM values). The worker carries on."""
        transient = is_transient(exc)
        now = utcnow()
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.CLAIMED or job.claimed_by != self.name:
                session.rollback()
                return
            study = session.get(Study, job.study_id)
            error = describe(exc, [study.patient_id] if study is not None else [])[:MAX_ERROR_CHARS]
            log.debug("job %d failed at %s", job_id, where(exc))
            job.error = error
            if transient:
                delay = transient_delay(job.retries)
                job.retries += 1
                final = False
            else:
                job.attempts += 1
                delay = failure_delay(job.attempts)
                final = job.attempts >= MAX_ATTEMPTS
            if final:
                job.state, job.finished_at = check_transition(job.state, JobState.FAILED), now
                log.error("job %d failed for good after %d attempts: %s", job_id, job.attempts, error)
            else:
                job.state = check_transition(job.state, JobState.PENDING)
                job.claimed_by, job.claimed_at, job.lease_expires_at = None, None, None
                job.next_attempt_at = now + dt.timedelta(seconds=delay)
                log.warning(
                    "job %d %s; retrying in %.0f s: %s",
                    job_id,
                    "met a transient fault"
                    if transient
                    else f"failed (attempt {job.attempts} of {MAX_ATTEMPTS})",
                    delay,
                    error,
                )
            if study is not None:
                if study.state != StudyState.RECEIVING:
                    settled = StudyState.FAILED if final else StudyState.QUEUED
                    study.state = check_transition(study.state, settled)
                if final or not transient or job.retries == 1:  # a long outage is audited once
                    audit.record(
                        session,
                        audit.STUDY_FAILED if final else audit.STUDY_DEFERRED,
                        ACTOR,
                        patient_id=study.patient_id,
                        study_uid=study.study_uid,
                        details={
                            "job_id": job_id,
                            "version": job.version,
                            "error": error,
                            "transient": transient,
                            "attempts": job.attempts,
                            "retry_in_seconds": None if final else round(delay, 1),
                        },
                    )
            session.commit()
