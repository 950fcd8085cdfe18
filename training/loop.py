"""The seed-003 training loop, shared by mammography and histology models.

Each image carries its breast's label and is scored on its own (BCE with logits on image-level
logits); batches are all images of ``batch_ids`` prediction IDs drawn class-balanced
(:mod:`training.sampler`), augmented on the device (:mod:`training.transforms`). Adam at 1e-3,
learning rate divided by 10 when the validation loss stops improving (down to 1e-6), early stop
after 8 epochs without an improvement of 0.01, and the lowest-validation-loss weights kept.

Reproducible and resumable: every random stream (sampling, augmentation, dropout) is re-seeded
from ``(seed, epoch, rank)`` at the start of each epoch, so a run resumed from ``last.pt`` follows
the same trajectory as one that never stopped. Runs single-process or under ``torchrun`` with
DistributedDataParallel (see :mod:`training.ddp`).

This module is the loop itself: set up, run epochs, keep the best, stop early. Its settings,
datasets and result are in :mod:`training.loop_types`, one epoch in :mod:`training.epoch`, and
``last.pt`` / ``best.pt`` in :mod:`training.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from training import ddp
from training.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    TrainState,
    carry_best_checkpoint,
    make_checkpoint,
    restore,
    save_epoch,
)
from training.epoch import history_row, stream_seed, train_epoch, validate
from training.loop_types import LabelledDataset, MaskedDataset, TrainConfig, TrainResult
from training.predict import collate_items
from training.sampler import BalancedPredictionIdSampler

MaskSource = Callable[[Sequence[int]], torch.Tensor]
"""Masks on the model grid, ``(B, H, W)``, of the training items with the given indices."""

logger = logging.getLogger(__name__)


def _check_dataset(name: str, dataset: LabelledDataset) -> None:
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name} is empty")
    if len(dataset.prediction_ids) != n or len(dataset.labels) != n:
        raise ValueError(
            f"{name}: prediction_ids ({len(dataset.prediction_ids)}) and labels ({len(dataset.labels)}) "
            f"must have one entry per item ({n})"
        )


def _pos_weight(config: TrainConfig, labels: Sequence[float]) -> float | None:
    if config.class_weighting == "none":
        return None
    n_pos = sum(1 for y in labels if float(y) >= 0.5)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        logger.warning("class_weighting=balanced but the training set has one class; no weighting")
        return None
    if config.balanced_sampling:
        logger.warning("class weighting on top of balanced sampling over-weights positives")
    return n_neg / n_pos


def train(
    config: TrainConfig,
    train_set: LabelledDataset,
    val_set: LabelledDataset,
    model_factory: Callable[[], nn.Module],
) -> TrainResult:
    """Train a ``(logit, cam)`` model; write ``best.pt`` and ``last.pt`` under ``config.out_dir``.

    ``model_factory`` builds the untrained model (e.g. ``lambda: build_model("efficientnet_b0")``);
    it is called after seeding, so every rank starts from the same weights. Both checkpoints hold
    model, optimizer, scheduler and scaler states, epoch, history, config and early-stopping
    state; ``config.resume`` continues from one at the next epoch (``config.epochs`` is the total).
    Under torchrun only rank 0 writes; every rank returns the same result. The global torch RNG
    is re-seeded (for dropout) at the start of each epoch.
    """
    _check_dataset("train_set", train_set)
    _check_dataset("val_set", val_set)
    ctx = ddp.setup(config.device)
    try:
        return _run(config, train_set, val_set, model_factory, ctx)
    finally:
        ddp.teardown(ctx)


def _run(
    config: TrainConfig,
    train_set: LabelledDataset,
    val_set: LabelledDataset,
    model_factory: Callable[[], nn.Module],
    ctx: ddp.DistContext,
) -> TrainResult:
    out_dir = Path(config.out_dir)
    best_path, last_path = out_dir / BEST_CHECKPOINT, out_dir / LAST_CHECKPOINT
    show = ctx.is_main and (sys.stderr.isatty() if config.progress is None else config.progress)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    module = model_factory().to(ctx.device)
    optimizer, scheduler, scaler = _optimisers(config, module, ctx)
    state = TrainState()
    if config.resume is not None:
        state = restore(Path(config.resume), config, module, optimizer, scheduler, scaler, ctx.device)
        carry_best_checkpoint(Path(config.resume), best_path, ctx)
        logger.info("resumed from %s after epoch %d", config.resume, state.epoch)

    model: nn.Module = module
    if ctx.enabled:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids)

    criterion, *masks = _criterion(config, train_set, ctx)
    sampler, loader = _loader(config, train_set, ctx)
    if ctx.is_main:
        _log_start(config, train_set, val_set, len(sampler), ctx)

    start = state.epoch + 1
    if state.stopped_early:
        logger.info("the resumed run had already stopped early; nothing to do")
        start = config.epochs + 1
    for epoch in range(start, config.epochs + 1):
        t0 = time.perf_counter()
        # Every stream depends only on (seed, epoch, rank): resuming reproduces the same run.
        torch.manual_seed(stream_seed(config.seed, epoch, ctx.rank, 2))
        sampler.set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss = train_epoch(
            model, loader, optimizer, scaler, criterion, config, ctx, epoch, show, *masks
        )
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged: mean loss {train_loss} in epoch {epoch}")
        val_loss, val_probs = validate(module, val_set, config, ctx, show)
        scheduler.step(val_loss)
        state.history.append(history_row(epoch, train_loss, val_loss, lr, val_set, val_probs, t0))
        improved = _end_epoch(state, config, epoch, val_loss, val_probs)
        if ctx.is_main:
            checkpoint = make_checkpoint(config, state, module, optimizer, scheduler, scaler)
            save_epoch(checkpoint, last_path, best_path, improved)
            _log_epoch(state.history[-1], config, improved)
        ddp.barrier(ctx)
        if state.stopped_early:
            if ctx.is_main:
                _log_early_stop(state, config)
            break

    return TrainResult(
        best_val_loss=state.best_val_loss,
        best_epoch=state.best_epoch,
        history=state.history,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        stopped_early=state.stopped_early,
        val_probabilities=state.best_val_probabilities.numpy(),
        val_labels=np.asarray(val_set.labels, dtype=np.float64),
        val_prediction_ids=list(val_set.prediction_ids),
    )


def _optimisers(
    config: TrainConfig, module: nn.Module, ctx: ddp.DistContext
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.ReduceLROnPlateau, torch.amp.GradScaler]:
    """Adam over the trainable parameters, the plateau scheduler and the loss scaler."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=config.lr)
    # torch counts the bad epochs it tolerates; the config counts those that trigger a change.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=config.plateau_factor,
        patience=config.plateau_patience - 1,
        min_lr=config.min_lr,
        eps=0.0,  # torch skips changes below 1e-8 by default, which stalls tiny learning rates
    )
    # Loss scaling only for float16 on CUDA; bfloat16 on CPU has float32's range.
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.amp and ctx.device.type == "cuda")
    return optimizer, scheduler, scaler


