"""Model manifest: round trip, validation of hostile/invalid files, hashing, algorithm info."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from inference.manifest import (
    ModelManifest,
    algorithm_info,
    file_sha256,
    load_manifest,
    read_verified,
    save_manifest,
    verify_weights,
)
from inference.types import RESEARCH_NOTICE, InputError, PreprocessConfig


def _manifest(**kw: object) -> ModelManifest:
    base: dict[str, object] = {
        "name": "demo",
        "version": "0.1.0",
        "architecture": "efficientnet_b0",
        "preprocess": PreprocessConfig(input_height=512, input_width=256),
        "threshold": 0.3,
        "training_data": {"dataset": "synth", "seed": 7, "counts": {"images": 40}},
        "metrics": {"breast": {"auc": 0.9}, "measured_on": "synthetic validation split"},
        "synthetic_training_data": True,
    }
    base.update(kw)
    return ModelManifest(**base)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    m = _manifest(weights_sha256="a" * 64, onnx_file="model.onnx", onnx_sha256="b" * 64)
    save_manifest(m, tmp_path / "m")
    loaded = load_manifest(tmp_path / "m")
    assert loaded == m
    assert loaded.preprocess == PreprocessConfig(input_height=512, input_width=256)
    assert not list((tmp_path / "m").glob("*.tmp"))  # atomic write leaves no temp file


def test_missing_or_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no model manifest"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "model.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "alexnet"}, "architecture"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"aggregation": "median"}, "aggregation"),
        ({"in_chans": 0}, "in_chans"),
        ({"weights_file": "../../etc/passwd"}, "plain file name"),
        ({"weights_file": "sub/model.safetensors"}, "plain file name"),
        ({"weights_sha256": "XYZ"}, "SHA-256"),
        ({"onnx_file": "model.onnx"}, "together"),
        ({"created": "yesterday"}, "ISO date"),
        ({"synthetic_training_data": "yes"}, "true or false"),
        ({"preprocess": {"input_height": 512, "bogus": 1}}, None),  # unknown sub-keys are ignored
        ({"preprocess": [1]}, "preprocess"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_manifest_files_are_input_errors(
    tmp_path: Path, change: dict[str, object], message: str | None
) -> None:
    data = _manifest().to_dict()
    data.update(change)
    (tmp_path / "model.json").write_text(json.dumps(data))
    if message is None:
        assert load_manifest(tmp_path).preprocess.input_height == 512
        return
    with pytest.raises(InputError, match=message):
        load_manifest(tmp_path)


def test_required_keys_and_unknown_keys(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    data["future_field"] = 1
    (tmp_path / "model.json").write_text(json.dumps(data))
    assert load_manifest(tmp_path).name == "demo"
    del data["version"]
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="version"):
        load_manifest(tmp_path)


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
    path = tmp_path / "blob"
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_verify_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    good = _manifest(weights_sha256=hashlib.sha256(b"weights").hexdigest())
    assert verify_weights(tmp_path, good) == tmp_path / "model.safetensors"
    with pytest.raises(InputError, match="SHA-256"):
        verify_weights(tmp_path, _manifest(weights_sha256="0" * 64))
    with pytest.raises(InputError, match="no weights_sha256"):
        verify_weights(tmp_path, _manifest())
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        verify_weights(tmp_path, good)


def test_read_verified_returns_the_bytes_it_hashed_or_refuses(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"graph")
    sha = hashlib.sha256(b"graph").hexdigest()
    assert read_verified(path, sha, what="ONNX graph") == b"graph"
    with pytest.raises(InputError, match=r"ONNX graph .* has SHA-256 .*export it again"):
        read_verified(path, "0" * 64, what="ONNX graph")
    with pytest.raises(InputError, match="no SHA-256"):
        read_verified(path, None, what="ONNX graph")
    with pytest.raises(InputError, match="cannot read"):
        read_verified(tmp_path / "missing.onnx", sha, what="ONNX graph")


def test_algorithm_info_carries_the_research_notice_for_synthetic_models() -> None:
    info = algorithm_info(_manifest(weights_sha256="c" * 64))
    assert (info.name, info.version, info.weights_sha256, info.threshold) == ("demo", "0.1.0", "c" * 64, 0.3)
    assert info.notice == RESEARCH_NOTICE
    assert algorithm_info(_manifest(synthetic_training_data=False)).notice is None
