"""Decode in a pool of workers while the backend scores, with memory bounded however long the backlog.

Why processes by default: pylibjpeg-openjpeg decodes JPEG 2000 (the usual transfer syntax of
mammograms) while holding the GIL, so decode threads barely overlap. Measured on the reference
machine (2 vCPUs, AMD EPYC, quiet), decoding and preprocessing four 3328x2560 JPEG 2000 views took
3.8 s one after the other, 3.4 s on two threads and 2.7 s on two processes, and scoring the study
end to end 5.4-5.6 s serial, 4.9-5.7 s with threads and 3.6-4.3 s with processes (an image
decodes in ~1.2 s next to another instead of ~0.9 s alone, so two processes give 1.4x, not 2x).
The price of processes is
pickling each prepared image back (the windowed full-size image: tens of MB, a few ms) and a spawn
of about a second per worker, once. ``mammonode bench`` measures the three pool kinds on the
machine it runs on (``e2e.pools`` in its JSON). Processes also keep a decoder that crashes on a
hostile file from taking the node down: the pool is rebuilt and that file alone is reported.

Memory is bounded by a window: at most ``ahead`` images are submitted to the pool and not yet
taken by the scorer, plus at most one backend batch being assembled. The scorer sends the images
that could be prepared to the backend in chunks of ``pipeline.batch_size`` in input order, exactly
the chunks :meth:`Pipeline.infer` makes of the same list, so the scores are those of the sequential
path bit for bit (torch's numbers depend on which images share a batch, so the chunking matters).
While the backend runs on one chunk (ONNX Runtime and torch release the GIL), the workers already
decode the next ones.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar, cast

from pydicom.dataset import Dataset

from inference.dicom_io import read_dataset, read_meta
from inference.pipeline import Pipeline, PreparedImage, prepare_image
from inference.types import ImageMeta, ImageScore, InputError, PreprocessConfig

log = logging.getLogger(__name__)

PoolKind = Literal["process", "thread", "serial"]
POOL_KINDS: tuple[PoolKind, ...] = ("process", "thread", "serial")

S = TypeVar("S")
R = TypeVar("R")

Read = Callable[[S], tuple[Dataset, ImageMeta]]
"""Reads one source (a path, a spooled instance...) and checks it; raises InputError if unusable.
Must be picklable for a process pool: a module-level function or a functools.partial of one."""


def usable_cpus() -> int:
    """CPUs this process may run on (affinity, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


PARENT_POLL_SECONDS = 1.0


def _init_worker(parent: int) -> None:
    """Runs once in each worker process: one OpenCV thread (the pool is the parallelism), the
    decoders imported before the first image so no task pays for the imports, and a watch on the
    parent. A worker outlives a parent that was killed (kill -9, OOM): it holds both ends of its
    task pipe, so it never sees end-of-file and would wait forever; it exits instead."""
    import cv2

    import inference.preprocessing
    import inference.voi  # noqa: F401

    cv2.setNumThreads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _noop() -> None:
    return None


@dataclass
class PoolStats:
    """What the pool and the scorer did (instrumentation for tests and the bench)."""

    submitted: int = 0
    max_in_flight: int = 0  # images submitted and not yet taken; never above ``ahead``
    max_held: int = 0  # in flight + waiting for a backend batch; never above ahead + batch size
    batches: list[int] = field(default_factory=list)  # sizes of the batches sent to the backend
    restarts: int = 0  # process pools rebuilt after a worker died


class DecodePool:
    """Ordered, bounded parallel map for decoding: ``workers`` processes (or threads, or the calling
    thread for ``serial``) and at most ``ahead`` tasks submitted and not yet consumed.

    The executor starts at the first use and lives until :meth:`close`, so a node pays the spawn
    once. Processes are spawned (not forked), which is safe in the node's multi-threaded process.
    Several threads may run :meth:`imap` on one pool (each keeps its own window); ``stats`` and
    ``in_flight`` are then approximate.
    """

    def __init__(
        self, kind: PoolKind = "process", workers: int | None = None, ahead: int | None = None
    ) -> None:
        if kind not in POOL_KINDS:
            raise ValueError(f"pool kind must be one of {', '.join(POOL_KINDS)}, got {kind!r}")
        self.kind = kind
        self.workers = workers or usable_cpus()
        self.ahead = ahead or 2 * self.workers
        if self.workers < 1 or self.ahead < 1:
            raise ValueError(f"workers and ahead must be >= 1, got {self.workers}, {self.ahead}")
        self.stats = PoolStats()
        self.in_flight = 0
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _pool(self) -> Executor:
        with self._lock:
            if self._executor is None:
                if self.kind == "process":
                    self._executor = ProcessPoolExecutor(
                        self.workers,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_init_worker,
                        initargs=(os.getpid(),),
                    )
                else:
                    self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="mammonode-decode")
            return self._executor

    def _restart(self) -> None:
        """Drop a broken process pool (the next use starts a new one); a pool another thread has
        already replaced is left alone."""
        with self._lock:
            if self._executor is not None and getattr(self._executor, "_broken", False):
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
                self.stats.restarts += 1

    def warm(self) -> None:
        """Start the workers now (a spawned process imports numpy, OpenCV and the decoders: about a
        second), so that the first images do not wait for it. Best effort for every worker."""
        if self.kind == "serial":
            return
        pool = self._pool()
        for future in [pool.submit(_noop) for _ in range(2 * self.workers)]:
            future.result()

    def close(self) -> None:
        """Stop the workers (waits for running tasks)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def imap(self, fn: Callable[[S], R], items: Iterable[S]) -> Iterator[tuple[S, R | Exception]]:
        """``(item, fn(item))`` in input order, the exception instead of the result when ``fn``
        raised. At most ``ahead`` items are submitted and not yet yielded.

        A worker process that dies (a decoder crashing on a hostile file) breaks the whole pool;
        the pool is rebuilt and the items that were in flight are run again one at a time, so the
        file that kills a worker on its own is reported (InputError) and the others are not.
        """
        if self.kind == "serial":
            for item in items:
                self._note(1)
                outcome = _call(fn, item)
                self.in_flight = 0
                yield item, outcome
            return
        window: deque[tuple[S, Future[R]]] = deque()
        source = iter(items)
        try:
            while True:
                for item in itertools.islice(source, self.ahead - len(window)):
                    window.append((item, self._pool().submit(fn, item)))
                    self.stats.submitted += 1
                    self._note(len(window))
                if not window:
                    return
                item, future = window.popleft()
                self.in_flight = len(window)
                try:
                    result: R | Exception = future.result()
                except BrokenProcessPool:
                    affected = [item, *(i for i, _ in window)]
                    window.clear()
                    self.in_flight = 0
                    log.warning("a decode worker died; retrying %d image(s) one at a time", len(affected))
                    self._restart()
                    for again in affected:
                        yield again, self._isolated(fn, again)
                    continue
                except Exception as exc:  # noqa: BLE001 - the task's own error, handed to the caller
                    result = exc
                yield item, result
        finally:
            for _, pending in window:
                pending.cancel()
            self.in_flight = 0

    def _isolated(self, fn: Callable[[S], R], item: S) -> R | Exception:
        try:
            return self._pool().submit(fn, item).result()
        except BrokenProcessPool:
            self._restart()
            return InputError("the decoder process died on this file")
        except Exception as exc:  # noqa: BLE001 - the task's own error, handed to the caller
            return exc

    def _note(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.stats.max_in_flight = max(self.stats.max_in_flight, in_flight)


def _call(fn: Callable[[S], R], item: S) -> R | Exception:
    try:
        return fn(item)
    except Exception as exc:  # noqa: BLE001 - the task's own error, handed to the caller
        return exc


_shared: dict[tuple[PoolKind, int], DecodePool] = {}
_shared_lock = threading.Lock()


def shared_pool(kind: PoolKind = "process", workers: int | None = None) -> DecodePool:
    """One pool per (kind, workers) for the whole process (the node's worker, however many times it
    is created), closed at exit."""
    key = (kind, workers or usable_cpus())
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None:
            pool = _shared[key] = DecodePool(kind, key[1])
            atexit.register(pool.close)
        return pool


def load_source(
    source: S, *, read: Read[S], config: PreprocessConfig | None
) -> PreparedImage | tuple[Dataset, ImageMeta]:
    """The decode workers' task: read and check ``source``, then decode and preprocess it on the
    CPU (:func:`~inference.pipeline.prepare_image`); with ``config`` None only read (DALI prepares)."""
    dataset, meta = read(source)
    return (dataset, meta) if config is None else prepare_image(dataset, meta, config)


@dataclass
class Scored(Generic[S]):
    """One source's outcome: prepared and scored, or the error that stopped it."""

    source: S
    prepared: PreparedImage | None = None
    score: ImageScore | None = None
    error: Exception | None = None


