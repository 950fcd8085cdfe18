"""One epoch of the training loop: a training pass over the sampler's batches, then validation.

Every random stream of an epoch is seeded from ``(seed, epoch, rank, stream)`` by
:func:`stream_seed`, so an epoch run after a resume draws what it would have drawn in a run that
never stopped. Under torchrun the figures are reduced over all ranks, so every rank returns the
same loss and probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from training import ddp
from training.cam_loss import cam_peak_loss, distractor_peak_loss
from training.loop_types import LabelledDataset, TrainConfig
from training.metrics import pf1, roc_auc
from training.predict import Batch, autocast, collate_items, model_outputs, run_model
from training.transforms import augment


def stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """Distinct, reproducible seeds per (run seed, epoch, rank, stream)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


def train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    config: TrainConfig,
    ctx: ddp.DistContext,
    epoch: int,
    show_progress: bool,
    mask_source: Callable[[Sequence[int]], torch.Tensor] | None = None,
    distractor_source: Callable[[Sequence[int]], torch.Tensor] | None = None,
) -> float:
    """One pass over the sampler's batches; returns the mean training loss over all ranks.

    With ``mask_source`` (``cam_mask_weight > 0``) the lesion masks, and with ``distractor_source``
    (``cam_distractor_weight > 0``) the distractor masks, are augmented with their images and
    the CAM-peak terms are part of the loss.
    """
    model.train()
    generator = torch.Generator().manual_seed(stream_seed(config.seed, epoch, ctx.rank, 1))
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not show_progress, dynamic_ncols=True)
    for batch in cast(Sequence[Batch], bar):
        images = batch.images.to(ctx.device, non_blocking=True)
        labels = batch.labels.to(ctx.device, non_blocking=True)
        sources = [s for s in (mask_source, distractor_source) if s is not None]
        indices = batch.indices.tolist()
        stacked = torch.stack([s(indices) for s in sources], dim=1).to(ctx.device) if sources else None
        if config.augment:
            if stacked is None:
                images = augment(images, config=config.augmentation, generator=generator)
            else:
                images, stacked = augment(images, stacked, config=config.augmentation, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        with autocast(ctx.device, config.amp):
            logits, cams = model_outputs(model, images)
        loss = criterion(logits.float(), labels)
        if mask_source is not None and stacked is not None:
            loss = loss + config.cam_mask_weight * cam_peak_loss(cams.float(), stacked[:, 0])
        if distractor_source is not None and stacked is not None:
            loss = loss + config.cam_distractor_weight * distractor_peak_loss(cams.float(), stacked[:, -1])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double().cpu() * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    totals = ddp.all_reduce_sum(ctx, torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64)]))
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def validate(
    module: nn.Module,
    val_set: LabelledDataset,
    config: TrainConfig,
    ctx: ddp.DistContext,
    show_progress: bool,
) -> tuple[float, torch.Tensor]:
    """Validation loss and image probabilities (dataset order, identical on every rank).

    Each rank scores every ``world_size``-th image. With ``balanced_val_loss`` the loss is the
    mean of the mean loss over malignant images and the mean over benign images: the
    deterministic counterpart of seed 003's class-balanced validation sampling, so a 2 %
    prevalence does not let "always benign" win model selection. Plain BCE otherwise.
    Unweighted by ``pos_weight`` either way, so runs with different weightings compare.
    """
    ddp.broadcast_buffers(ctx, module)
    shard = Subset(cast(Dataset[Any], val_set), list(range(ctx.rank, len(val_set), ctx.world_size)))
    loader: DataLoader[Any] = DataLoader(
        shard,
        batch_size=config.val_batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=collate_items,
        pin_memory=ctx.device.type == "cuda",
    )
    out = run_model(
        module, loader, ctx.device, amp=config.amp, keep_cams=False, progress=show_progress, desc="validate"
    )
    losses = nn.functional.binary_cross_entropy_with_logits(out.logits, out.labels, reduction="none").double()
    pos = out.labels >= 0.5
    sums = torch.stack([losses[pos].sum(), pos.sum().double(), losses[~pos].sum(), (~pos).sum().double()])
    loss_pos, n_pos, loss_neg, n_neg = ddp.all_reduce_sum(ctx, sums).tolist()
    if config.balanced_val_loss and n_pos > 0 and n_neg > 0:
        val_loss = 0.5 * (loss_pos / n_pos + loss_neg / n_neg)
    else:
        val_loss = (loss_pos + loss_neg) / max(n_pos + n_neg, 1)
    probs = torch.full((len(val_set),), math.nan, dtype=torch.float64)
    for indices, shard_probs in ddp.all_gather(ctx, (out.indices, torch.sigmoid(out.logits.double()))):
        probs[indices] = shard_probs
    return val_loss, probs


def history_row(
    epoch: int,
    train_loss: float,
    val_loss: float,
    lr: float,
    val_set: LabelledDataset,
    val_probs: torch.Tensor,
    t0: float,
) -> dict[str, float]:
    """The epoch's line of the history: losses, learning rate, validation AUC and pF1, time."""
    val_labels = np.asarray(val_set.labels, dtype=np.float64)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "lr": lr,
        "val_roc_auc": roc_auc(val_labels, val_probs.numpy()),
        "val_pf1": pf1(val_labels, val_probs.numpy()),
        "seconds": time.perf_counter() - t0,
    }
