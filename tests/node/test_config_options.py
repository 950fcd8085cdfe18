"""Settings that take one of a few words are enums that accept their words; a bad value, from the
TOML file or the environment, is one readable line naming the setting (or the variable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.backends.loader import AUTO, available_backends
from node.config import (
    ConfigError,
    InferenceBackend,
    NodeConfig,
    Preprocessing,
    UnknownSopClasses,
    load_config,
)


def test_options_accept_their_words() -> None:
    config = NodeConfig(unknown_sop_classes="reject", backend="torch", preprocessing="dali")  # type: ignore[arg-type]
    assert config.unknown_sop_classes is UnknownSopClasses.REJECT
    assert config.backend is InferenceBackend.TORCH
    assert config.preprocessing is Preprocessing.DALI
    assert config.backend == "torch"  # and still compare equal to them
    described = config.describe()
    assert (described["unknown_sop_classes"], described["backend"], described["preprocessing"]) == (
        "reject",
        "torch",
        "dali",
    )
    assert type(described["backend"]) is str
    json.dumps(described)


def test_defaults_are_members() -> None:
    config = NodeConfig()
    assert config.unknown_sop_classes is UnknownSopClasses.IGNORE
    assert config.backend is InferenceBackend.AUTO
    assert config.preprocessing is Preprocessing.CPU


def test_backend_words_are_the_registry_names() -> None:
    assert {str(b) for b in InferenceBackend} == {AUTO, *available_backends()}


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("unknown_sop_classes", "drop", "unknown_sop_classes must be one of ignore, reject, not 'drop'"),
        ("backend", "openvino", "backend must be one of auto, torch, onnxruntime, tensorrt, not 'openvino'"),
        ("preprocessing", "gpu", "preprocessing must be one of cpu, dali, not 'gpu'"),
        ("device", "gpu", "device must be cpu, cuda or cuda:N, not 'gpu'"),
    ],
)
def test_a_bad_word_in_the_file_names_the_setting(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    path = tmp_path / "mammonode.toml"
    path.write_text(f'{setting} = "{value}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as bad:
        load_config(path, environ={})
    assert str(bad.value) == message


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAMMONODE_PORT", "abc", "MAMMONODE_PORT must be a number, got 'abc'"),
        ("MAMMONODE_BATCH_SIZE", "8x", "MAMMONODE_BATCH_SIZE must be a number, got '8x'"),
        (
            "MAMMONODE_STUDY_QUIET_SECONDS",
            "soon",
            "MAMMONODE_STUDY_QUIET_SECONDS must be a number, got 'soon'",
        ),
        (
            "MAMMONODE_UNKNOWN_SOP_CLASSES",
            "Reject",
            "MAMMONODE_UNKNOWN_SOP_CLASSES must be one of ignore, reject, not 'Reject'",
        ),
        (
            "MAMMONODE_BACKEND",
            "trt",
            "MAMMONODE_BACKEND must be one of auto, torch, onnxruntime, tensorrt, not 'trt'",
        ),
        (
            "MAMMONODE_WRITE_PRESENTATION_STATES",
            "maybe",
            "MAMMONODE_WRITE_PRESENTATION_STATES must be true or false, got 'maybe'",
        ),
    ],
)
def test_a_bad_environment_value_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as bad:
        load_config(environ={variable: value})
    assert str(bad.value) == message
    assert "\n" not in str(bad.value)


def test_environment_words_become_members() -> None:
    config = load_config(
        environ={"MAMMONODE_BACKEND": "onnxruntime", "MAMMONODE_UNKNOWN_SOP_CLASSES": "reject"}
    )
    assert config.backend is InferenceBackend.ONNXRUNTIME
    assert config.unknown_sop_classes is UnknownSopClasses.REJECT


def test_output_switches_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "mammonode.toml"
    path.write_text("cam_opacity_follows_probability = true\n", encoding="utf-8")
    config = load_config(path, environ={"MAMMONODE_WRITE_PRESENTATION_STATES": "yes"})
    assert config.cam_opacity_follows_probability is True
    assert config.write_presentation_states is True
    assert load_config(environ={}).write_presentation_states is False
