"""The seed-003 training loop: checkpoints, resume, early stopping, LR plateau, AMP, predict."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from loop_toys import TinyCamNet, ToyBreasts

from training.loop import _pos_weight, train
from training.loop_types import TrainConfig, TrainResult
from training.predict import predict
from training.transforms import NO_AUGMENTATION


def _config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "architecture": "tiny",
        "out_dir": tmp_path / "run",
        "epochs": 2,
        "batch_ids": 4,
        "batches_per_epoch": 4,
        "lr": 1e-2,
        "seed": 0,
        "progress": False,
    }
    base.update(overrides)
    return TrainConfig(**base)


def _deterministic_history(result: TrainResult) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


@pytest.fixture(scope="module")
def data() -> tuple[ToyBreasts, ToyBreasts]:
    return ToyBreasts(24, seed=0), ToyBreasts(12, seed=1)


def test_train_writes_loadable_checkpoints_and_learns(
    tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]
) -> None:
    train_set, val_set = data
    result = train(_config(tmp_path, epochs=4, augment=False), train_set, val_set, TinyCamNet)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    for row in result.history:
        assert {"train_loss", "val_loss", "lr", "val_roc_auc", "val_pf1"} <= row.keys()
    assert result.best_checkpoint == tmp_path / "run" / "best.pt" and result.best_checkpoint.is_file()
    assert result.last_checkpoint.is_file()
    assert result.best_val_loss == min(row["val_loss"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == result.best_val_loss
    # A bright square is easy: the model must separate the classes on validation.
    assert result.history[-1]["val_roc_auc"] > 0.9
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]

    # Plain types only: loads with weights_only=True (torch's safe default).
    best = torch.load(result.best_checkpoint, weights_only=True)
    last = torch.load(result.last_checkpoint, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "history", "config"} <= best.keys()
    assert best["epoch"] == result.best_epoch and last["epoch"] == 4
    assert best["config"]["architecture"] == "tiny" and len(last["history"]) == 4
    model = TinyCamNet()
    model.load_state_dict(best["model"])
    # Validation probabilities are those of the best epoch, in dataset order.
    assert result.val_probabilities.shape == (len(val_set),)
    assert result.val_prediction_ids == val_set.prediction_ids
    np.testing.assert_allclose(result.val_probabilities, predict(model, val_set, batch_size=5)[0], atol=1e-6)


def test_resume_continues_the_same_run(tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]) -> None:
    train_set, val_set = data
    straight = train(_config(tmp_path / "a", epochs=4), train_set, val_set, TinyCamNet)
    first = train(_config(tmp_path / "b", epochs=2), train_set, val_set, TinyCamNet)
    resumed = train(
        _config(tmp_path / "b", epochs=4, resume=first.last_checkpoint), train_set, val_set, TinyCamNet
    )
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert _deterministic_history(resumed)[:2] == _deterministic_history(first)
    # Same seeds per epoch: the resumed run follows the uninterrupted one.
    for a, b in zip(_deterministic_history(straight), _deterministic_history(resumed), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    state_a = torch.load(straight.last_checkpoint, weights_only=True)["model"]
    state_b = torch.load(resumed.last_checkpoint, weights_only=True)["model"]
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6)


def test_resume_rejects_other_architecture_and_missing_file(
    tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]
) -> None:
    train_set, val_set = data
    first = train(_config(tmp_path, epochs=1, batches_per_epoch=1), train_set, val_set, TinyCamNet)
    with pytest.raises(ValueError, match="trained as 'tiny'"):
        train(
            _config(tmp_path, architecture="other", resume=first.last_checkpoint),
            train_set,
            val_set,
            TinyCamNet,
        )
    with pytest.raises(ValueError, match="not found"):
        train(_config(tmp_path, resume=tmp_path / "nope.pt"), train_set, val_set, TinyCamNet)


def test_early_stopping_and_lr_plateau(tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]) -> None:
    """With a vanishing learning rate the loss cannot improve by 0.01: LR drops, then the run stops."""
    train_set, val_set = data
    config = _config(
        tmp_path,
        epochs=20,
        batches_per_epoch=1,
        lr=1e-7,
        min_lr=1e-9,
        early_stopping_patience=3,
        augment=False,
    )
    result = train(config, train_set, val_set, lambda: TinyCamNet(batch_norm=False))
    assert result.stopped_early
    assert len(result.history) == 4  # epoch 1 sets the reference, 3 more without improvement
    lrs = [row["lr"] for row in result.history]
    # plateau_patience=1: each epoch without improvement divides the LR by 10, down to min_lr.
    assert lrs == pytest.approx([1e-7, 1e-7, 1e-8, 1e-9], rel=1e-6)
    assert torch.load(result.last_checkpoint, weights_only=True)["stopped_early"] is True


def test_class_weighting_sets_pos_weight(tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]) -> None:
    train_set, val_set = data
    n_pos = sum(train_set.labels)
    config = _config(tmp_path, class_weighting="balanced", balanced_sampling=False)
    assert _pos_weight(config, train_set.labels) == pytest.approx((len(train_set) - n_pos) / n_pos)
    assert _pos_weight(_config(tmp_path), train_set.labels) is None
    result = train(dataclasses.replace(config, epochs=1), train_set, val_set, TinyCamNet)
    assert math.isfinite(result.history[0]["train_loss"])


def test_augmentation_is_applied_to_training_batches(
    tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]
) -> None:
    train_set, val_set = data
    variants: dict[str, dict[str, Any]] = {
        "off": {"augment": False},
        "identity": {"augment": True, "augmentation": NO_AUGMENTATION},
        "seed003": {"augment": True},
    }
    runs = {
        name: _deterministic_history(
            train(_config(tmp_path / name, epochs=1, **kw), train_set, val_set, TinyCamNet)
        )
        for name, kw in variants.items()
    }
    assert runs["identity"] == runs["off"]
    assert runs["seed003"][0]["train_loss"] != runs["off"][0]["train_loss"]


def test_amp_bfloat16_on_cpu(tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]) -> None:
    train_set, val_set = data
    result = train(_config(tmp_path, epochs=1, amp=True), train_set, val_set, TinyCamNet)
    assert math.isfinite(result.history[0]["train_loss"]) and math.isfinite(result.best_val_loss)


def test_bad_configuration_raises_value_error(tmp_path: Path, data: tuple[ToyBreasts, ToyBreasts]) -> None:
    with pytest.raises(ValueError, match="epochs"):
        _config(tmp_path, epochs=0)
    with pytest.raises(ValueError, match="min_lr"):
        _config(tmp_path, lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="class_weighting"):
        _config(tmp_path, class_weighting="inverse")
    with pytest.raises(ValueError, match="device"):
        _config(tmp_path, device="tpu")
    train_set, _ = data
    empty = ToyBreasts(0)
    with pytest.raises(ValueError, match="val_set is empty"):
        train(_config(tmp_path), train_set, empty, TinyCamNet)
    frozen = TinyCamNet()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        train(_config(tmp_path), train_set, train_set, lambda: frozen)


def test_predict_is_eval_mode_and_in_dataset_order(data: tuple[ToyBreasts, ToyBreasts]) -> None:
    _, val_set = data
    torch.manual_seed(0)
    model = TinyCamNet(drop_rate=0.5)
    model.train()
    probs, cams = predict(model, val_set, batch_size=4)
    again, _ = predict(model, val_set, batch_size=7)
    assert model.training  # the caller's mode is restored
    assert probs.shape == (len(val_set),) and probs.dtype == np.float64
    assert cams.shape == (len(val_set), 4, 4) and cams.dtype == np.float32
    np.testing.assert_allclose(probs, again, atol=1e-6)  # dropout off, batch-size independent
    model.eval()
    with torch.no_grad():
        logit, cam = model(val_set.images[3:4])
    assert probs[3] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-6)
    np.testing.assert_allclose(cams[3], cam[0].numpy(), atol=1e-6)


def test_predict_rejects_models_without_cam(data: tuple[ToyBreasts, ToyBreasts]) -> None:
    class LogitOnly(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match="logit"):
        predict(LogitOnly(), data[1])


def test_trains_inference_build_model_efficientnet(tmp_path: Path) -> None:
    import inference.model as model_module

    train_set = ToyBreasts(8, positive_every=2, size=(64, 32), seed=2)
    val_set = ToyBreasts(4, positive_every=2, size=(64, 32), seed=3)
    config = _config(tmp_path, architecture="efficientnet_b0", epochs=1, batches_per_epoch=1, batch_ids=2)
    result = train(config, train_set, val_set, lambda: model_module.build_model("efficientnet_b0"))
    assert math.isfinite(result.best_val_loss)
    model = model_module.build_model("efficientnet_b0")
    model.load_state_dict(torch.load(result.best_checkpoint, weights_only=True)["model"])
    probs, cams = predict(model, val_set, batch_size=4)
    assert probs.shape == (len(val_set),) and cams.shape[0] == len(val_set)
