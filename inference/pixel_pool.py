"""A pool of child processes for all pixel work: decoding, preprocessing, CAM rendering and the
encoding of result objects (design invariant 8: a codec cannot take the node down).

Why processes: a C extension (a JPEG 2000, JPEG-LS or RLE codec) that aborts, segfaults or is
killed for memory takes only its child with it. The pool is rebuilt and the items that were in
flight are run again one at a time, so the one item that kills a child on its own is reported as
an :class:`~inference.types.InputError` and every other item still gets its result. Processes also
overlap: pylibjpeg-openjpeg decodes JPEG 2000 while holding the GIL, so threads barely do.
Measured on the reference machine (2 vCPUs, AMD EPYC, quiet), decoding and preprocessing four
3328x2560 JPEG 2000 views took 3.8 s one after the other, 3.4 s on two threads and 2.7 s on two
processes. The price of processes is pickling arguments and results (a few ms) and a spawn of
about a second per worker, once. ``thread`` and ``serial`` pools exist for the bench and for
tests; the node and the CLI use processes.

Memory is bounded by a window: at most ``ahead`` items are submitted and not yet consumed.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from inference.types import InputError

log = logging.getLogger(__name__)

S = TypeVar("S")
R = TypeVar("R")

PoolKind = Literal["process", "thread", "serial"]
POOL_KINDS: tuple[PoolKind, ...] = ("process", "thread", "serial")
CHILD_DIED = "the pixel-work process died on this item (decoder or encoder crash, or killed for memory)"

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations above this are mmapped and go back to the system when freed. glibc's default
threshold grows with the largest block freed (up to 32 MB), after which every decoded image lives
in a heap that fragments and never shrinks: a node that had scored a burst of mammograms stayed at
over a gigabyte when idle."""


