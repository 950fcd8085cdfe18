"""A pixel pool that records its decode tasks, for tests of what overlaps what.

It is a real :class:`PixelPool` of threads (so a test can see the tasks from this process) that
notes, in one ordered list shared with the test, when each decode task starts and ends, for which
study, from which thread it was asked for and with which preprocessing. A test adds its own marks
(a commit, a write) to the same list. Decodes of a study can be held at a gate, or made to fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from inference.pixel_pool import PixelPool

S = TypeVar("S")
R = TypeVar("R")

GATE_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Mark:
    what: str  # "decode-start", "decode-end", or the test's own ("commit", "write", "infer"...)
    study: str
    thread: str = ""  # the thread that asked for the decode (e.g. "mammonode-prefetch")
    config: Any = None  # the preprocessing the decode ran with


class RecordingPool(PixelPool):
    """Threads that run the tasks as a process pool would, recording the decodes.

    ``study_of`` names the study of a task's item, or None for a task that is not a decode (the
    rendering of results), which runs unrecorded.
    """

    def __init__(self, study_of: Callable[[Any], str | None], workers: int = 2) -> None:
        super().__init__("thread", workers)
        self.study_of = study_of
        self.marks: list[Mark] = []
        self.gates: dict[str, threading.Event] = {}
        """Decodes of these studies wait until the event is set."""
        self.failures: dict[str, Exception] = {}
        """Decodes of these studies raise this (as a decoder child could)."""
        self._marks_lock = threading.Lock()

    def mark(self, what: str, study: str, thread: str = "", config: Any = None) -> None:
        with self._marks_lock:
            self.marks.append(Mark(what, study, thread, config))

    def index(self, what: str, study: str) -> list[int]:
        """Positions of the marks ``what`` of ``study``, in order."""
        with self._marks_lock:
            return [i for i, m in enumerate(self.marks) if m.what == what and m.study == study]

    def of(self, what: str, study: str) -> list[Mark]:
        with self._marks_lock:
            return [m for m in self.marks if m.what == what and m.study == study]

    def imap(self, fn: Callable[[S], R], items: Iterable[S]) -> Iterator[tuple[S, R | Exception]]:
        caller = threading.current_thread().name
        config = getattr(fn, "keywords", {}).get("config")

        def task(item: S) -> R:
            study = self.study_of(item)
            if study is None:
                return fn(item)
            self.mark("decode-start", study, caller, config)
            try:
                gate = self.gates.get(study)
                if gate is not None and not gate.wait(GATE_TIMEOUT_SECONDS):
                    raise TimeoutError(f"gate of {study} never opened")
                if study in self.failures:
                    raise self.failures[study]
                return fn(item)
            finally:
                self.mark("decode-end", study, caller, config)

        return super().imap(task, items)
