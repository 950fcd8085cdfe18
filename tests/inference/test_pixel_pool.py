"""A pixel-work child that aborts fails only the item it held (design invariant 8).

The tasks below run in spawned children: a spawned child imports this module by name (pytest
puts its folder on ``sys.path``, which spawn hands to the child), so module-level functions serve
as tasks. ``os.abort()`` is what a C++ codec's uncaught exception does (gdcm's RLE encoder did it
on every odd-sized capture).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from peers import write_study

import inference.pipeline
from inference.aggregation import aggregate_studies
from inference.backends.loader import load_backend
from inference.dicom_header import read_dataset, read_meta
from inference.pipeline import Pipeline, prepare_image
from inference.pixel_pool import CHILD_DIED, PixelPool
from inference.rendering import Capture, CaptureTask, render_capture
from inference.types import InputError

ABORT_ON = 3


def square_or_abort(n: int) -> int:
    if n == ABORT_ON:
        os.abort()
    return n * n


def test_an_aborting_child_fails_only_its_item_and_the_pool_is_rebuilt() -> None:
    with PixelPool("process", workers=2, ahead=4) as pool:
        results = dict(pool.imap(square_or_abort, range(8)))
        assert pool.stats.restarts >= 1
        assert isinstance(results[ABORT_ON], InputError) and str(results[ABORT_ON]) == CHILD_DIED
        assert {n: r for n, r in results.items() if n != ABORT_ON} == {
            n: n * n for n in range(8) if n != ABORT_ON
        }
        # The rebuilt pool keeps working.
        assert [r for _, r in pool.imap(square_or_abort, [5, 6])] == [25, 36]


ABORTING_SOURCE = "abort-me"


def render_or_abort(task: CaptureTask) -> Capture:
    """The capture renderer, except that it dies like an aborting encoder on one chosen image."""
    if task.source.get("ImageComments") == ABORTING_SOURCE:
        os.abort()
    return render_capture(task)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("pool-study"), patient_id="POOL-1", study_uid="1.2.826.0.1.77")


@pytest.fixture
def pool() -> Iterator[PixelPool]:
    with PixelPool("process", workers=2) as p:
        yield p


def test_a_capture_whose_child_dies_is_left_out_and_the_report_says_so(
    study: list[Path], test_model: Path, pool: PixelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = Pipeline(load_backend("torch", test_model))
    prepared = []
    for path in study:
        ds = read_dataset(path)
        prepared.append(prepare_image(ds, read_meta(ds), pipeline.manifest.preprocess))
    victim = prepared[1]
    victim.dataset.ImageComments = ABORTING_SOURCE
    (score,) = aggregate_studies(pipeline.infer(prepared), pipeline.aggregation, pipeline.manifest.threshold)
    monkeypatch.setattr(inference.pipeline, "render_capture", render_or_abort)

    result = pipeline.outputs(score, prepared, pool=pool)

    victim_uid = victim.meta.sop_instance_uid
    by_source = {
        i.meta.sop_instance_uid: sc for i, sc in zip(score.images, result.secondary_captures, strict=True)
    }
    assert by_source[victim_uid] is None
    assert all(sc is not None for uid, sc in by_source.items() if uid != victim_uid)
    assert [f.sop_instance_uid for f in result.capture_failures] == [victim_uid]
    assert result.capture_failures[0].reason == CHILD_DIED
    report = result.report.dataset()
    texts = [str(item.get("TextValue", "")) for item in report.ContentSequence[-1].ContentSequence]
    assert any(victim_uid in t and "No CAM image" in t for t in texts), texts
    # Every image was analysed and all four views are in: the report itself is complete.
    assert result.complete and report.CompletionFlag == "COMPLETE"
    assert np.isfinite(score.exam_probability)


def slow_square_or_abort(n: int) -> int:
    time.sleep(0.2)
    return square_or_abort(n)


def test_a_child_death_is_blamed_on_its_item_when_threads_share_the_pool() -> None:
    """The node's worker decodes the next round in one thread while another renders the current
    one's captures in the same pool: a child that dies on one thread's item fails that item only,
    not one of the other thread's that was run again beside it."""
    out: dict[str, dict[int, int | Exception]] = {}

    def run(name: str, items: list[int]) -> None:
        out[name] = dict(pool.imap(slow_square_or_abort, items))

    with PixelPool("process", workers=2, ahead=4) as pool:
        pool.warm()
        threads = [
            threading.Thread(target=run, args=("hostile", [1, ABORT_ON, 5])),
            threading.Thread(target=run, args=("innocent", [10, 11, 12, 13])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert isinstance(out["hostile"][ABORT_ON], InputError)
    assert (out["hostile"][1], out["hostile"][5]) == (1, 25)
    assert out["innocent"] == {n: n * n for n in (10, 11, 12, 13)}
