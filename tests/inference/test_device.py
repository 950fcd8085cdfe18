"""One reading of ``cpu`` / ``cuda`` / ``cuda:N`` for the node, the backends and training."""

from __future__ import annotations

import pytest

from inference.device import Device, parse_device


@pytest.mark.parametrize(
    ("text", "device", "index"),
    [
        ("cpu", Device("cpu"), None),
        ("cuda", Device("cuda"), 0),
        ("cuda:0", Device("cuda", 0), 0),
        ("cuda:3", Device("cuda", 3), 3),
    ],
)
def test_parse_device(text: str, device: Device, index: int | None) -> None:
    parsed = parse_device(text)
    assert parsed == device
    assert str(parsed) == text  # round-trips, so it can be handed on to torch
    assert parsed.is_cuda == (index is not None)
    if index is not None:
        assert parsed.cuda_index == index


def test_bare_cuda_keeps_no_index() -> None:
    """Under DDP a bare ``cuda`` means the process's own GPU, not GPU 0: the parse must tell."""
    assert parse_device("cuda").index is None
    assert parse_device("cuda:0").index == 0


@pytest.mark.parametrize(
    "text", ["cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:1.0", "cuda:\u0661"]
)
def test_invalid_cuda_index(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid CUDA device .*; use cuda or cuda:N$"):
        parse_device(text)


@pytest.mark.parametrize("text", ["", "npu", "gpu:0", "tpu", "CPU", "Cuda", "cpu:0", "cudax", " cpu"])
def test_unknown_device(text: str) -> None:
    with pytest.raises(ValueError, match=r"^unknown device .*; use cpu, cuda or cuda:N$"):
        parse_device(text)


def test_cpu_has_no_cuda_index() -> None:
    with pytest.raises(ValueError, match="invalid CUDA device 'cpu'"):
        _ = parse_device("cpu").cuda_index
