"""`mammonode export onnx`: one valid opset-17 graph that matches torch, recorded in the manifest.

Models come from tests/model_factory.py (EfficientNet-B0 with real BatchNorm statistics). Parity,
checked here independently of the exporter's own check: ``max|ORT - torch| <= 1e-4 + 1e-3 x S``
per output, S the largest |CAM| (the logit averages the CAM, so its rounding follows that scale);
see inference.backends.parity. Observed: ~1e-5 x S.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from model_factory import PARITY_GRID, save_calibrated_model
from typer.testing import CliRunner

import training.onnx_export as export
from inference.manifest import file_sha256, load_manifest
from inference.model import build_model
from inference.model_io import load_model, save_model
from inference.types import MammoNodeError
from node.commands.app import app

RTOL, ATOL = 1e-3, 1e-4


def _cli(*args: str | Path) -> str:
    result = CliRunner().invoke(app, ["export", "onnx", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = save_calibrated_model(tmp_path_factory.mktemp("export") / "model")
    _cli("--model", model_dir)
    return model_dir


def test_cli_writes_the_graph_and_its_sha_into_the_manifest(exported: Path) -> None:
    manifest = load_manifest(exported)
    assert manifest.onnx_file == "model.onnx"
    assert manifest.onnx_sha256 == file_sha256(exported / "model.onnx")
    assert sorted(p.name for p in exported.iterdir()) == ["model.json", "model.onnx", "model.safetensors"]


def test_graph_is_one_opset_17_file_with_named_outputs_and_a_dynamic_batch(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logit", "cam"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *PARITY_GRID]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_torch_on_both_outputs(exported: Path, batch: int) -> None:
    model, _ = load_model(exported)
    x = np.random.default_rng(batch).random((batch, 1, *PARITY_GRID), dtype=np.float32)
    with torch.no_grad():
        logit, cam = (t.numpy() for t in model(torch.from_numpy(x)))
    assert cam.std() > 1e-2, "degenerate outputs would prove nothing"
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    ort_logit, ort_cam = session.run(["logit", "cam"], {"image": x})
    assert ort_logit.shape == (batch,) and ort_cam.shape == (
        batch,
        PARITY_GRID[0] // 32,
        PARITY_GRID[1] // 32,
    )
    scale = max(np.abs(cam).max(), np.abs(logit).max())
    np.testing.assert_allclose(ort_logit, logit, rtol=0, atol=ATOL + RTOL * scale)
    np.testing.assert_allclose(ort_cam, cam, rtol=0, atol=ATOL + RTOL * scale)


def test_reexport_gives_the_same_bytes_and_a_consistent_manifest(exported: Path, tmp_path: Path) -> None:
    """Same weights, same torch: byte-identical graph. Another torch version may change the bytes
    (and the SHA-256); the manifest then follows the new file and parity still has to hold."""
    copy_dir = tmp_path / "again"
    shutil.copytree(exported, copy_dir)
    before = file_sha256(copy_dir / "model.onnx")
    result = export.export_onnx(copy_dir)
    assert result.onnx_sha256 == before == load_manifest(copy_dir).onnx_sha256
    assert all(report.ok for report in result.parity.values())


def test_out_writes_a_copy_and_leaves_the_source_alone(tmp_path: Path) -> None:
    source = save_calibrated_model(tmp_path / "src", architecture="cancernet", grid=(64, 32))
    manifest_before = (source / "model.json").read_bytes()
    out = _cli("--model", source, "--out", tmp_path / "copy")
    assert "sha256" in out and "parity with torch" in out
    assert (source / "model.json").read_bytes() == manifest_before and not (source / "model.onnx").exists()
    copied = load_manifest(tmp_path / "copy")
    assert copied.onnx_sha256 == file_sha256(tmp_path / "copy" / "model.onnx")
    assert copied.weights_sha256 == load_manifest(source).weights_sha256


def test_out_refuses_a_folder_that_is_not_empty(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(MammoNodeError, match="not an empty folder"):
        export.export_onnx(exported, out=tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


def test_a_graph_that_differs_from_torch_is_refused_and_nothing_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model_dir = save_calibrated_model(tmp_path / "m", architecture="cancernet", grid=(64, 32))
    manifest_before = (model_dir / "model.json").read_bytes()
    real_export = export.export_graph

    def export_other_weights(model: Any, example: np.ndarray, *, opset: int = 17) -> bytes:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.fc.bias += 0.5  # a stale graph: the logit is off, the CAM is not
        return real_export(other, example, opset=opset)

    monkeypatch.setattr(export, "export_graph", export_other_weights)
    with pytest.raises(export.ExportError, match="does not match torch"):
        export.export_onnx(model_dir)
    assert not (model_dir / "model.onnx").exists()
    assert (model_dir / "model.json").read_bytes() == manifest_before
    with pytest.raises(export.ExportError):
        export.export_onnx(model_dir, out=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # no half-made copy


def test_an_untrained_model_is_refused_because_parity_would_prove_nothing(tmp_path: Path) -> None:
    from inference.manifest import ModelManifest
    from inference.types import PreprocessConfig

    torch.manual_seed(0)
    manifest = ModelManifest(
        name="fresh",
        version="1",
        architecture="efficientnet_b0",
        preprocess=PreprocessConfig(input_height=64, input_width=32),
    )
    save_model(build_model("efficientnet_b0").eval(), manifest, tmp_path)
    with pytest.raises(export.ExportError, match="proves nothing"):
        export.export_onnx(tmp_path)


def test_engines_of_a_previous_graph_are_dropped(exported: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(exported, model_dir)
    data = json.loads((model_dir / "model.json").read_text())
    data["onnx_sha256"] = "0" * 64  # the engines below were built from another graph
    data["engines"] = {"some-gpu": {"file": "engine.plan", "onnx_sha256": "0" * 64}}
    (model_dir / "model.json").write_text(json.dumps(data))
    result = export.export_onnx(model_dir)
    assert result.engines_dropped and load_manifest(model_dir).engines == {}
