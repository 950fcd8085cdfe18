"""Training checkpoints: what survives a resume, and how ``last.pt`` and ``best.pt`` are written
and read back.

A checkpoint holds model, optimizer, scheduler and scaler states, the epoch, the history, the
config and the early-stopping state (:class:`TrainState`), in plain types and tensors only, so it
loads with ``torch.load(weights_only=True)``. ``last.pt`` is written after every epoch,
atomically; ``best.pt`` is a copy of it from the best epoch so far.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from training import ddp
from training.loop_types import TrainConfig

_M = TypeVar("_M", bound=nn.Module)

CHECKPOINT_FORMAT = "mammonode-train-checkpoint/1"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


@dataclass
class TrainState:
    """What changes from epoch to epoch and must survive a resume."""

    epoch: int = 0  # last completed epoch (1-based); 0 = none
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    es_reference: float = math.inf  # loss an epoch must beat by min_delta to reset the patience
    es_wait: int = 0
    stopped_early: bool = False
    best_val_probabilities: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated ``last.pt``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def make_checkpoint(
    config: TrainConfig,
    state: TrainState,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """The checkpoint of the run as it stands after ``state.epoch``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "history": state.history,
        "config": config.to_dict(),
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "es_reference": state.es_reference,
        "es_wait": state.es_wait,
        "stopped_early": state.stopped_early,
        "best_val_probabilities": state.best_val_probabilities,
    }


def save_epoch(checkpoint: dict[str, Any], last_path: Path, best_path: Path, improved: bool) -> None:
    """Write ``last.pt``; when the epoch is the best so far, copy it to ``best.pt`` (atomically)."""
    save_atomic(checkpoint, last_path)
    if improved:
        tmp = best_path.with_name(BEST_CHECKPOINT + ".tmp")
        shutil.copyfile(last_path, tmp)
        tmp.replace(best_path)


def restore(
    path: Path,
    config: TrainConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> TrainState:
    """Load a checkpoint written by :func:`make_checkpoint` into the run; returns its state."""
    if not path.is_file():
        raise ValueError(f"resume checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a MammoNode training checkpoint")
    saved_arch = ckpt["config"].get("architecture")
    if saved_arch != config.architecture:
        raise ValueError(f"{path} was trained as {saved_arch!r}, not {config.architecture!r}")
    module.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return TrainState(
        epoch=int(ckpt["epoch"]),
        history=list(ckpt["history"]),
        best_val_loss=float(ckpt["best_val_loss"]),
        best_epoch=int(ckpt["best_epoch"]),
        es_reference=float(ckpt["es_reference"]),
        es_wait=int(ckpt["es_wait"]),
        stopped_early=bool(ckpt["stopped_early"]),
        best_val_probabilities=ckpt["best_val_probabilities"].cpu(),
    )


def carry_best_checkpoint(resume: Path, best_path: Path, ctx: ddp.DistContext) -> None:
    """Resuming into another folder: bring the earlier ``best.pt`` along, so the result's best
    checkpoint exists even if no later epoch beats it."""
    source = resume.with_name(BEST_CHECKPOINT)
    if (
        ctx.is_main
        and not best_path.exists()
        and source.is_file()
        and source.resolve() != best_path.resolve()
    ):
        shutil.copyfile(source, best_path)


def load_checkpoint_weights(model: _M, path: Path) -> _M:
    """Put the weights of a checkpoint written by :func:`training.loop.train` into ``model``, in
    eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model