_M_TRIM_THRESHOLD = -1
CHILD_MMAP_THRESHOLD_BYTES = 64 << 20
"""In the pool's children, allocations up to this size come from the heap, and the heap is not
trimmed while a task runs. A task's arrays (a decoded level, its windowed copy, a capture's RGB
picture) then reuse pages the task already touched; as fresh maps, every page of every array was
faulted in anew, 13 % of a JPEG 2000 load task (measured at 3328x2560). Children hand their
freed memory back after every task (:func:`release_memory`), so an idle child holds no more than
under :data:`MMAP_THRESHOLD_BYTES`; fixed thresholds also stop glibc's dynamic growth."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def limit_heap_growth() -> None:
    """Keep large arrays out of the heap (see :data:`MMAP_THRESHOLD_BYTES`); glibc only."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _heap_per_task() -> None:
    """The children's heap policy (:data:`CHILD_MMAP_THRESHOLD_BYTES`); glibc only."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, CHILD_MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * CHILD_MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Give freed heap pages back to the system (glibc ``malloc_trim``); cheap next to a decode."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


PARENT_POLL_SECONDS = 1.0
ISOLATION_ATTEMPTS = 8
"""Runs of one item after a child death before it is blamed even though other threads' tasks ran
beside it (a bound, so a busy pool cannot keep an isolation going forever)."""


def _init_worker(parent: int) -> None:
    """Runs once in each worker process: one OpenCV thread (the pool is the parallelism), the
    decoders imported before the first image so no task pays for the imports, and a watch on the
    parent. A worker outlives a parent that was killed (kill -9, OOM): it holds both ends of its
    task pipe, so it never sees end-of-file and would wait forever; it exits instead."""
    import cv2

    import inference.preprocessing
    import inference.voi  # noqa: F401
    from inference.phi import quiet_value_checks

    cv2.setNumThreads(1)
    _heap_per_task()
    quiet_value_checks()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _noop() -> None:
    return None


def _in_child(fn: Callable[[S], R], item: S) -> R:
    """A task as a child runs it: the work, then the freed memory handed back to the system."""
    try:
        return fn(item)
    finally:
        release_memory()


@dataclass
class PoolStats:
    """What the pool and the scorer did (instrumentation for tests and the bench)."""

    submitted: int = 0
    max_in_flight: int = 0  # images submitted and not yet taken; never above ``ahead``
    max_held: int = 0  # in flight + waiting for a backend batch; never above ahead + batch size
    batches: list[int] = field(default_factory=list)  # sizes of the batches sent to the backend
    restarts: int = 0  # process pools rebuilt after a worker died


class PixelPool:
    """Ordered, bounded parallel map for pixel work: ``workers`` processes (or threads, or the calling
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
        self._alone = threading.Lock()
        """Held while an item runs alone to learn whether it kills its child (one at a time)."""
        self._running = 0  # tasks submitted and not finished, from every thread (under _lock)
        self._submissions = 0  # tasks ever submitted (under _lock)
        self._last_used = time.monotonic()

    def __enter__(self) -> PixelPool:
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
                    self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="mammonode-pixels")
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

    def close_if_idle(self, seconds: float) -> bool:
        """Stop the workers if nothing was submitted for ``seconds``; the next use starts them
        again (about a second). A node between bursts then holds no child processes, whose heaps
        keep what the largest images needed."""
        with self._lock:
            idle = self._executor is not None and self.in_flight == 0
            idle = idle and time.monotonic() - self._last_used >= seconds
        if idle:
            self.close()
            log.debug("pixel pool closed after %.0f s idle", seconds)
        return idle

    def close(self) -> None:
        """Stop the workers (waits for running tasks)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def imap(self, fn: Callable[[S], R], items: Iterable[S]) -> Iterator[tuple[S, R | Exception]]:
        """``(item, fn(item))`` in input order, the exception instead of the result when ``fn``
        raised. At most ``ahead`` items are submitted and not yet yielded.

        A worker process that dies (a codec aborting on a hostile file, a kill for memory) breaks
        the whole pool; the pool is rebuilt and the items that were in flight are run again one at
        a time, so the item that kills a worker on its own is reported (InputError,
        :data:`CHILD_DIED`) and the others are not.
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
                    window.append((item, self._submit(fn, item)))
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
                    log.warning(
                        "a pixel-work process died; pool rebuilt, %d item(s) run again one at a time",
                        len(affected),
                    )
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

    def _submit(self, fn: Callable[[S], R], item: S) -> Future[R]:
        """Submit one task; a pool that broke since the last submission (a child died while the
        results before it were being read) is rebuilt first. Tasks still in flight on the broken
        pool fail when they are read and are then run again one at a time."""
        self._last_used = time.monotonic()
        try:
            return self._submit_to(self._pool(), fn, item)
        except BrokenProcessPool:
            self._restart()
            return self._submit_to(self._pool(), fn, item)

    def _submit_to(self, executor: Executor, fn: Callable[[S], R], item: S) -> Future[R]:
        future = executor.submit(_in_child, fn, item) if self.kind == "process" else executor.submit(fn, item)
        with self._lock:
            self._running += 1
            self._submissions += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future[Any]) -> None:
        with self._lock:
            self._running -= 1

    def _isolated(self, fn: Callable[[S], R], item: S) -> R | Exception:
        """Run ``item`` again to learn whether it kills its child. The pool may serve several
        threads: a child death is blamed on ``item`` only if ``item`` was the only task in the
        pool while it ran; otherwise it is run again (isolated runs take turns, and the other
        threads' tasks, broken by the same death, wait for their own turn)."""
        with self._alone:
            for attempt in range(ISOLATION_ATTEMPTS):
                with self._lock:
                    before = self._submissions
                alone = False
                try:
                    future = self._submit(fn, item)
                    with self._lock:
                        alone = self._running == 1 and self._submissions == before + 1
                    result = future.result()
                except BrokenProcessPool:
                    with self._lock:
                        alone = alone and self._submissions == before + 1
                    self._restart()
                    if not alone and attempt + 1 < ISOLATION_ATTEMPTS:
                        continue
                    log.warning("a pixel-work process died on one item; that item fails alone")
                    return InputError(CHILD_DIED)
                except Exception as exc:  # noqa: BLE001 - the task's own error, handed to the caller
                    return exc
                return result
        return InputError(CHILD_DIED)  # not reached: the last attempt returns

    def _note(self, in_flight: int) -> None:
        self.in_flight = in_flight
        self.stats.max_in_flight = max(self.stats.max_in_flight, in_flight)


def _call(fn: Callable[[S], R], item: S) -> R | Exception:
    try:
        return fn(item)
    except Exception as exc:  # noqa: BLE001 - the task's own error, handed to the caller
        return exc


_shared: dict[tuple[PoolKind, int], PixelPool] = {}
_shared_lock = threading.Lock()


def shared_pool(kind: PoolKind = "process", workers: int | None = None) -> PixelPool:
    """One pool per (kind, workers) for the whole process (the node's worker, however many times it
    is created), closed at exit."""
    key = (kind, workers or usable_cpus())
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None:
            pool = _shared[key] = PixelPool(kind, key[1])
            atexit.register(pool.close)
        return pool
