"""What the training loop takes and gives: its settings, the datasets it reads, its result.

:class:`TrainConfig` holds one run's hyper-parameters (seed 003's by default),
:class:`LabelledDataset` and :class:`MaskedDataset` say what the loop needs from a dataset, and
:class:`TrainResult` is what :func:`training.loop.train` returns. Shared by the loop
(:mod:`training.loop`), one epoch (:mod:`training.epoch`) and the checkpoints
(:mod:`training.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from inference.device import parse_device
from training.transforms import AugmentConfig


class LabelledDataset(Protocol):
    """What the loop needs from a dataset: items, plus per-index prediction IDs and labels.

    Items are ``(image (C, H, W) float in [0, 1], label, prediction_id, index)``. The sampler
    groups indices by ``prediction_ids`` and balances classes with ``labels`` without loading
    any image.
    """

    @property
    def prediction_ids(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Sequence[float]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, str, int]: ...


class MaskedDataset(LabelledDataset, Protocol):
    """A dataset that also has lesion masks on the model grid, for ``cam_mask_weight``."""

    def lesion_masks(self, indices: Sequence[int]) -> torch.Tensor:
        """``(B, H, W)`` bool masks of the items ``indices``; all False where none is known."""
        ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run; defaults are seed 003's.

    Patience counts epochs without improvement before acting (Keras semantics, as in the seed):
    ``plateau_patience=1`` lowers the learning rate after the first epoch whose validation loss
    did not improve.
    """

    architecture: str = "efficientnet_b0"
    out_dir: Path = Path("runs/train")
    epochs: int = 50
    batch_ids: int = 8
    batches_per_epoch: int | None = None
    """Batches per rank and epoch; None = about one pass over the training prediction IDs."""
    lr: float = 1e-3
    min_lr: float = 1e-6
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    early_stopping_patience: int = 8
    early_stopping_min_delta: float = 0.01
    amp: bool = False
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 0
    class_weighting: Literal["none", "balanced"] = "none"
    """``balanced``: BCE ``pos_weight = n_negative / n_positive`` images (histology, seed 002)."""
    balanced_sampling: bool = True
    """Draw benign and malignant prediction IDs equally often (seed 003)."""
    balanced_val_loss: bool = True
    """Validation loss = mean of the per-class mean losses (see :func:`training.epoch.validate`)."""
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    """Flip/affine probabilities and ranges; the default is seed 003's recipe."""
    resume: Path | None = None
    cam_mask_weight: float = 0.0
    """Weight of :func:`training.cam_loss.cam_peak_loss` (lesion-mask guidance of the CAM peak)
    added to the training loss; 0 = seed 003 (image labels only). Needs a :class:`MaskedDataset`.
    The validation loss, which selects the checkpoint, stays the image loss."""
    cam_distractor_weight: float = 0.0
    """Weight of :func:`training.cam_loss.distractor_peak_loss` (keeps the CAM peak off the
    phantoms' skin markers, clips, vessels...); 0 = off. Needs a dataset with ``distractor_masks``."""
    val_batch_size: int = 16
    progress: bool | None = None
    """Show tqdm bars; None = only when stderr is a terminal."""

    def __post_init__(self) -> None:
        positive_ints = (
            "epochs",
            "batch_ids",
            "plateau_patience",
            "early_stopping_patience",
            "val_batch_size",
        )
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {self.batches_per_epoch}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.early_stopping_min_delta < 0:
            raise ValueError(f"early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}")
        if not self.cam_mask_weight >= 0:
            raise ValueError(f"cam_mask_weight must be >= 0, got {self.cam_mask_weight}")
        if not self.cam_distractor_weight >= 0:
            raise ValueError(f"cam_distractor_weight must be >= 0, got {self.cam_distractor_weight}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.class_weighting not in ("none", "balanced"):
            raise ValueError(f"class_weighting must be 'none' or 'balanced', got {self.class_weighting!r}")
        parse_device(self.device)  # ValueError naming the device

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with ``torch.load(weights_only=True)``."""
        data = asdict(self)  # nested AugmentConfig becomes a dict too
        data["out_dir"] = str(self.out_dir)
        data["resume"] = None if self.resume is None else str(self.resume)
        return data


@dataclass
class TrainResult:
    """Outcome of :func:`training.loop.train`. The validation arrays are those of the best epoch."""

    best_val_loss: float
    best_epoch: int
    history: list[dict[str, float]]
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_early: bool
    val_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Image-level probabilities on the validation set at the best epoch, in dataset order."""
    val_labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_prediction_ids: list[str] = field(default_factory=list)
