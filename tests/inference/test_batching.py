"""Decode pool and streamed scoring: the same results as the sequential path, bounded memory,
errors per image, and a crashing decoder that costs one file, not the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mg_source_factory import make_dx_mg
from pydicom.dataset import Dataset

from inference.backends.base import check_batch
from inference.batching import read_path, score_stream
from inference.manifest import ModelManifest
from inference.pipeline import Pipeline, PreparedImage
from inference.pixel_pool import PixelPool, PoolKind
from inference.types import SCREENING_VIEWS, ImageMeta, ImageScore, InputError, PreprocessConfig
from inference.uids import derive_uid

GRID = (128, 64)
VIEWS = [(side, view) for side, view in (key.split("-") for key in SCREENING_VIEWS)]
J2K = "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 4-view studies and a 3-image one (explicit VR, distinct noisy pixels), with a file that
    is not DICOM in the middle."""
    root = tmp_path_factory.mktemp("batching")
    rng = np.random.default_rng(0)
    paths: list[Path] = []
    for study in range(3):
        study_uid = derive_uid("tests", "batching", str(study))
        for index, (laterality, view) in enumerate(VIEWS[: 4 if study < 2 else 3], start=1):
            ds = make_dx_mg(laterality, view, patient_id=f"P{study}", study_uid=study_uid, index=index)
            pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.int32)
            noisy = np.clip(pixels + rng.integers(0, 400, pixels.shape), 0, 2**14 - 1).astype(np.uint16)
            ds.PixelData = noisy.tobytes()
            path = root / f"s{study}_{laterality}_{view}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        if study == 0:
            broken = root / "broken.dcm"
            broken.write_bytes(b"not a DICOM file at all" * 10)
            paths.append(broken)
    return paths