def score_stream(
    pipeline: Pipeline,
    sources: Iterable[S],
    read: Read[S],
    *,
    pool: DecodePool,
    accept: Callable[[ImageMeta], None] | None = None,
    group: Callable[[S], Hashable] | None = None,
) -> Iterator[Scored[S]]:
    """Read, prepare and score ``sources``: decoding in ``pool``, scoring in the calling thread.

    Failures are yielded when reached (``error``: what ``read`` or the preprocessing raised, or
    what ``accept`` raised; ``accept`` runs in this thread, in input order, on each image before
    it joins a batch). Scored images are yielded batch by batch, in input order; errors of the
    backend itself propagate. With DALI in the pipeline the workers only read, and each batch is
    prepared and scored by :meth:`Pipeline.prepare_and_infer`.

    With ``group`` (e.g. the study of a source, sources ordered by it) a batch never holds two
    groups, so a study's scores do not depend on which other studies were scored in the same run:
    torch's CPU kernels give slightly different numbers for an image in different batches (up to
    ~2e-3 in the logit), and the same inputs must give the same pictures under the same UIDs.
    """
    config = None if pipeline.dali is not None else pipeline.manifest.preprocess
    task = functools.partial(load_source, read=read, config=config)
    batch: list[tuple[S, PreparedImage | tuple[Dataset, ImageMeta]]] = []
    for source, result in pool.imap(task, sources):
        if isinstance(result, Exception):
            yield Scored(source, error=result)
            continue
        if accept is not None:
            try:
                accept(result.meta if isinstance(result, PreparedImage) else result[1])
            except InputError as exc:
                yield Scored(source, error=exc)
                continue
        if batch and group is not None and group(batch[0][0]) != group(source):
            yield from _score_batch(pipeline, batch, pool.stats)
            batch = []
        batch.append((source, result))
        pool.stats.max_held = max(pool.stats.max_held, pool.in_flight + len(batch))
        if len(batch) == pipeline.batch_size:
            yield from _score_batch(pipeline, batch, pool.stats)
            batch = []
    if batch:
        yield from _score_batch(pipeline, batch, pool.stats)


def _score_batch(
    pipeline: Pipeline, batch: list[tuple[S, PreparedImage | tuple[Dataset, ImageMeta]]], stats: PoolStats
) -> Iterator[Scored[S]]:
    stats.batches.append(len(batch))
    if pipeline.dali is None:
        prepared = [cast(PreparedImage, item) for _, item in batch]
        for (source, image), score in zip(batch, pipeline.infer(prepared), strict=True):
            yield Scored(source, cast(PreparedImage, image), score)
        return
    result = pipeline.prepare_and_infer([cast(tuple[Dataset, ImageMeta], item) for _, item in batch])
    failed = dict(result.failures)
    done = iter(zip(result.prepared, result.scores, strict=True))
    for index, (source, _) in enumerate(batch):
        if index in failed:
            yield Scored(source, error=failed[index])
        else:
            image, score = next(done)
            yield Scored(source, image, score)


def read_path(path: Path) -> tuple[Dataset, ImageMeta]:
    """The plain :data:`Read`: a DICOM file and its identifying tags (no other check)."""
    dataset = read_dataset(path)
    return dataset, read_meta(dataset)
