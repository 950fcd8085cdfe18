"""TensorRT engines in the manifest, and why the tensorrt backend is or is not available.

The engine table and the registry's reasons are pure Python and tested everywhere; TensorRT itself
only where a GPU is (the ``gpu`` tests of tests/training/test_export_tensorrt.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from inference.backends import loader
from inference.backends.base import BackendUnavailable
from inference.backends.cuda_runtime import CudaArray, gpu_unavailable_reason, parse_device
from inference.backends.tensorrt_engines import (
    EngineRecord,
    NoMatchingEngine,
    engine_file_name,
    engine_key,
    find_engine,
    with_engine,
)
from inference.manifest import ModelManifest, load_manifest, save_manifest
from inference.types import InputError

ONNX_SHA = "ab" * 32
OTHER_SHA = "cd" * 32
A100 = "NVIDIA A100-SXM4-40GB"
L4 = "NVIDIA L4"


def _record(
    gpu: str = A100, trt: str = "10.13.0.35", onnx: str = ONNX_SHA, **changes: object
) -> EngineRecord:
    record = EngineRecord(
        file=engine_file_name(engine_key(gpu, trt, onnx)),
        sha256="ef" * 32,
        gpu=gpu,
        compute_capability="8.0",
        tensorrt=trt,
        onnx_sha256=onnx,
        precision="fp16",
        max_batch=8,
        opt_batch=8,
        created="2026-11-23",
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _manifest(*records: EngineRecord, onnx: str | None = ONNX_SHA) -> ModelManifest:
    manifest = ModelManifest(
        name="m",
        version="1",
        architecture="efficientnet_b0",
        onnx_file="model.onnx" if onnx else None,
        onnx_sha256=onnx,
    )
    for record in records:
        manifest = with_engine(manifest, engine_key(record.gpu, record.tensorrt, record.onnx_sha256), record)
    return manifest


def test_engine_key_is_gpu_tensorrt_and_onnx() -> None:
    key = engine_key(A100, "10.13.0.35", ONNX_SHA)
    assert key == f"nvidia-a100-sxm4-40gb_trt10.13.0.35_{ONNX_SHA[:16]}"
    assert engine_file_name(key) == f"model_{key}.engine"
    assert engine_key(L4, "10.13.0.35", ONNX_SHA) != key
    assert engine_key(A100, "10.14.1.48", ONNX_SHA) != key
    assert engine_key(A100, "10.13.0.35", OTHER_SHA) != key


def test_find_engine_picks_the_one_for_this_gpu_and_tensorrt() -> None:
    wanted = _record()
    manifest = _manifest(_record(gpu=L4), wanted, _record(onnx=OTHER_SHA))
    key, record = find_engine(manifest, A100, "10.13.0.35")
    assert record == wanted and key == engine_key(A100, "10.13.0.35", ONNX_SHA)


@pytest.mark.parametrize(
    ("records", "onnx", "message"),
    [
        ([_record(gpu=L4)], ONNX_SHA, f"engine built for GPU {L4}, this is {A100}"),
        (
            [_record(trt="10.7.0.23")],
            ONNX_SHA,
            "engine built with TensorRT 10.7.0.23, this is TensorRT 10.13.0.35",
        ),
        ([_record(onnx=OTHER_SHA)], ONNX_SHA, "built from another ONNX graph"),
        ([], ONNX_SHA, "model has no TensorRT engine"),
        ([], None, "no ONNX export"),
    ],
)
def test_find_engine_says_which_of_gpu_tensorrt_onnx_differs(
    records: list[EngineRecord], onnx: str | None, message: str
) -> None:
    with pytest.raises(NoMatchingEngine) as caught:
        find_engine(_manifest(*records, onnx=onnx), A100, "10.13.0.35")
    assert message in caught.value.reason
    if records or onnx:
        assert "mammonode export" in caught.value.reason


def test_engines_round_trip_through_model_json(tmp_path: Path) -> None:
    record = _record(precision="int8", calibration={"dataset": "/data/cal", "images_used": 64})
    save_manifest(_manifest(record), tmp_path)
    key, loaded = find_engine(load_manifest(tmp_path), A100, "10.13.0.35")
    assert loaded == record
    replaced = with_engine(load_manifest(tmp_path), key, dataclasses.replace(record, sha256="01" * 32))
    assert len(replaced.engines) == 1 and replaced.engines[key]["sha256"] == "01" * 32


@pytest.mark.parametrize(
    "bad",
    [{"file": "../elsewhere.engine"}, {"file": "/abs.engine"}, {"precision": "int4"}, {"max_batch": 0}],
)
def test_malformed_engine_entries_are_refused(bad: dict[str, object]) -> None:
    manifest = _manifest(_record())
    key = next(iter(manifest.engines))
    entry = {**manifest.engines[key], **bad}
    with pytest.raises(InputError, match=key):
        find_engine(dataclasses.replace(manifest, engines={key: entry}), A100, "10.13.0.35")
    incomplete = {k: v for k, v in manifest.engines[key].items() if k != "sha256"}
    with pytest.raises(InputError, match="incomplete"):
        find_engine(dataclasses.replace(manifest, engines={key: incomplete}), A100, "10.13.0.35")


def test_registry_says_tensorrt_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_package_installed", lambda name: name != "tensorrt")
    reason = loader.available_backends()["tensorrt"]
    assert reason is not None and reason.startswith("package tensorrt not installed")
    assert "pypi.nvidia.com" in reason
    with pytest.raises(BackendUnavailable, match="package tensorrt not installed"):
        loader.load_backend("tensorrt", Path(), device="cuda:0")


def test_registry_asks_cuda_when_tensorrt_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the package check the registry reports the GPU probe's answer, whatever it is here."""
    monkeypatch.setattr(loader, "_package_installed", lambda name: True)
    assert loader.available_backends()["tensorrt"] == gpu_unavailable_reason(0)


def test_gpu_probe_answers_in_one_line() -> None:
    import torch

    reason = gpu_unavailable_reason(0)
    if torch.cuda.is_available():
        assert reason is None
        assert "no CUDA GPU 1000" in str(gpu_unavailable_reason(1000))
    else:
        assert reason is not None and "\n" not in reason
        assert reason.startswith("no CUDA GPU") or "cuda-python not installed" in reason


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_parse_device(device: str, index: int) -> None:
    assert parse_device(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "gpu:0", "cuda:-1"])
def test_parse_device_refuses(device: str) -> None:
    with pytest.raises(ValueError, match="invalid CUDA device"):
        parse_device(device)


def test_cuda_array_describes_device_memory_for_other_libraries() -> None:
    host = np.zeros((2, 1, 4, 3), np.float32)
    view = CudaArray(
        ptr=0xDEAD00, shape=(2, 1, 4, 3), dtype=np.dtype(np.float32), owner=None, to_host=lambda: host
    )
    assert view.__cuda_array_interface__ == {
        "shape": (2, 1, 4, 3),
        "typestr": "<f4",
        "data": (0xDEAD00, False),
        "version": 3,
    }
    assert view.nbytes == host.nbytes and view.to_host() is host
