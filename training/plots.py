"""PNG figures for training reports: ROC and precision-recall curves, loss/learning-rate history.

matplotlib is imported inside each function (it is slow to import and only the training CLI needs
it), and figures are drawn through the object-oriented ``Figure`` + Agg canvas rather than
``pyplot``: no global backend switch, no GUI, no figure registry to leak from a long-running
process, and safe to call from several threads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CurveTriple = tuple[ArrayLike, ArrayLike, float]


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; path must end in .png: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_roc(curves: Mapping[str, CurveTriple], path: str | Path, title: str = "ROC curve") -> Path:
    """Draw one ROC curve per entry ``label -> (fpr, tpr, auc)`` with the chance diagonal.

    Several curves on one plot is how image-level and breast-level (aggregated) performance are
    compared. Returns the written path.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=2, label=f"{label} (AUC {_fmt(auc)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)")
    ax.set(ylabel="True positive rate (sensitivity)", title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pr(
    curves: Mapping[str, CurveTriple], path: str | Path, title: str = "Precision-recall curve"
) -> Path:
    """Draw one precision-recall curve per entry ``label -> (recall, precision, average_precision)``.

    PR curves show what ROC hides at a 2 % prevalence: how many recalls are false alarms. Steps
    are drawn so the area under them is the average precision.
    """
    if not curves:
        raise ValueError("plot_pr needs at least one curve")
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    for label, (recall, precision, ap) in curves.items():
        ax.step(recall, precision, where="pre", linewidth=2, label=f"{label} (AP {_fmt(ap)})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision", title=title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _column(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(row[key]) if row.get(key) is not None else math.nan for row in history]


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Training history"
) -> Path:
    """Train/validation loss (top) and learning rate on a log scale (bottom) per epoch.

    ``history`` is :attr:`training.loop_types.TrainResult.history`: one dict per epoch with ``epoch``,
    ``train_loss``, ``val_loss`` and ``lr``. The best (lowest validation loss) epoch is marked,
    which is the checkpoint early stopping restores (seed 003, figure 6).
    """
    if not history:
        raise ValueError("plot_training_curves needs at least one epoch of history")
    for key in ("epoch", "train_loss", "val_loss", "lr"):
        if key not in history[0]:
            raise ValueError(f"history rows need key {key!r}; got {sorted(history[0])}")
    epochs = _column(history, "epoch")
    train_loss = _column(history, "train_loss")
    val_loss = _column(history, "val_loss")
    lr = _column(history, "lr")

    fig = _new_figure(7.0, 6.0)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax_loss.plot(epochs, train_loss, marker="o", label="train loss")
    ax_loss.plot(epochs, val_loss, marker="o", label="validation loss")
    finite = [(v, e) for v, e in zip(val_loss, epochs, strict=True) if not math.isnan(v)]
    if finite:
        best_loss, best_epoch = min(finite)
        ax_loss.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch:g}")
        ax_loss.plot([best_epoch], [best_loss], marker="*", markersize=14, color="tab:red")
    ax_loss.set(ylabel="BCE loss", title=title)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(epochs, lr, marker="o", color="tab:green")
    if all(v > 0 for v in lr if not math.isnan(v)):
        ax_lr.set_yscale("log")
    ax_lr.set(xlabel="epoch", ylabel="learning rate")
    ax_lr.grid(alpha=0.3)
    return _save(fig, path)


def write_training_curves(history: list[dict[str, Any]], run_dir: Path) -> Path | None:
    """``run_dir/training_curves.png`` for a finished run; nothing when no epoch was recorded."""
    if not history:
        return None
    return plot_training_curves(history, run_dir / "training_curves.png")
