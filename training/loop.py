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
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from inference.device import parse_device
from training import ddp
from training.cam_loss import cam_peak_loss
from training.metrics import pf1, roc_auc
from training.predict import Batch, autocast, collate_items, model_outputs, run_model
from training.sampler import BalancedPredictionIdSampler
from training.transforms import AugmentConfig, augment

logger = logging.getLogger(__name__)
_M = TypeVar("_M", bound=nn.Module)

CHECKPOINT_FORMAT = "mammonode-train-checkpoint/1"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


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
    """Validation loss = mean of the per-class mean losses (see :func:`_validate`)."""
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    """Flip/affine probabilities and ranges; the default is seed 003's recipe."""
    resume: Path | None = None
    cam_mask_weight: float = 0.0
    """Weight of :func:`training.cam_loss.cam_peak_loss` (lesion-mask guidance of the CAM peak)
    added to the training loss; 0 = seed 003 (image labels only). Needs a :class:`MaskedDataset`.
    The validation loss, which selects the checkpoint, stays the image loss."""
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
    """Outcome of :func:`train`. The validation arrays are those of the best epoch."""

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


@dataclass
class _State:
    """What changes from epoch to epoch and must survive a resume."""

    epoch: int = 0  # last completed epoch (1-based); 0 = none
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    es_reference: float = math.inf  # loss an epoch must beat by min_delta to reset the patience
    es_wait: int = 0
    stopped_early: bool = False
    best_val_probabilities: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


def _stream_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """Distinct, reproducible seeds per (run seed, epoch, rank, stream)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


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


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated ``last.pt``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _checkpoint(
    config: TrainConfig,
    state: _State,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
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


def _restore(
    path: Path,
    config: TrainConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> _State:
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
    return _State(
        epoch=int(ckpt["epoch"]),
        history=list(ckpt["history"]),
        best_val_loss=float(ckpt["best_val_loss"]),
        best_epoch=int(ckpt["best_epoch"]),
        es_reference=float(ckpt["es_reference"]),
        es_wait=int(ckpt["es_wait"]),
        stopped_early=bool(ckpt["stopped_early"]),
        best_val_probabilities=ckpt["best_val_probabilities"].cpu(),
    )


def _train_epoch(
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
) -> float:
    """One pass over the sampler's batches; returns the mean training loss over all ranks.

    With ``mask_source`` (``cam_mask_weight > 0``) the masks are augmented with their images and
    the CAM-peak term is part of the loss.
    """
    model.train()
    generator = torch.Generator().manual_seed(_stream_seed(config.seed, epoch, ctx.rank, 1))
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not show_progress, dynamic_ncols=True)
    for batch in cast(Sequence[Batch], bar):
        images = batch.images.to(ctx.device, non_blocking=True)
        labels = batch.labels.to(ctx.device, non_blocking=True)
        masks = None if mask_source is None else mask_source(batch.indices.tolist()).to(ctx.device)
        if config.augment:
            if masks is None:
                images = augment(images, config=config.augmentation, generator=generator)
            else:
                images, masks = augment(images, masks, config=config.augmentation, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        with autocast(ctx.device, config.amp):
            logits, cams = model_outputs(model, images)
        loss = criterion(logits.float(), labels)
        if masks is not None:
            loss = loss + config.cam_mask_weight * cam_peak_loss(cams.float(), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double().cpu() * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    totals = ddp.all_reduce_sum(ctx, torch.stack([loss_sum, torch.tensor(count, dtype=torch.float64)]))
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def _validate(
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
    state = _State()
    if config.resume is not None:
        state = _restore(Path(config.resume), config, module, optimizer, scheduler, scaler, ctx.device)
        _carry_best_checkpoint(Path(config.resume), best_path, ctx)
        logger.info("resumed from %s after epoch %d", config.resume, state.epoch)

    model: nn.Module = module
    if ctx.enabled:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids)

    criterion, mask_source = _criterion(config, train_set, ctx)
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
        torch.manual_seed(_stream_seed(config.seed, epoch, ctx.rank, 2))
        sampler.set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        train_loss = _train_epoch(
            model, loader, optimizer, scaler, criterion, config, ctx, epoch, show, mask_source
        )
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged: mean loss {train_loss} in epoch {epoch}")
        val_loss, val_probs = _validate(module, val_set, config, ctx, show)
        scheduler.step(val_loss)
        state.history.append(_history_row(epoch, train_loss, val_loss, lr, val_set, val_probs, t0))
        improved = _end_epoch(state, config, epoch, val_loss, val_probs)
        if ctx.is_main:
            _save_atomic(_checkpoint(config, state, module, optimizer, scheduler, scaler), last_path)
            if improved:
                tmp = best_path.with_name(BEST_CHECKPOINT + ".tmp")
                shutil.copyfile(last_path, tmp)
                tmp.replace(best_path)
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
) -> tuple[nn.BCEWithLogitsLoss, Callable[[Sequence[int]], torch.Tensor] | None]:
    """The (class-weighted) loss, and the lesion masks when the CAM is guided by them."""
    mask_source: Callable[[Sequence[int]], torch.Tensor] | None = None
    if config.cam_mask_weight > 0:
        if not hasattr(train_set, "lesion_masks"):
            raise ValueError("cam_mask_weight > 0 needs a training set with lesion masks")
        mask_source = cast(MaskedDataset, train_set).lesion_masks
    pos_weight = _pos_weight(config, train_set.labels)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=ctx.device)
    )
    return criterion, mask_source


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


def _history_row(
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


def _log_early_stop(state: _State, config: TrainConfig) -> None:
    logger.info(
        "early stop after epoch %d: no improvement of %.3g in %d epochs; best epoch %d",
        state.epoch,
        config.early_stopping_min_delta,
        config.early_stopping_patience,
        state.best_epoch,
    )


def _end_epoch(
    state: _State, config: TrainConfig, epoch: int, val_loss: float, val_probs: torch.Tensor
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


def load_checkpoint_weights(model: _M, path: Path) -> _M:
    """Put the weights of a checkpoint written by :func:`train` into ``model``, in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model


def _carry_best_checkpoint(resume: Path, best_path: Path, ctx: ddp.DistContext) -> None:
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
