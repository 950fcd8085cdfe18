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

    def lesion_masks(self, indices: Sequence[int]) -> torch.Tensor:
        """``(B, H, W)`` bool lesion masks on the model grid; all False where none is known."""
        return self._masks(indices, "mask")

    def distractor_masks(self, indices: Sequence[int]) -> torch.Tensor:
        """``(B, H, W)`` bool distractor masks on the model grid; all False where none is known."""
        return self._masks(indices, "distractors")

    def _masks(self, indices: Sequence[int], name: str) -> torch.Tensor:
        out = torch.zeros((len(indices), *self.samples[0].pixels.shape), dtype=torch.bool)
        for row, index in enumerate(indices):
            mask = getattr(self.samples[index], name)
            if mask is not None:
                out[row] = torch.from_numpy(mask.astype(bool))
        return out
