"""Decode in the pixel pool while the backend scores, with memory bounded however long the backlog.

The pool (:mod:`inference.pixel_pool`) decodes and preprocesses in child processes; at most
``ahead`` images are submitted and not yet taken by the scorer, plus at most one backend batch
being assembled. The scorer sends the images that could be prepared to the backend in chunks of
``pipeline.batch_size`` in input order, exactly the chunks :meth:`Pipeline.infer` makes of the
same list, so the scores are those of the sequential path bit for bit (torch's numbers depend on
which images share a batch, so the chunking matters). While the backend runs on one chunk (ONNX
Runtime and torch release the GIL), the workers already decode the next ones. Measured on the
reference machine, scoring a 4-view 3328x2560 JPEG 2000 study end to end took 5.4-5.6 s serial,
4.9-5.7 s with threads and 3.6-4.3 s with processes (an image decodes in ~1.2 s next to another
instead of ~0.9 s alone, so two processes give 1.4x, not 2x); ``mammonode bench`` measures the
pool kinds on the machine it runs on (``e2e.pools`` in its JSON).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

from pydicom.dataset import Dataset

from inference.dicom_header import read_dataset, read_meta
from inference.pipeline import Pipeline, PreparedImage, prepare_image
from inference.pixel_pool import PixelPool, PoolStats
from inference.types import ImageMeta, ImageScore, InputError, PreprocessConfig

S = TypeVar("S")

Read = Callable[[S], tuple[Dataset, ImageMeta]]
"""Reads one source (a path, a spooled instance...) and checks it; raises InputError if unusable.
Must be picklable for a process pool: a module-level function or a functools.partial of one."""


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
    pool: PixelPool,
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