def _criterion(
    config: TrainConfig, train_set: LabelledDataset, ctx: ddp.DistContext
) -> tuple[nn.BCEWithLogitsLoss, MaskSource | None, MaskSource | None]:
    """The (class-weighted) loss, and the lesion and distractor masks when the CAM is guided by them."""
    mask_source: MaskSource | None = None
    distractor_source: MaskSource | None = None
    if config.cam_mask_weight > 0:
        if not hasattr(train_set, "lesion_masks"):
            raise ValueError("cam_mask_weight > 0 needs a training set with lesion masks")
        mask_source = cast(MaskedDataset, train_set).lesion_masks
    if config.cam_distractor_weight > 0:
        if not hasattr(train_set, "distractor_masks"):
            raise ValueError("cam_distractor_weight > 0 needs a training set with distractor masks")
        distractor_source = cast(MaskSource, train_set.distractor_masks)
    pos_weight = _pos_weight(config, train_set.labels)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=ctx.device)
    )
    return criterion, mask_source, distractor_source


def _loader(
    config: TrainConfig, train_set: LabelledDataset, ctx: ddp.DistContext
) -> tuple[BalancedPredictionIdSampler, DataLoader[Any]]:
    """The prediction-ID batch sampler (this rank's share) and the loader over it."""
    sampler = BalancedPredictionIdSampler(
        train_set.prediction_ids,
        train_set.labels,
        batch_ids=config.batch_ids,
        num_batches=config.batches_per_epoch,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        balanced=config.balanced_sampling,
    )
    loader: DataLoader[Any] = DataLoader(
        cast(Dataset[Any], train_set),
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate_items,
        pin_memory=ctx.device.type == "cuda",
    )
    return sampler, loader


def _log_start(
    config: TrainConfig,
    train_set: LabelledDataset,
    val_set: LabelledDataset,
    batches: int,
    ctx: ddp.DistContext,
) -> None:
    logger.info(
        "training %s: %d train / %d validation images, %d batches of %d prediction IDs per epoch%s",
        config.architecture,
        len(train_set),
        len(val_set),
        batches,
        config.batch_ids,
        f" on {ctx.world_size} processes" if ctx.enabled else "",
    )


def _log_early_stop(state: TrainState, config: TrainConfig) -> None:
    logger.info(
        "early stop after epoch %d: no improvement of %.3g in %d epochs; best epoch %d",
        state.epoch,
        config.early_stopping_min_delta,
        config.early_stopping_patience,
        state.best_epoch,
    )


def _end_epoch(
    state: TrainState, config: TrainConfig, epoch: int, val_loss: float, val_probs: torch.Tensor
) -> bool:
    """Update the best epoch and the early-stopping count; True when this epoch is the best."""
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch = val_loss, epoch
        state.best_val_probabilities = val_probs
    if val_loss < state.es_reference - config.early_stopping_min_delta:
        state.es_reference, state.es_wait = val_loss, 0
    else:
        state.es_wait += 1
    state.stopped_early = state.es_wait >= config.early_stopping_patience
    state.epoch = epoch
    return improved


def _log_epoch(row: dict[str, float], config: TrainConfig, improved: bool) -> None:
    logger.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f%s, lr %.2g, val AUC %.3f, val pF1 %.3f (%.1f s)",
        row["epoch"],
        config.epochs,
        row["train_loss"],
        row["val_loss"],
        " (best)" if improved else "",
        row["lr"],
        row["val_roc_auc"],
        row["val_pf1"],
        row["seconds"],
    )
