"""Batched forward passes of a CAM model over a labelled dataset, for validation and prediction.

Shared by the training loop (validation every epoch) and by callers that need image
probabilities and CAMs from a trained ``nn.Module`` without going through a serving backend.
Dataset items are ``(image (C, H, W) float in [0, 1], label, prediction_id, index)``, the same
items the training loop consumes, so histology patches and mammograms both fit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class Batch(NamedTuple):
    """A collated batch: images (B, C, H, W), float32 labels (B,), IDs and dataset indices (B,)."""

    images: torch.Tensor
    labels: torch.Tensor
    prediction_ids: list[str]
    indices: torch.Tensor


def collate_items(items: Sequence[Any]) -> Batch:
    """Stack ``(image, label, prediction_id, index)`` items into a :class:`Batch`.

    Written out instead of ``default_collate`` so labels are float32 (not float64) and IDs stay a
    list of strings, whatever the dataset returns.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    for item in items[:1]:
        if not (isinstance(item, tuple | list) and len(item) == 4 and isinstance(item[0], torch.Tensor)):
            raise ValueError(
                "dataset items must be (image tensor (C, H, W), label, prediction_id, index); "
                f"got {type(item).__name__}"
            )
    images = torch.stack([item[0] for item in items])
    if images.dim() != 4:
        raise ValueError(f"images must be (C, H, W); the batch has shape {tuple(images.shape)}")
    labels = torch.tensor([float(item[1]) for item in items], dtype=torch.float32)
    ids = [str(item[2]) for item in items]
    indices = torch.tensor([int(item[3]) for item in items], dtype=torch.int64)
    return Batch(images.float() if not images.is_floating_point() else images, labels, ids, indices)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """Mixed precision: bfloat16 on CPU (no loss scaling needed), float16 on CUDA."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def model_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the model and check it returns ``(logit (B,), cam (B, h, w))`` (design invariant 3)."""
    out = model(images)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise ValueError("the model must return (logit (B,), cam (B, h, w))")
    logit, cam = cast(tuple[torch.Tensor, torch.Tensor], tuple(out))
    if logit.dim() != 1 or logit.shape[0] != images.shape[0]:
        raise ValueError(f"logit must have shape ({images.shape[0]},), got {tuple(logit.shape)}")
    return logit, cam


class Outputs(NamedTuple):
    """Model outputs over a whole loader, concatenated in loader order."""

    logits: torch.Tensor  # (N,) float32, CPU
    cams: torch.Tensor | None  # (N, h, w) float32, CPU; None unless asked for
    labels: torch.Tensor  # (N,) float32
    indices: torch.Tensor  # (N,) int64 dataset indices


def run_model(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    amp: bool = False,
    keep_cams: bool = True,
    progress: bool = False,
    desc: str = "predict",
) -> Outputs:
    """Forward every batch of ``loader`` in eval mode under ``inference_mode``.

    No autograd bookkeeping, and dropout/batch-norm in inference behaviour. The caller's
    train/eval mode is restored afterwards, so validation can run in the middle of training.
    CAMs are kept only on request; validation needs just the logits.
    """
    was_training = model.training
    model.eval()
    logits: list[torch.Tensor] = []
    cams: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
                images = batch.images.to(device, non_blocking=True)
                with autocast(device, amp):
                    logit, cam = model_outputs(model, images)
                logits.append(logit.float().cpu())
                if keep_cams:
                    cams.append(cam.float().cpu())
                labels.append(batch.labels)
                indices.append(batch.indices)
    finally:
        model.train(was_training)
    if not logits:
        empty = torch.zeros(0)
        return Outputs(empty, torch.zeros(0, 0, 0) if keep_cams else None, empty, empty.long())
    return Outputs(
        torch.cat(logits),
        torch.cat(cams) if keep_cams else None,
        torch.cat(labels),
        torch.cat(indices),
    )


def predict(
    model: nn.Module,
    dataset: Dataset[Any],
    batch_size: int = 16,
    *,
    device: str | torch.device = "cpu",
    amp: bool = False,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image probabilities ``(N,)`` float64 and CAMs ``(N, h, w)`` float32, in dataset order.

    The model is moved to ``device``. ``progress=None`` shows a bar only on a terminal.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    model.to(dev)
    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_items,
        pin_memory=dev.type == "cuda",
    )
    show = sys.stderr.isatty() if progress is None else progress
    out = run_model(model, loader, dev, amp=amp, progress=show)
    assert out.cams is not None
    probs = torch.sigmoid(out.logits.double()).numpy()
    return probs, out.cams.numpy()
