"""The one reading of a device string (``cpu``, ``cuda``, ``cuda:N``) for every backend and trainer.

The node's ``device`` setting, the ONNX Runtime providers, the TensorRT engine's GPU and the
training loop all take the same words; parsing them in one place keeps their errors and their
idea of ``cuda`` (no index: the default GPU, or under DDP the process's own) the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

CPU: Final = "cpu"
CUDA: Final = "cuda"


@dataclass(frozen=True)
class Device:
    """A parsed device: ``cpu``, or a CUDA GPU with an explicit index or none (``cuda``)."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None
    """The N of ``cuda:N``; None for ``cpu`` and for a bare ``cuda``."""

    @property
    def is_cuda(self) -> bool:
        return self.kind == CUDA

    @property
    def cuda_index(self) -> int:
        """The GPU to use: N, or 0 for a bare ``cuda``; ValueError for the CPU."""
        if not self.is_cuda:
            raise ValueError(f"invalid CUDA device {str(self)!r}; use cuda or cuda:N")
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str) -> Device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a :class:`Device`; ValueError (one line) for anything else.

    ``cuda:`` with a missing, signed or non-decimal index is an *invalid CUDA device*; any other
    word is an *unknown device*.
    """
    kind, colon, index = str(text).partition(":")
    if kind == CPU and not colon:
        return Device(CPU)
    if kind == CUDA:
        if not colon:
            return Device(CUDA)
        if index.isascii() and index.isdigit():
            return Device(CUDA, int(index))
        raise ValueError(f"invalid CUDA device {text!r}; use cuda or cuda:N")
    raise ValueError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
