"""What `mammonode train` was asked for: a leaf module, so every recipe can take it without a circle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.manifest import load_manifest
from inference.types import InputError

if TYPE_CHECKING:
    from training.loop_types import TrainConfig


@dataclass(frozen=True)
class TrainRequest:
    """Everything `mammonode train` was asked for."""

    dataset: Path
    out: Path
    layout: str = "rsna"
    architecture: str = "efficientnet_b0"
    input_size: tuple[int, int] = (1024, 512)
    epochs: int = 50
    batch_ids: int = 8
    batches_per_epoch: int | None = None
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    resume: Path | None = None
    amp: bool = False
    device: str = "cpu"
    workers: int = 1
    name: str = "mammonode-model"
    version: str = "0.1.0"
    synthetic: bool = False
    target_sensitivity: float = 0.9
    init_model: Path | None = None
    """Model folder whose weights start the run (fine-tuning); None = random initialisation."""
    cam_mask_weight: float = 0.0
    """Lesion-mask guidance of the CAM peak (see :mod:`training.cam_loss`); 0 = seed 003."""
    cam_distractor_weight: float = 0.0
    """Distractor-mask suppression of the CAM peak (phantoms' distractor_masks/); 0 = off."""

    def __post_init__(self) -> None:
        for option, value in (
            ("--cam-mask-weight", self.cam_mask_weight),
            ("--cam-distractor-weight", self.cam_distractor_weight),
        ):
            if not value >= 0:
                raise InputError(f"{option} must be >= 0, got {value}")
            if value > 0 and self.layout != "rsna":
                raise InputError(f"{option} needs masks, which only the rsna layout has")

    def initial_model(self, in_chans: int = 1) -> Any:
        """The untrained model, or the ``init_model`` weights when fine-tuning (checked to fit)."""
        from inference.model import build_model

        model = build_model(self.architecture, in_chans=in_chans)
        if self.init_model is not None:
            from inference.model_io import load_model

            source, manifest = load_model(self.init_model)
            if manifest.architecture != self.architecture or manifest.in_chans != in_chans:
                raise InputError(
                    f"--init-model {self.init_model} is {manifest.architecture} with {manifest.in_chans} "
                    f"channel(s), not {self.architecture} with {in_chans}"
                )
            model.load_state_dict(source.state_dict())
        return model

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about how the weights started and what guided them."""
        info: dict[str, Any] = {
            "cam_mask_weight": self.cam_mask_weight,
            "cam_distractor_weight": self.cam_distractor_weight,
        }
        if self.init_model is not None:
            start = load_manifest(self.init_model)
            info["initialised_from"] = {
                "name": start.name,
                "version": start.version,
                "weights_sha256": start.weights_sha256,
            }
        return info

    def loop_config(self, **overrides: Any) -> TrainConfig:
        """The training-loop settings this request asks for; callers add layout-specific ones."""
        from training.loop_types import TrainConfig

        settings: dict[str, Any] = {
            "architecture": self.architecture,
            "epochs": self.epochs,
            "batch_ids": self.batch_ids,
            "batches_per_epoch": self.batches_per_epoch,
            "lr": self.lr,
            "amp": self.amp,
            "device": self.device,
            "seed": self.seed,
            "out_dir": self.out,
            "resume": self.resume,
            "cam_mask_weight": self.cam_mask_weight,
            "cam_distractor_weight": self.cam_distractor_weight,
            "augment": True,
        }
        return TrainConfig(**{**settings, **overrides})
