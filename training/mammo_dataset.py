"""Torch view of preprocessed mammography samples for the training loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from training.datasets.mammo import MammoSample


class MammoTensorDataset(Dataset[tuple[torch.Tensor, float, str, int]]):
    """Items are (image (1, H, W) float32 in [0, 1], breast label, prediction ID, index).

    Each image carries the label of its breast, as in seed 003; the sampler balances by
    prediction ID using ``prediction_ids`` and ``labels``.
    """

    def __init__(self, samples: Sequence[MammoSample]) -> None:
        self.samples = list(samples)
        self.prediction_ids = [s.prediction_id for s in self.samples]
        self.labels = [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, str, int]:
        sample = self.samples[index]
        image = torch.from_numpy(sample.pixels.astype("float32"))[None]
        return image, float(sample.label), sample.prediction_id, index
