"""Batch sampling by prediction ID and patient-level train/validation splits (seed 003).

A prediction ID is one breast of one patient (``patient_laterality``), the unit the RSNA metric
scores. It has one label and one or more images (CC, MLO, ...). Seed 003 draws each batch as all
images of ``batch_ids`` prediction IDs, picked by a weighted random sampler that makes benign and
malignant IDs equally likely, because only about 2 % of breasts are malignant. Histology patches
fit the same scheme with one image per ID.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

_EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs do not collide for small values


def group_by_prediction_id(
    prediction_ids: Sequence[str], labels: Sequence[float]
) -> tuple[list[str], list[list[int]], list[bool]]:
    """Return IDs in first-seen order, the dataset indices of each, and each ID's label.

    Raises ValueError when an ID's images disagree on the label: every image carries its breast's
    label (seed 003), so a disagreement means the dataset was built wrongly.
    """
    if len(prediction_ids) != len(labels):
        raise ValueError(f"{len(prediction_ids)} prediction IDs but {len(labels)} labels")
    if not prediction_ids:
        raise ValueError("cannot sample from an empty dataset")
    positions: dict[str, int] = {}
    groups: list[list[int]] = []
    group_labels: list[bool] = []
    for index, (pid, label) in enumerate(zip(prediction_ids, labels, strict=True)):
        positive = float(label) >= 0.5
        slot = positions.get(pid)
        if slot is None:
            positions[pid] = len(groups)
            groups.append([index])
            group_labels.append(positive)
        else:
            if group_labels[slot] != positive:
                raise ValueError(f"prediction ID {pid!r} has images with different labels")
            groups[slot].append(index)
    return list(positions), groups, group_labels


class BalancedPredictionIdSampler(Sampler[list[int]]):
    """Yields batches of image indices: all images of ``batch_ids`` prediction IDs per batch.

    IDs are drawn with replacement, with benign and malignant IDs equally likely when
    ``balanced`` (uniformly over IDs otherwise, e.g. for histology trained with class weights).
    Pass it to ``DataLoader(dataset, batch_sampler=...)``.

    Reproducible and DDP-aware: the draws of an epoch depend only on ``(seed, epoch)``. One
    stream of ``num_batches * world_size`` batches is drawn and rank ``r`` takes batches
    ``r, r + world_size, ...``, so ranks see disjoint parts of one stream and always the same
    number of steps (unequal step counts would hang DistributedDataParallel). Call
    :meth:`set_epoch` before each epoch, as with ``DistributedSampler``.
    """

    def __init__(
        self,
        prediction_ids: Sequence[str],
        labels: Sequence[float],
        batch_ids: int = 8,
        num_batches: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        balanced: bool = True,
    ) -> None:
        super().__init__()
        if batch_ids < 1:
            raise ValueError(f"batch_ids must be >= 1, got {batch_ids}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.ids, self.groups, self.id_labels = group_by_prediction_id(prediction_ids, labels)
        self.batch_ids = batch_ids
        # Default: about one pass over the IDs per epoch, shared among the ranks.
        self.num_batches = num_batches or max(1, math.ceil(len(self.ids) / (batch_ids * world_size)))
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.weights = self._weights(balanced)

    def _weights(self, balanced: bool) -> torch.Tensor:
        is_pos = torch.tensor(self.id_labels, dtype=torch.bool)
        n_pos = int(is_pos.sum())
        n_neg = len(self.id_labels) - n_pos
        if not balanced:
            return torch.ones(len(self.id_labels), dtype=torch.float64)
        if n_pos == 0 or n_neg == 0:
            logger.warning(
                "only one class among %d prediction IDs (%d malignant); sampling uniformly",
                len(self.id_labels),
                n_pos,
            )
            return torch.ones(len(self.id_labels), dtype=torch.float64)
        # Each class gets half of the probability mass.
        return torch.where(is_pos, 0.5 / n_pos, 0.5 / n_neg).to(torch.float64)

    @property
    def positive_fraction(self) -> float:
        """Probability that a drawn ID is malignant (0.5 when balanced and both classes exist)."""
        pos = torch.tensor(self.id_labels, dtype=torch.bool)
        return float(self.weights[pos].sum() / self.weights.sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream; all ranks must pass the same value."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        total = self.num_batches * self.world_size
        draws = torch.multinomial(self.weights, total * self.batch_ids, replacement=True, generator=generator)
        picks = draws.view(total, self.batch_ids)[self.rank :: self.world_size]
        for row in picks.tolist():
            yield [index for slot in row for index in self.groups[slot]]


def split_by_patient(
    patient_ids: Sequence[str],
    labels: Sequence[float],
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split patients into train and validation sets, stratified by patient label.

    ``patient_ids`` and ``labels`` are per item (image or prediction ID); a patient is positive
    if any of its items is. Splitting by patient, not image, keeps a patient's other breast and
    other views out of the validation set, which would otherwise leak and inflate the metrics.
    Both splits get at least one positive and one negative patient; ValueError when the data
    cannot provide that. Returns two sorted lists of patient IDs.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(patient_ids) != len(labels):
        raise ValueError(f"{len(patient_ids)} patient IDs but {len(labels)} labels")
    positive: dict[str, bool] = {}
    for pid, label in zip(patient_ids, labels, strict=True):
        positive[pid] = positive.get(pid, False) or float(label) >= 0.5
    pos = sorted(p for p, v in positive.items() if v)
    neg = sorted(p for p, v in positive.items() if not v)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(
            "a stratified split needs at least 2 positive and 2 negative patients, "
            f"got {len(pos)} positive and {len(neg)} negative"
        )
    generator = torch.Generator().manual_seed(seed)
    train: list[str] = []
    val: list[str] = []
    for group in (pos, neg):
        order = torch.randperm(len(group), generator=generator).tolist()
        n_val = min(max(1, round(val_fraction * len(group))), len(group) - 1)
        val.extend(group[i] for i in order[:n_val])
        train.extend(group[i] for i in order[n_val:])
    return sorted(train), sorted(val)
