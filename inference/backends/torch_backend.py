"""PyTorch backend: eager inference on CPU or CUDA, the reference the other backends must match.

Imports torch; loaded lazily by :mod:`inference.backends.loader`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from inference.backends.base import BackendUnavailable, check_batch
from inference.backends.cuda_runtime import CudaArray
from inference.manifest import ModelManifest
from inference.model_io import load_model

logger = logging.getLogger(__name__)


class TorchBackend:
    """Scores batches with the model from ``model_dir`` (weights verified against the manifest)."""

    name = "torch"

    def __init__(self, model_dir: Path, device: str = "cpu", *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA device requested but torch sees no GPU", backend=self.name)
        self.device = device
        self.max_batch = max_batch
        self.model, manifest = load_model(model_dir, device=device)
        self.manifest: ModelManifest = manifest

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = check_batch(batch, self.manifest)
        logits: list[np.ndarray] = []
        cams: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, arr.shape[0], self.max_batch):
                chunk = torch.from_numpy(arr[start : start + self.max_batch]).to(self.device)
                logit, cam = self.model(chunk)
                logits.append(logit.float().cpu().numpy())
                cams.append(cam.float().cpu().numpy())
        return np.concatenate(logits).astype(np.float32), np.concatenate(cams).astype(np.float32)

    def infer_device(self, batch: CudaArray) -> tuple[np.ndarray, np.ndarray]:
        """Score a float32 (B, C, H, W) batch already in GPU memory (the DALI output), wrapped by
        ``__cuda_array_interface__`` without a copy; the model must be on that GPU."""
        tensor = torch.as_tensor(batch, device=self.device)
        expected = (
            self.manifest.in_chans,
            self.manifest.preprocess.input_height,
            self.manifest.preprocess.input_width,
        )
        if tensor.dtype != torch.float32 or tensor.ndim != 4 or tuple(tensor.shape[1:]) != expected:
            raise ValueError(
                f"device batch {tensor.dtype} {tuple(tensor.shape)} does not match (B, *{expected})"
            )
        logits: list[np.ndarray] = []
        cams: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, tensor.shape[0], self.max_batch):
                logit, cam = self.model(tensor[start : start + self.max_batch])
                logits.append(logit.float().cpu().numpy())
                cams.append(cam.float().cpu().numpy())
        return np.concatenate(logits).astype(np.float32), np.concatenate(cams).astype(np.float32)
