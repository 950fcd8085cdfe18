"""Model directory save/load: identical outputs, SHA-256 checked, strict loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from inference.manifest import ModelManifest, file_sha256, load_manifest
from inference.model import MammoNet, build_model
from inference.model_io import load_model, save_model
from inference.types import InputError, PreprocessConfig


def _trained_looking(arch: str = "cancernet") -> MammoNet:
    """A model with non-trivial BatchNorm statistics and weights (fresh ones output ~0)."""
    torch.manual_seed(0)
    model = build_model(arch, in_chans=1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 64, 32))
        model.fc.bias.fill_(-1.5)
    return model.eval()


def _manifest(arch: str = "cancernet") -> ModelManifest:
    return ModelManifest(
        name="test",
        version="1.0.0",
        architecture=arch,
        preprocess=PreprocessConfig(input_height=64, input_width=32),
        synthetic_training_data=True,
    )


@pytest.mark.parametrize("arch", ["cancernet", "efficientnet_b0"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, arch: str) -> None:
    model = _trained_looking(arch)
    saved = save_model(model, _manifest(arch), tmp_path / "m")
    assert saved.weights_sha256 == file_sha256(tmp_path / "m" / "model.safetensors")
    assert load_manifest(tmp_path / "m") == saved
    loaded, manifest = load_model(tmp_path / "m")
    assert manifest == saved
    assert not loaded.training
    x = torch.rand(2, 1, 64, 32)
    with torch.no_grad():
        a_logit, a_cam = model(x)
        b_logit, b_cam = loaded(x)
    assert torch.equal(a_logit, b_logit) and torch.equal(a_cam, b_cam)
    assert a_logit.abs().min() > 1e-3


def test_tampered_weights_are_rejected(tmp_path: Path) -> None:
    save_model(_trained_looking(), _manifest(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_model(tmp_path)


def test_missing_directory_manifest_or_weights(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "absent")
    with pytest.raises(InputError, match="no model manifest"):
        load_model(tmp_path)
    save_model(_trained_looking(), _manifest(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(tmp_path)


def test_weights_of_another_architecture_fail_strict_load(tmp_path: Path) -> None:
    """A manifest edited to claim another backbone (with a matching hash) still cannot load."""
    save_model(_trained_looking(), _manifest(), tmp_path)
    data = json.loads((tmp_path / "model.json").read_text())
    data["architecture"] = "resnet50"
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="do not fit"):
        load_model(tmp_path)


def test_manifest_must_describe_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest says"):
        save_model(_trained_looking(), _manifest("efficientnet_b0"), tmp_path)


def test_resaving_changed_weights_drops_stale_exports(tmp_path: Path) -> None:
    model = _trained_looking()
    first = save_model(model, _manifest(), tmp_path)
    with_onnx = dataclasses.replace(first, onnx_file="model.onnx", onnx_sha256="d" * 64)
    again = save_model(model, with_onnx, tmp_path)
    assert again.weights_sha256 == first.weights_sha256  # same weights, same bytes, same hash
    assert again.onnx_file == "model.onnx"  # so the export still vouches for them
    with torch.no_grad():
        model.fc.bias.fill_(0.25)
    second = save_model(model, with_onnx, tmp_path)
    assert second.weights_sha256 != first.weights_sha256
    assert second.onnx_file is None and second.onnx_sha256 is None
