"""The onnxruntime backend: same interface and same results as torch, and it refuses bad graphs.

Parity tolerance (inference.backends.parity): ``max|ORT - torch| <= 1e-4 + 1e-3 x S`` for logits
and CAMs, S the largest |CAM| of the batch; probabilities within 1e-4. The model is EfficientNet-B0
with real BatchNorm statistics (tests/model_factory.py), so the outputs depend on the input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from mg_source_factory import make_dx_mg
from model_factory import PARITY_GRID, save_calibrated_model
from pydicom.dataset import Dataset

from inference.backends import onnxruntime_backend as ortb
from inference.backends.base import Backend, BackendUnavailable
from inference.backends.loader import load_backend
from inference.backends.parity import compare_outputs
from inference.dicom_header import read_meta
from inference.pipeline import Pipeline
from inference.types import SCREENING_VIEWS, InputError

PROBABILITY_ATOL = 1e-4
FOUR_VIEWS = [(side, view) for side, view in (key.split("-") for key in SCREENING_VIEWS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.onnx_export import export_onnx

    path = save_calibrated_model(tmp_path_factory.mktemp("ort") / "model")
    export_onnx(path)
    return path


@pytest.fixture(scope="module")
def backends(model_dir: Path) -> tuple[Backend, Backend]:
    return load_backend("onnxruntime", model_dir), load_backend("torch", model_dir)


def _textured(laterality: str, view: str, index: int) -> Dataset:
    """A synthetic DX mammogram with its own blotchy texture, so the four views score differently."""
    ds = make_dx_mg(laterality, view, index=index)
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns).astype(np.float32)
    rng = np.random.default_rng(index)
    blobs = cv2.GaussianBlur(rng.random(pixels.shape, dtype=np.float32), (0, 0), 6.0)
    textured = pixels * (0.7 + 0.6 * (blobs - blobs.min()) / np.ptp(blobs))
    ds.PixelData = np.clip(textured, 0, 2**14 - 1).astype(np.uint16).tobytes()
    return ds


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_torch_on_logits_and_cams(backends: tuple[Backend, Backend], batch: int) -> None:
    onnx, torch_ = backends
    x = np.random.default_rng(batch).random((batch, 1, *PARITY_GRID), dtype=np.float32)
    logits, cams = onnx.infer(x)
    assert logits.shape == (batch,) and cams.shape == (batch, PARITY_GRID[0] // 32, PARITY_GRID[1] // 32)
    assert logits.dtype == np.float32 and cams.dtype == np.float32
    report = compare_outputs(torch_.infer(x), (logits, cams))
    assert not report.degenerate and report.cam_scale > 0.1  # the comparison means something
    assert report.ok, report.describe()
    assert report.probability_max_abs_diff < PROBABILITY_ATOL


def test_backend_protocol_and_chunking(model_dir: Path) -> None:
    backend = ortb.OnnxRuntimeBackend(model_dir, max_batch=2)
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    assert backend.manifest.onnx_file == "model.onnx"
    x = np.random.default_rng(5).random((5, 1, *PARITY_GRID), dtype=np.float32)
    logits, cams = backend.infer(x)  # chunks of 2, 2, 1
    whole = load_backend("onnxruntime", model_dir).infer(x)
    np.testing.assert_allclose(logits, whole[0], atol=1e-5)
    np.testing.assert_allclose(cams, whole[1], atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 1, 64, 32), np.float32),  # wrong grid
        np.zeros((0, 1, *PARITY_GRID), np.float32),  # empty
        np.full((1, 1, *PARITY_GRID), 2.0, np.float32),  # not in [0, 1]
    ],
)
def test_rejects_bad_batches_like_torch(backends: tuple[Backend, Backend], bad: np.ndarray) -> None:
    for backend in backends:
        with pytest.raises(ValueError):
            backend.infer(bad)


def test_a_tampered_graph_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"SHA-256.*export it again"):
        load_backend("onnxruntime", copy)


def test_a_graph_for_another_grid_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["preprocess"]["input_height"] = 256
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="does not match"):
        load_backend("onnxruntime", copy)


def test_cuda_without_the_cuda_provider_says_why(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"no CUDAExecutionProvider.*onnxruntime-gpu") as info:
        load_backend("onnxruntime", model_dir, device="cuda")
    assert info.value.backend == "onnxruntime"
    with pytest.raises(ValueError, match="unknown device"):
        ortb.OnnxRuntimeBackend(model_dir, device="tpu")


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(model_dir: Path) -> None:
    if ortb.CUDA_PROVIDER not in ortb.ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    x = np.random.default_rng(7).random((3, 1, *PARITY_GRID), dtype=np.float32)
    report = compare_outputs(
        load_backend("onnxruntime", model_dir).infer(x),
        load_backend("onnxruntime", model_dir, device="cuda").infer(x),
    )
    assert report.ok, report.describe()


def test_intra_op_threads_follow_physical_cores_and_cpu_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    cores = ortb.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # a container limited to one CPU
    monkeypatch.setattr(ortb, "_CGROUP_CPU_MAX", quota)
    assert ortb.physical_cores() == 1
    quota.write_text("max 100000\n")  # unlimited
    assert ortb.physical_cores() == cores


def test_pipeline_gives_the_same_probabilities_with_either_backend(backends: tuple[Backend, Backend]) -> None:
    """A synthetic 4-view study through decode, preprocessing, inference and aggregation."""
    datasets = [_textured(side, view, index) for index, (side, view) in enumerate(FOUR_VIEWS, start=1)]
    studies = []
    for backend in backends:
        pipeline = Pipeline(backend)
        prepared = [pipeline.prepare(ds, read_meta(ds)) for ds in datasets]
        (study,) = pipeline.score(prepared)
        studies.append(study)
    onnx, torch_ = studies
    pairs = [*zip(onnx.images, torch_.images, strict=True), *zip(onnx.breasts, torch_.breasts, strict=True)]
    probabilities = [(a.probability, b.probability) for a, b in pairs]
    probabilities.append((onnx.exam_probability, torch_.exam_probability))
    got, want = np.array(probabilities).T
    np.testing.assert_allclose(got, want, rtol=0, atol=PROBABILITY_ATOL)
    assert np.ptp([i.logit for i in torch_.images]) > 1e-3  # images score differently: not a constant
    for a, b in zip(onnx.images, torch_.images, strict=True):
        assert compare_outputs((np.array([b.logit]), b.cam[None]), (np.array([a.logit]), a.cam[None])).ok
