"""The worker's rounds, and the next one claimed and decoded while the current one is scored.

A round is the jobs one backend batch takes: claimed until their images fill ``batch_size``, each
prepared (decoded) by :mod:`node.queue.preparation`. Scoring a round is more than decoding: the
backend pass, the SC and SR rendering (in the pixel pool, one task per object), writing the
outbox and committing; through the parts that run in this process a pool child would sit idle.
So while round N is scored, a thread of the worker claims round N+1 and decodes its images in the
same pool (:meth:`PixelPool.imap` may run in several threads); round N+1 then starts with its
inputs ready. The worker waits for that thread before its round ends, so no thread outlives a
round, and at most one round is held ahead: memory stays bounded whatever the backlog.

The claims held ahead are leases like any other; the worker's heartbeat renews every claim under
its name. They were prepared for one preprocessing: a round taken under a model whose
preprocessing differs (a promotion between two rounds) is decoded again for it. Stopping
(:meth:`Rounds.close`) ends the thread between two images and gives the claims held ahead back,
pending and uncharged, so a stopped node leaves nothing claimed until its lease lapses. A DALI
pipeline is never run ahead: its preparation is the backend pass itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from inference import Pipeline, PreprocessConfig, describe
from node.queue.claims import claim_job, release_claims
from node.queue.preparation import Interrupted, Preparer, Work

log = logging.getLogger(__name__)

Fail = Callable[[int, BaseException], None]
"""Records that a job failed as a whole (the worker's ``_fail``)."""


def prepared_for(pipeline: Pipeline) -> PreprocessConfig | None:
    """What a job's prepared images depend on: the preprocessing (None with DALI, which scores as
    it prepares, so its results are never reused for another pipeline)."""
    return None if pipeline.dali is not None else pipeline.manifest.preprocess


@dataclass
class Round:
    """The jobs claimed for one scoring round and what preparing them gave."""

    works: list[Work] = field(default_factory=list)
    claimed: int = 0
    """Jobs claimed for the round, those that failed while being prepared included."""
    prepared_for: PreprocessConfig | None = None

    @property
    def n_images(self) -> int:
        return sum(len(work.images) for work in self.works)

    @property
    def job_ids(self) -> list[int]:
        return [work.job_id for work in self.works]


class Rounds:
    """Where the worker's rounds come from: the one prepared ahead, else one claimed now."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        worker: str,
        lease_seconds: float,
        preparer: Preparer,
        fail: Fail,
    ) -> None:
        self._sessions = sessions
        self._worker = worker
        self._lease_seconds = lease_seconds
        self._preparer = preparer
        self._fail = fail
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ahead: Round | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def held(self) -> list[int]:
        """The jobs of the round held ahead (claimed and prepared, not yet scored)."""
        with self._lock:
            return self._ahead.job_ids if self._ahead is not None else []

    def next(self, pipeline: Pipeline) -> Round:
        """The round held ahead (decoded again if it was prepared for another preprocessing),
        else one claimed and prepared now."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is None or not ahead.claimed:
            return self.claim(pipeline)
        if ahead.works and (ahead.prepared_for is None or ahead.prepared_for != prepared_for(pipeline)):
            log.info("model preprocessing changed: preparing %d claimed job(s) again", len(ahead.works))
            again = Round(claimed=ahead.claimed, prepared_for=prepared_for(pipeline))
            for work in ahead.works:
                self._add(again, work.job_id, pipeline)
            return again
        return ahead

    def claim(self, pipeline: Pipeline) -> Round:
        """Claim jobs until their images fill a backend batch, each prepared for ``pipeline``; a
        job that fails as a whole is failed at once, the others are kept."""
        round_ = Round(prepared_for=prepared_for(pipeline))
        while round_.n_images < pipeline.batch_size and not self._stop.is_set():
            job_id = claim_job(self._sessions, self._worker, self._lease_seconds)
            if job_id is None:
                break
            round_.claimed += 1
            self._add(round_, job_id, pipeline)
        return round_

    def _add(self, round_: Round, job_id: int, pipeline: Pipeline) -> None:
        try:
            round_.works.append(self._preparer.prepare(job_id, pipeline, self._stop))
        except Interrupted:
            self._give_back([job_id])
        except Exception as exc:  # noqa: BLE001 - recorded on the job; the node keeps serving
            self._fail(job_id, exc)

    def start_ahead(self, pipeline: Pipeline) -> None:
        """Claim and prepare the next round in a thread (not when stopping, nor with DALI)."""
        if self._stop.is_set() or pipeline.dali is not None or self._thread is not None:
            return
        thread = threading.Thread(
            target=self._run_ahead, args=(pipeline,), name="mammonode-prefetch", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run_ahead(self, pipeline: Pipeline) -> None:
        try:
            round_ = self.claim(pipeline)
        except Exception as exc:  # noqa: BLE001 - its claims are requeued before the next round
            log.warning("could not claim the next round ahead: %s", describe(exc))
            return
        with self._lock:
            self._ahead = round_

    def wait_ahead(self) -> None:
        """Wait for the round being prepared ahead; when stopping, give its claims back."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        if self._stop.is_set():
            self._release_ahead()

    def close(self) -> None:
        """Stop: no more claims, the thread ends between two images, and the round held ahead is
        given back (by :meth:`wait_ahead` if a round is being scored, else now)."""
        self._stop.set()
        if self._thread is None:
            self._release_ahead()

    def release_held(self) -> None:
        """Give back the round held ahead (the next round cannot run: its model did not load)."""
        self._release_ahead()

    def _release_ahead(self) -> None:
        with self._lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._give_back(ahead.job_ids)

    def _give_back(self, job_ids: list[int]) -> None:
        try:
            release_claims(self._sessions, self._worker, job_ids)
        except Exception as exc:  # noqa: BLE001 - the leases lapse and another worker takes them
            log.warning("could not give back claimed jobs %s: %s", job_ids, describe(exc))
