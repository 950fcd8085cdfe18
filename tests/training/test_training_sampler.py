"""Prediction-ID batch sampling (seed 003) and patient-level splits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.sampler import BalancedPredictionIdSampler, group_by_prediction_id, split_by_patient


def _screening_items(
    n_patients: int = 100, positive_every: int = 20
) -> tuple[list[str], list[float], list[str]]:
    """Per image: prediction ID, label, patient. Two breasts per patient, 1-3 views per breast."""
    ids: list[str] = []
    labels: list[float] = []
    patients: list[str] = []
    for p in range(n_patients):
        for side in "LR":
            label = 1.0 if (p % positive_every == 0 and side == "L") else 0.0
            for _ in range(1 + (p + (side == "R")) % 3):
                ids.append(f"{p}_{side}")
                labels.append(label)
                patients.append(str(p))
    return ids, labels, patients


def test_batches_are_class_balanced_over_many_batches() -> None:
    ids, labels, _ = _screening_items()
    sampler = BalancedPredictionIdSampler(ids, labels, batch_ids=8, num_batches=400, seed=1)
    assert sampler.positive_fraction == pytest.approx(0.5)
    pos_ids = 0
    total_ids = 0
    for batch in sampler:
        drawn = Counter(ids[i] for i in batch)
        for pid, n_images in drawn.items():
            # Count each draw: an ID drawn twice contributes its images twice.
            draws = n_images // ids.count(pid)
            total_ids += draws
            pos_ids += draws * int(labels[ids.index(pid)])
    assert total_ids == 400 * 8
    # 5 % of IDs are malignant in the data; the sampler makes it ~50 % (3200 draws, sd ~0.9 %).
    assert 0.46 < pos_ids / total_ids < 0.54


def test_whole_prediction_id_groups_stay_together() -> None:
    ids, labels, _ = _screening_items(30)
    sizes = Counter(ids)
    sampler = BalancedPredictionIdSampler(ids, labels, batch_ids=4, num_batches=50, seed=0)
    for batch in sampler:
        drawn = Counter(ids[i] for i in batch)
        for pid, n_images in drawn.items():
            assert n_images % sizes[pid] == 0  # every image of the ID, as many times as drawn
            indices = {i for i in batch if ids[i] == pid}
            assert indices == {i for i, x in enumerate(ids) if x == pid}


def test_unbalanced_mode_samples_ids_uniformly() -> None:
    ids, labels, _ = _screening_items()
    sampler = BalancedPredictionIdSampler(ids, labels, batch_ids=8, balanced=False)
    assert sampler.positive_fraction == pytest.approx(5 / 200)
    assert len(sampler) == 25  # default: one pass over 200 IDs in batches of 8


def test_seeded_epochs_and_ranks() -> None:
    ids, labels, _ = _screening_items(40)

    def make(rank: int, ws: int) -> BalancedPredictionIdSampler:
        return BalancedPredictionIdSampler(
            ids, labels, batch_ids=3, num_batches=10, seed=5, rank=rank, world_size=ws
        )

    single = make(0, 1)
    assert list(single) == list(make(0, 1))  # deterministic
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first  # a new epoch draws a new stream
    ranks = [make(r, 2) for r in (0, 1)]
    streams = [list(s) for s in ranks]
    assert all(len(s) == 10 for s in streams)  # equal step counts keep DDP in lockstep
    assert streams[0] != streams[1]
    # The ranks interleave one global stream: together they are a 20-batch single-rank stream.
    global_stream = list(BalancedPredictionIdSampler(ids, labels, batch_ids=3, num_batches=20, seed=5))
    assert streams[0] == global_stream[0::2] and streams[1] == global_stream[1::2]


def test_works_as_dataloader_batch_sampler() -> None:
    ids, labels, _ = _screening_items(10)
    sampler = BalancedPredictionIdSampler(ids, labels, batch_ids=2, num_batches=3)
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        TensorDataset(torch.arange(len(ids))), batch_sampler=sampler
    )
    batches = [b[0].tolist() for b in loader]
    assert batches == list(sampler)


def test_single_class_falls_back_to_uniform() -> None:
    sampler = BalancedPredictionIdSampler(["a", "b", "c"], [0.0, 0.0, 0.0], batch_ids=2)
    assert sampler.positive_fraction == 0.0
    assert len(next(iter(sampler))) == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="different labels"):
        group_by_prediction_id(["a", "a"], [0.0, 1.0])
    with pytest.raises(ValueError, match="labels"):
        BalancedPredictionIdSampler(["a"], [0.0, 1.0])
    with pytest.raises(ValueError, match="rank"):
        BalancedPredictionIdSampler(["a"], [0.0], rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_ids"):
        BalancedPredictionIdSampler(["a"], [0.0], batch_ids=0)


def test_split_by_patient_is_disjoint_stratified_and_seeded() -> None:
    ids, labels, patients = _screening_items(100, positive_every=10)
    train, val = split_by_patient(patients, labels, val_fraction=0.2, seed=3)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(patients)
    positive = {p for p, y in zip(patients, labels, strict=True) if y}
    assert len(positive & set(val)) == 2 and len(positive & set(train)) == 8
    assert len(val) == 20
    assert split_by_patient(patients, labels, 0.2, seed=3) == (train, val)
    assert split_by_patient(patients, labels, 0.2, seed=4) != (train, val)
    # Every image of a validation patient is in validation (both breasts, all views).
    val_set = set(val)
    assert {ids[i] for i, p in enumerate(patients) if p in val_set}.isdisjoint(
        {ids[i] for i, p in enumerate(patients) if p not in val_set}
    )


def test_split_keeps_a_positive_on_both_sides_even_when_rare() -> None:
    patients = [str(i) for i in range(50)]
    labels = [1.0 if i < 2 else 0.0 for i in range(50)]
    train, val = split_by_patient(patients, labels, val_fraction=0.05, seed=0)
    assert {"0", "1"} & set(train) and {"0", "1"} & set(val)
    with pytest.raises(ValueError, match="2 positive"):
        split_by_patient(patients, [1.0] + [0.0] * 49, 0.2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_patient(patients, labels, 1.0)
