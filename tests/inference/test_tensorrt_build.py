"""`mammonode export tensorrt`: calibration data, the engine cache, refusals, and (on a GPU) real
engines against ONNX Runtime.

Without a GPU (here, CI) everything up to the TensorRT builder is tested for real: which files
calibrate and how they are batched (through the CPU preprocessing), when a cached engine is
reused, and what the command says when it cannot build. TensorRT is never faked: the engine
tests carry the ``gpu`` marker. Their tolerances: FP32 engines match ONNX Runtime within
inference.backends.parity's default (3e-4 of the output scale; both run fused FP32 kernels);
FP16 within 2e-2 of the scale (10-bit mantissas through ~80 layers).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from inference.backends.tensorrt_build import (
    TensorRTExportError,
    build_engine,
    cached_engine,
    calibration_batches,
    precision_of,
)
from inference.backends.tensorrt_engines import EngineRecord, engine_file_name, engine_key, with_engine
from inference.manifest import atomic_write_bytes, file_sha256, load_manifest, save_manifest
from inference.preprocessing import preprocess
from inference.types import PreprocessConfig
from training.synth import make_dicom, render_view, write_dicom

CONFIG = PreprocessConfig(input_height=64, input_width=32)
GPU, TRT, ONNX_SHA = "NVIDIA L4", "10.13.0.35", "ab" * 32


def _write_mammograms(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        laterality = "LR"[i % 2]
        rendered = render_view(np.random.default_rng(i), laterality=laterality, view="CC", size=(128, 96))
        ds = make_dicom(
            rendered.pixels,
            patient_id=f"CAL{i}",
            study_uid=f"1.2.826.0.1.3680043.10.2.{i}",
            laterality=laterality,
            view="CC",
            breast_mask=rendered.breast_mask,
        )
        path = folder / f"patient{i}" / f"{i}.dcm"
        path.parent.mkdir(parents=True)
        write_dicom(ds, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("calibration")
    paths = _write_mammograms(folder / "train_images", 5)
    (folder / "train.csv").write_text("patient_id,image_id\n", encoding="utf-8")
    (folder / "train_images" / "broken.dcm").write_bytes(b"not a DICOM file")
    return folder, paths


def test_calibration_batches_are_full_batches_of_served_inputs(dataset: tuple[Path, list[Path]]) -> None:
    from inference.dicom_header import read_dataset

    folder, paths = dataset
    batches = list(calibration_batches(folder, CONFIG, in_chans=1, batch_size=2, limit=10))
    assert [b.shape for b in batches] == [(2, 1, 64, 32), (2, 1, 64, 32)]  # 5 images: the 5th is left over
    assert all(b.dtype == np.float32 for b in batches)
    expected = [preprocess(read_dataset(p), CONFIG).pixels for p in sorted(paths)[:4]]
    np.testing.assert_array_equal(np.concatenate(batches)[:, 0], np.stack(expected))


def test_calibration_stops_at_the_limit_and_repeats_channels(dataset: tuple[Path, list[Path]]) -> None:
    folder, _ = dataset
    batches = list(calibration_batches(folder, CONFIG, in_chans=3, batch_size=2, limit=3))
    assert [b.shape for b in batches] == [(2, 3, 64, 32)]
    np.testing.assert_array_equal(batches[0][:, 0], batches[0][:, 2])
    with pytest.raises(ValueError, match="limit"):
        next(calibration_batches(folder, CONFIG, in_chans=1, batch_size=4, limit=2))
    with pytest.raises(TensorRTExportError, match="does not exist"):
        next(calibration_batches(folder / "nowhere", CONFIG, in_chans=1, batch_size=1, limit=1))


def _model_with_engine(
    model_dir: Path, *, precision: str = "fp16", max_batch: int = 8
) -> tuple[str, EngineRecord]:
    from inference.manifest import ModelManifest

    key = engine_key(GPU, TRT, ONNX_SHA)
    path = model_dir / engine_file_name(key)
    atomic_write_bytes(path, b"serialised engine")
    record = EngineRecord(
        file=path.name,
        sha256=file_sha256(path),
        gpu=GPU,
        compute_capability="8.9",
        tensorrt=TRT,
        onnx_sha256=ONNX_SHA,
        precision=precision,
        max_batch=max_batch,
        opt_batch=max_batch,
    )
    manifest = ModelManifest(
        name="m", version="1", architecture="efficientnet_b0", onnx_file="model.onnx", onnx_sha256=ONNX_SHA
    )
    save_manifest(with_engine(manifest, key, record), model_dir)
    return key, record


def test_cached_engine_is_reused_only_when_it_is_what_was_asked_for(tmp_path: Path) -> None:
    key, record = _model_with_engine(tmp_path)
    manifest = load_manifest(tmp_path)
    assert cached_engine(tmp_path, manifest, key, "fp16", 8) == record
    assert cached_engine(tmp_path, manifest, key, "fp32", 8) is None  # other precision
    assert cached_engine(tmp_path, manifest, key, "fp16", 16) is None  # other batch range
    assert cached_engine(tmp_path, manifest, engine_key("NVIDIA A10", TRT, ONNX_SHA), "fp16", 8) is None
    (tmp_path / record.file).write_bytes(b"tampered")
    assert cached_engine(tmp_path, manifest, key, "fp16", 8) is None  # SHA-256 no longer matches
    (tmp_path / record.file).unlink()
    assert cached_engine(tmp_path, manifest, key, "fp16", 8) is None


def test_precision_flags() -> None:
    assert precision_of(fp16=False, int8=False) == "fp32"
    assert precision_of(fp16=True, int8=False) == "fp16"
    assert precision_of(fp16=True, int8=True) == "int8"


def test_build_refuses_a_model_without_onnx(tmp_path: Path) -> None:
    from inference.manifest import ModelManifest

    save_manifest(ModelManifest(name="m", version="1", architecture="efficientnet_b0"), tmp_path)
    with pytest.raises(TensorRTExportError, match="mammonode export onnx"):
        build_engine(tmp_path)
    with pytest.raises(TensorRTExportError, match="--calibration"):
        build_engine(tmp_path, precision="int8")


def test_build_says_tensorrt_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a verified ONNX graph, the next thing checked is TensorRT itself."""
    (tmp_path / "model.onnx").write_bytes(b"graph")
    from inference.manifest import ModelManifest

    manifest = ModelManifest(
        name="m",
        version="1",
        architecture="efficientnet_b0",
        onnx_file="model.onnx",
        onnx_sha256=file_sha256(tmp_path / "model.onnx"),
    )
    save_manifest(manifest, tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this project's machines
    with pytest.raises(TensorRTExportError, match="package tensorrt not installed"):
        build_engine(tmp_path)


def test_export_group_has_the_tensorrt_command() -> None:
    from node.commands.app import app

    result = CliRunner().invoke(app, ["export", "tensorrt", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--fp16", "--int8", "--calibration", "--max-batch"):
        assert option in result.stdout


# --------------------------------------------------------------------------------------------
# On a GPU with TensorRT (skipped without one)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_factory import save_calibrated_model

    from training.onnx_export import export_onnx

    model_dir = save_calibrated_model(tmp_path_factory.mktemp("trt") / "model")
    export_onnx(model_dir)
    return model_dir


def _parity_inputs(model_dir: Path, count: int) -> np.ndarray:
    from training.onnx_export import parity_inputs

    return parity_inputs(load_manifest(model_dir), count=count, seed=3)


@pytest.mark.gpu
def test_fp32_engine_matches_onnxruntime_and_is_cached(onnx_model: Path) -> None:
    from inference.backends.loader import load_backend
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.backends.parity import compare_outputs

    built = build_engine(onnx_model, precision="fp32", max_batch=4)
    assert not built.cached and built.path.is_file()
    assert load_manifest(onnx_model).engines[built.key]["sha256"] == file_sha256(built.path)
    again = build_engine(onnx_model, precision="fp32", max_batch=4)
    assert again.cached and again.record == built.record

    backend = load_backend("tensorrt", onnx_model, device="cuda:0")
    assert backend.max_batch == 4
    inputs = _parity_inputs(onnx_model, 6)  # more than max_batch: chunked
    report = compare_outputs(OnnxRuntimeBackend(onnx_model).infer(inputs), backend.infer(inputs))
    assert report.ok, report.describe()


@pytest.mark.gpu
def test_fp16_engine_is_close_to_onnxruntime(onnx_model: Path) -> None:
    from inference.backends.onnxruntime_backend import OnnxRuntimeBackend
    from inference.backends.parity import compare_outputs
    from inference.backends.tensorrt_backend import TensorRTBackend

    built = build_engine(onnx_model, precision="fp16", max_batch=2, force=True)
    assert built.record.precision == "fp16"
    inputs = _parity_inputs(onnx_model, 3)
    report = compare_outputs(
        OnnxRuntimeBackend(onnx_model).infer(inputs), TensorRTBackend(onnx_model).infer(inputs), rtol=2e-2
    )
    assert report.ok, report.describe()


@pytest.mark.gpu
def test_int8_engine_is_calibrated_on_the_dataset(onnx_model: Path, tmp_path: Path) -> None:
    from inference.backends.tensorrt_backend import TensorRTBackend

    manifest = load_manifest(onnx_model)
    folder = tmp_path / "cal"
    _write_mammograms(folder, 4)
    built = build_engine(
        onnx_model, precision="int8", max_batch=2, calibration=folder, calibration_images=4, force=True
    )
    assert built.record.calibration is not None and built.record.calibration["images_used"] == 4
    logits, cams = TensorRTBackend(onnx_model).infer(_parity_inputs(onnx_model, 2))
    grid = manifest.preprocess
    assert logits.shape == (2,) and cams.ndim == 3 and np.isfinite(logits).all() and np.isfinite(cams).all()
    assert grid.input_height % cams.shape[1] == 0


@pytest.mark.gpu
def test_tensorrt_scores_a_dali_batch_in_device_memory(onnx_model: Path) -> None:
    from inference.backends.tensorrt_backend import TensorRTBackend
    from inference.preprocessing_dali import DaliPreprocessor
    from training.synth import make_dicom as make

    build_engine(onnx_model, precision="fp32", max_batch=4)
    backend = TensorRTBackend(onnx_model)
    rendered = render_view(np.random.default_rng(9), laterality="L", view="MLO", size=(512, 384))
    ds = make(
        rendered.pixels,
        patient_id="G",
        study_uid="1.2.3.9",
        laterality="L",
        view="MLO",
        transfer_syntax="jpeg2000",
    )
    result = DaliPreprocessor(backend.manifest.preprocess, device_id=0, batch_size=2).prepare([ds])
    assert not isinstance(result.batch, np.ndarray)
    logits, cams = backend.infer_device(result.batch)
    ref_logits, ref_cams = backend.infer(result.batch.to_host())
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cams, ref_cams, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_an_engine_for_another_gpu_is_refused_clearly(onnx_model: Path, tmp_path: Path) -> None:
    import shutil

    from inference.backends.base import BackendUnavailable
    from inference.backends.tensorrt_backend import TensorRTBackend

    built = build_engine(onnx_model, precision="fp32", max_batch=4)
    copy = tmp_path / "copy"
    shutil.copytree(onnx_model, copy)
    manifest = load_manifest(copy)
    moved = dataclasses.replace(built.record, gpu="NVIDIA H100 80GB HBM3")
    engines = {engine_key(moved.gpu, moved.tensorrt, moved.onnx_sha256): moved.to_dict()}
    save_manifest(dataclasses.replace(manifest, engines=engines), copy)
    with pytest.raises(
        BackendUnavailable,
        match=re.escape(f"engine built for GPU NVIDIA H100 80GB HBM3, this is {built.record.gpu}"),
    ):
        TensorRTBackend(copy)