@pytest.fixture(scope="module")
def torch_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The torch backend on a calibrated model: its numbers depend on which images share a batch,
    so only the very chunks of the sequential path give the very same scores."""
    pytest.importorskip("torch")
    from model_factory import save_calibrated_model

    from inference.backends.loader import load_backend

    model_dir = save_calibrated_model(tmp_path_factory.mktemp("model") / "m", grid=GRID, seed=3)
    return Pipeline(load_backend("torch", model_dir), batch_size=3)


class FakeBackend:
    """Deterministic and instant: logit = mean pixel, CAM = 4x4 block means."""

    name = "fake"
    max_batch = 64

    def __init__(self) -> None:
        self.manifest = ModelManifest(
            name="fake", version="1", architecture="efficientnet_b0", preprocess=PreprocessConfig(*GRID)
        )

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = check_batch(batch, self.manifest)
        cams = arr[:, 0].reshape(len(arr), GRID[0] // 4, 4, GRID[1] // 4, 4).mean(axis=(2, 4))
        return arr.mean(axis=(1, 2, 3)), cams


def _sequential(
    pipeline: Pipeline, paths: list[Path]
) -> tuple[list[Path], list[tuple[PreparedImage, ImageScore]], dict[Path, str]]:
    """The reference: prepare each file in order, then one Pipeline.infer over the good ones."""
    good: list[Path] = []
    prepared: list[PreparedImage] = []
    errors: dict[Path, str] = {}
    for path in paths:
        try:
            prepared.append(pipeline.prepare(*read_path(path)))
            good.append(path)
        except InputError as exc:
            errors[path] = str(exc)
    return good, [*zip(prepared, pipeline.infer(prepared), strict=True)], errors


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_streamed_scores_are_the_sequential_scores_bit_for_bit(
    kind: PoolKind, torch_pipeline: Pipeline, sources: list[Path]
) -> None:
    good, expected, errors = _sequential(torch_pipeline, sources)
    with PixelPool(kind, workers=2, ahead=3) as pool:
        results = list(score_stream(torch_pipeline, sources, read_path, pool=pool))

    assert sorted(r.source for r in results) == sorted(sources)
    failed = {r.source: str(r.error) for r in results if r.error is not None}
    assert failed == errors and len(failed) == 1  # the broken file, with the sequential message
    scored = [r for r in results if r.error is None]
    assert [r.source for r in scored] == good  # input order
    for item, (prepared, score) in zip(scored, expected, strict=True):
        assert item.prepared is not None and item.score is not None
        assert item.score.logit == score.logit and item.score.probability == score.probability
        np.testing.assert_array_equal(item.score.cam, score.cam)
        np.testing.assert_array_equal(item.prepared.model_input.pixels, prepared.model_input.pixels)
        np.testing.assert_array_equal(item.prepared.display, prepared.display)
        assert item.score.transform == score.transform and item.prepared.meta == prepared.meta
        assert item.prepared.dataset.SOPInstanceUID == prepared.dataset.SOPInstanceUID
    assert pool.stats.batches == [3, 3, 3, 2]  # Pipeline.infer's chunks of the 11 good images


def test_a_group_never_shares_a_batch_with_another(sources: list[Path]) -> None:
    pipeline = Pipeline(FakeBackend(), batch_size=3)
    good = [p for p in sources if p.name != "broken.dcm"]
    with PixelPool("serial") as pool:
        results = list(score_stream(pipeline, good, read_path, pool=pool, group=lambda p: p.name[:2]))
    assert pool.stats.batches == [3, 1, 3, 1, 3]  # studies of 4, 4 and 3 images
    assert [r.source for r in results] == good and all(r.error is None for r in results)


def test_the_producer_never_runs_more_than_ahead_plus_a_batch_in_front_of_the_scorer(
    sources: list[Path],
) -> None:
    """However long the backlog, at most ``ahead`` images are in the pool and one batch waits."""
    good = [p for p in sources if p.name != "broken.dcm"]
    backlog = good * 5  # 55 images
    pulled = 0
    in_worker = 0
    most_in_worker = 0
    lock = threading.Lock()

    def feed() -> Iterator[Path]:
        nonlocal pulled
        for path in backlog:
            pulled += 1
            yield path

    def read(path: Path) -> tuple[Dataset, ImageMeta]:
        nonlocal in_worker, most_in_worker
        with lock:
            in_worker += 1
            most_in_worker = max(most_in_worker, in_worker)
        try:
            return read_path(path)
        finally:
            with lock:
                in_worker -= 1

    ahead, batch = 3, 4
    pipeline = Pipeline(FakeBackend(), batch_size=batch)
    consumed = 0
    with PixelPool("thread", workers=2, ahead=ahead) as pool:
        for _ in score_stream(pipeline, feed(), read, pool=pool):
            consumed += 1
            # Everything pulled from the backlog and not yet handed out is in the window or in
            # the batch being assembled.
            assert pulled - consumed <= ahead + batch
    assert consumed == len(backlog)
    assert pool.stats.max_in_flight == ahead  # the window was used, and never exceeded
    assert pool.stats.max_held <= ahead + batch
    assert most_in_worker <= 2
    assert pool.stats.batches == [batch] * (len(backlog) // batch) + [len(backlog) % batch]


def test_errors_are_reported_per_image_with_the_sequential_messages(
    sources: list[Path], tmp_path: Path
) -> None:
    missing = tmp_path / "gone.dcm"
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(sources[0].read_bytes())
    inputs = [sources[0], missing, empty, sources[1], copy]
    expected = {}
    for path in (missing, empty):
        with pytest.raises(InputError) as info:
            read_path(path)
        expected[path] = str(info.value)
    expected[copy] = "duplicate"
    seen: set[str] = set()

    def accept(meta: ImageMeta) -> None:
        if meta.sop_instance_uid in seen:
            raise InputError("duplicate")
        seen.add(meta.sop_instance_uid)

    pipeline = Pipeline(FakeBackend(), batch_size=8)
    with PixelPool("thread", workers=2) as pool:
        results = list(score_stream(pipeline, inputs, read_path, pool=pool, accept=accept))
    assert {r.source: str(r.error) for r in results if r.error} == expected
    assert all(isinstance(r.error, InputError) for r in results if r.error)
    assert [r.source for r in results if r.error is None] == [sources[0], sources[1]]
    assert pool.stats.batches == [2]


def crash_on_three(value: int) -> int:
    """A task whose worker process dies on one input, as a decoder crashing on a hostile file."""
    if value == 3:
        os._exit(1)
    return value * 10


def test_a_worker_process_that_dies_costs_only_its_own_file() -> None:
    with PixelPool("process", workers=2, ahead=3) as pool:
        results = dict(pool.imap(crash_on_three, range(7)))
    assert isinstance(results.pop(3), InputError)
    assert results == {i: i * 10 for i in range(7) if i != 3}
    assert pool.stats.restarts >= 1


def test_with_dali_each_batch_goes_through_prepare_and_infer(sources: list[Path], tmp_path: Path) -> None:
    """The workers only read; DALI rows, CPU fallbacks and DALI's own errors land on their sources."""
    pytest.importorskip("nvidia.dali")
    from pydicom import dcmread

    from inference.preprocessing_dali import DaliPreprocessor

    inputs: list[Path] = []
    for index, path in enumerate(sources[:4]):  # two J2K (DALI), one uniform J2K, one explicit
        ds = dcmread(path)
        if index < 3:
            pixels = ds.pixel_array if index < 2 else np.full_like(ds.pixel_array, 7)
            ds.compress(
                "1.2.840.10008.1.2.4.90", pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False
            )
        inputs.append(tmp_path / f"{index}.dcm")
        ds.save_as(inputs[-1], enforce_file_format=True)
    inputs.append(sources[4])  # the broken file: a read error
    backend = FakeBackend()
    pipeline = Pipeline(
        backend,
        batch_size=3,
        dali=DaliPreprocessor(backend.manifest.preprocess, device_id=None, batch_size=3),
    )
    with PixelPool("thread", workers=2) as pool:
        results = {r.source: r for r in score_stream(pipeline, inputs, read_path, pool=pool)}

    assert pool.stats.batches == [3, 1]
    expected = pipeline.prepare_and_infer([read_path(p) for p in inputs[:3]])
    assert [i for i, _ in expected.failures] == [2]
    assert isinstance(results[inputs[2]].error, InputError) and isinstance(
        results[inputs[4]].error, InputError
    )
    for path, score in zip(inputs[:2], expected.scores, strict=True):
        item = results[path]
        assert item.score is not None and item.prepared is not None
        assert item.score.meta == score.meta and item.score.logit == score.logit
    alone = pipeline.prepare_and_infer([read_path(inputs[3])])  # the explicit file: CPU fallback
    fallback = results[inputs[3]].score
    assert fallback is not None and fallback.logit == alone.scores[0].logit


KILLED_PARENT = """
import os, signal, sys
from inference.pixel_pool import PixelPool
pool = PixelPool("process", workers=2)
pool.warm()
print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_worker_processes_exit_when_their_parent_is_killed() -> None:
    """A node killed with SIGKILL (or by the OOM killer) leaves no decode worker behind."""
    proc = subprocess.run([sys.executable, "-c", KILLED_PARENT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(pid) for pid in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its reaper, init, has not collected it yet)
