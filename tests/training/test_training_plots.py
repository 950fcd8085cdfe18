"""The report figures are written as real PNG files with visible content."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from training.metrics import average_precision, pr_curve, roc_auc, roc_curve
from training.plots import plot_pr, plot_roc, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 300
    assert len(data) > min_bytes  # axes, curves and legend, not a blank canvas


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    return labels.astype(int), np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)


def test_plot_roc_and_pr_write_pngs(tmp_path: Path, scored: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = scored
    fpr, tpr = roc_curve(labels, scores)
    breast_fpr, breast_tpr = roc_curve(labels[:50], scores[:50])
    out = plot_roc(
        {
            "image": (fpr, tpr, roc_auc(labels, scores)),
            "breast": (breast_fpr, breast_tpr, math.nan),  # undefined AUC must still draw
        },
        tmp_path / "sub" / "roc.png",
    )
    assert out == tmp_path / "sub" / "roc.png"
    _assert_png(out)
    recall, precision, ap = pr_curve(labels, scores)
    assert ap == average_precision(labels, scores)
    _assert_png(
        plot_pr({"image": pr_curve(labels, scores), "other": (recall, precision, ap)}, tmp_path / "pr.png")
    )


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.6 + (e - 3) ** 2 / 50, "lr": 1e-3 * 0.1 ** (e // 3)}
        for e in range(1, 8)
    ]
    _assert_png(plot_training_curves(history, tmp_path / "history.png"))


def test_plots_reject_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_roc({}, tmp_path / "roc.png")
    with pytest.raises(ValueError, match="png"):
        plot_pr({"a": ([0, 1], [1, 0], 0.5)}, tmp_path / "pr.jpg")
    with pytest.raises(ValueError, match="val_loss"):
        plot_training_curves([{"epoch": 1, "train_loss": 1.0, "lr": 1e-3}], tmp_path / "h.png")
