"""Tiny stand-ins for the loop tests: a CAM model with MammoNet's forward signature and a dataset.

Kept free of :mod:`inference.model` so the loop is tested on its own; the DDP test's worker
script imports this module too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyCamNet(nn.Module):
    """conv -> (BN) -> ReLU -> 4x4 pool -> GAP -> dropout -> linear; returns (logit, cam)."""

    def __init__(self, in_chans: int = 1, batch_norm: bool = True, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.pool = nn.AvgPool2d(4)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pool(torch.relu(self.norm(self.conv(x))))
        logit = self.fc(self.dropout(f.mean(dim=(2, 3)))).squeeze(1)
        cam = torch.einsum("bkhw,k->bhw", f, self.fc.weight[0])
        return logit, cam


class ToyBreasts(Dataset[tuple[torch.Tensor, float, str, int]]):
    """``n_ids`` prediction IDs of 1-3 images; malignant ones show a bright square.

    Every ``positive_every``-th ID is malignant, so classes are unbalanced like screening data.
    """

    def __init__(
        self, n_ids: int = 24, positive_every: int = 4, size: tuple[int, int] = (16, 16), seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        images: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        self.labels: list[float] = []
        self.prediction_ids: list[str] = []
        h, w = size
        for i in range(n_ids):
            label = 1.0 if i % positive_every == 0 else 0.0
            for _ in range(1 + i % 3):
                img = torch.rand(1, h, w, generator=gen) * 0.3
                mask = torch.zeros(h, w, dtype=torch.bool)
                if label:
                    y = int(torch.randint(0, h - 5, (1,), generator=gen))
                    x = int(torch.randint(0, w - 5, (1,), generator=gen))
                    img[:, y : y + 5, x : x + 5] = 1.0
                    mask[y : y + 5, x : x + 5] = True
                images.append(img)
                masks.append(mask)
                self.labels.append(label)
                self.prediction_ids.append(f"p{i}_L")
        self.images = torch.stack(images) if images else torch.zeros(0, 1, h, w)
        self.masks = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, str, int]:
        return self.images[index], self.labels[index], self.prediction_ids[index], index


class MaskedToyBreasts(ToyBreasts):
    """:class:`ToyBreasts` that also hands the loop its squares as lesion masks."""

    def lesion_masks(self, indices: list[int]) -> torch.Tensor:
        return self.masks[torch.as_tensor(indices, dtype=torch.long)]
