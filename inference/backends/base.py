"""What every inference backend (torch, onnxruntime, tensorrt) offers the pipeline.

One interface so the worker batches and scores the same way whatever runs the network, and one
forward pass returns both the logits and the class-activation matrices (design invariant 3).
Torch-free.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from inference.manifest import ModelManifest
from inference.types import MammoNodeError

GRAPH_INPUT = "image"
GRAPH_OUTPUTS: tuple[str, str] = ("logit", "cam")
"""Tensor names of the exported graph (ONNX, and the TensorRT engine built from it): input
``image`` (B, C, H, W) float32 in [0, 1]; outputs ``logit`` (B,) and ``cam`` (B, h, w)."""


class BackendUnavailable(MammoNodeError):
    """A backend cannot be used here (package missing, no GPU, not implemented); ``reason`` says why."""

    def __init__(self, reason: str, *, backend: str | None = None) -> None:
        self.reason = reason
        self.backend = backend
        super().__init__(f"backend {backend!r} unavailable: {reason}" if backend else reason)


@runtime_checkable
class Backend(Protocol):
    """A loaded model ready to score preprocessed batches.

    ``infer`` takes float32 ``(B, C, H, W)`` in [0, 1] on the manifest's model grid and returns
    ``(logits (B,), cams (B, h, w))`` as float32 numpy arrays; batches larger than ``max_batch``
    are split internally, so callers may pass any B >= 1.
    """

    name: str
    manifest: ModelManifest
    max_batch: int

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def check_batch(batch: np.ndarray, manifest: ModelManifest) -> np.ndarray:
    """Validate a batch against the manifest and return it as contiguous float32.

    Shared by all backends so they reject the same inputs: the threshold was calibrated on the
    manifest's grid, and values outside [0, 1] mean preprocessing went wrong upstream.
    """
    arr = np.ascontiguousarray(batch, dtype=np.float32)
    expected = (manifest.in_chans, manifest.preprocess.input_height, manifest.preprocess.input_width)
    if arr.ndim != 4 or arr.shape[1:] != expected or arr.shape[0] < 1:
        raise ValueError(f"batch shape {arr.shape} does not match (B>=1, *{expected})")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("batch values must be finite and in [0, 1]")
    return arr
