"""Backend interface, torch backend and registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.backends import loader
from inference.backends.base import Backend, BackendUnavailable


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from model_factory import save_calibrated_model

    return save_calibrated_model(
        tmp_path_factory.mktemp("model"), architecture="cancernet", grid=(64, 32), seed=0, name="t"
    )


def test_torch_backend_chunks_and_matches_the_model(model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from inference.backends.torch_backend import TorchBackend
    from inference.model_io import load_model

    backend = TorchBackend(model_dir, max_batch=2)
    assert isinstance(backend, Backend)
    batch = np.random.default_rng(0).random((5, 1, 64, 32), dtype=np.float32)
    logits, cams = backend.infer(batch)
    assert logits.shape == (5,) and cams.shape == (5, 8, 4)
    assert logits.dtype == np.float32 and cams.dtype == np.float32
    model, _ = load_model(model_dir)
    with torch.no_grad():
        ref_logit, ref_cam = model(torch.from_numpy(batch))
    np.testing.assert_allclose(logits, ref_logit.numpy(), atol=1e-5)
    np.testing.assert_allclose(cams, ref_cam.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 1, 32, 32), np.float32),  # wrong grid
        np.zeros((2, 3, 64, 32), np.float32),  # wrong channels
        np.zeros((0, 1, 64, 32), np.float32),  # empty
        np.full((1, 1, 64, 32), 2.0, np.float32),  # not in [0, 1]
        np.full((1, 1, 64, 32), np.nan, np.float32),
    ],
)
def test_torch_backend_rejects_bad_batches(model_dir: Path, bad: np.ndarray) -> None:
    backend = loader.load_backend("torch", model_dir)
    with pytest.raises(ValueError):
        backend.infer(bad)


def test_registry_lists_every_backend_with_a_reason() -> None:
    available = loader.available_backends()
    assert set(available) >= {"torch", "onnxruntime", "tensorrt"}
    assert available["onnxruntime"] is None  # a base-install dependency


@pytest.mark.parametrize(
    ("backend", "package", "hint"),
    [("torch", "torch", "mammonode[train]"), ("onnxruntime", "onnxruntime", "pip install onnxruntime")],
)
def test_registry_reports_a_missing_package_and_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, backend: str, package: str, hint: str
) -> None:
    monkeypatch.setattr(loader, "_package_installed", lambda name: name != package)
    reason = loader.available_backends()[backend]
    assert reason is not None and reason.startswith(f"package {package} not installed") and hint in reason
    with pytest.raises(BackendUnavailable, match=f"package {package} not installed") as info:
        loader.load_backend(backend, model_dir)
    assert info.value.reason == reason and info.value.backend == backend


def test_registry_loads_torch_and_refuses_unknown_backends(model_dir: Path) -> None:
    pytest.importorskip("torch")
    assert loader.available_backends()["torch"] is None
    backend = loader.load_backend("torch", model_dir)
    assert backend.name == "torch" and backend.manifest.name == "t"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        loader.load_backend("openvino", model_dir)


def test_registry_says_when_a_model_has_no_onnx_export(model_dir: Path) -> None:
    with pytest.raises(
        BackendUnavailable, match=r"model has no ONNX export: run `mammonode export onnx"
    ) as info:
        loader.load_backend("onnxruntime", model_dir)
    assert info.value.backend == "onnxruntime"


def test_auto_picks_onnxruntime_when_the_model_ships_onnx_else_torch(tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from inference.backends.loader import resolve_auto
    from inference.bundled import bundled_model_dir
    from inference.manifest import load_manifest, save_manifest

    bundled = bundled_model_dir()
    assert resolve_auto(bundled) == "onnxruntime"
    assert loader.load_backend("auto", bundled).name == "onnxruntime"
    plain = tmp_path / "plain"
    plain.mkdir()
    manifest = load_manifest(bundled)
    shutil.copy(bundled / manifest.weights_file, plain / manifest.weights_file)
    save_manifest(dataclasses.replace(manifest, onnx_file=None, onnx_sha256=None), plain)
    assert resolve_auto(plain) == "torch"
    assert loader.load_backend("auto", plain).name == "torch"
