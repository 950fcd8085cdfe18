"""`mammonode train` and `mammonode evaluate` end to end on a tiny synthetic RSNA-layout dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference.manifest import load_manifest
from inference.model_io import load_model
from node.commands.app import app
from training.synth import generate_dataset

MAMMONODE = Path(sys.executable).with_name("mammonode")
LEVEL_KEYS = {"roc_auc", "pf1", "precision", "recall", "f1", "sensitivity", "specificity", "confusion_matrix"}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "synth"
    generate_dataset(root, patients=8, seed=5, cancer_rate=0.5, size=(256, 192), lesion_contrast=1.5)
    return root


def _run(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    _run(
        "train", tiny_dataset, "--out", out, "--input-size", "64x32", "--epochs", "2",
        "--batches-per-epoch", "2", "--batch-ids", "4", "--synthetic", "--name", "tiny",
    )  # fmt: skip
    return out


def test_train_writes_a_loadable_model_whose_manifest_names_its_data(trained: Path) -> None:
    _model, manifest = load_model(trained / "model")
    assert manifest.name == "tiny" and manifest.synthetic_training_data
    assert (manifest.preprocess.input_height, manifest.preprocess.input_width) == (64, 32)
    assert 0.0 <= manifest.threshold <= 1.0
    assert manifest.training_data["patients_train"] + manifest.training_data["patients_validation"] == 8
    assert manifest.training_data["command"].startswith("mammonode")
    val = manifest.metrics["validation_breast"]
    assert "validation split" in val["measured_on"]
    assert (trained / "best.pt").is_file() and (trained / "last.pt").is_file()
    assert (trained / "training_curves.png").stat().st_size > 1000


def test_evaluate_json_reports_image_breast_aggregations_and_cam(
    trained: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    report = json.loads(
        _run("evaluate", tiny_dataset, "--model", trained / "model", "--json", "--plots", tmp_path)
    )
    for level in ("image", "breast"):
        assert set(report[level]) >= LEVEL_KEYS
        assert report[level]["threshold"] == pytest.approx(load_manifest(trained / "model").threshold)
        cm = report[level]["confusion_matrix"]
        assert sum(map(sum, cm)) == report[level]["n"]
    assert report["breast"]["n"] == report["measured_on"]["breasts"]
    assert set(report["aggregations"]) == {"pagg", "mean", "max"}
    assert report["cam"]["n_images"] > 0
    assert 0.0 <= report["cam"]["pointing_game"] <= 1.0
    assert 0.0 <= report["cam"]["dice"] <= 1.0
    assert report["measured_on"]["dataset"] == str(tiny_dataset)
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "pr.png").is_file()


def test_evaluate_text_report_and_bad_aggregation(trained: Path, tiny_dataset: Path) -> None:
    text = _run("evaluate", tiny_dataset, "--model", trained / "model")
    assert "breast" in text and "pointing game" in text
    proc = subprocess.run(
        [
            str(MAMMONODE),
            "evaluate",
            str(tiny_dataset),
            "--model",
            str(trained / "model"),
            "--aggregation",
            "median",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: unknown aggregation 'median'; choose one of pagg, mean, max"
    ]


def test_evaluate_progress_counts_every_image(trained: Path, tiny_dataset: Path) -> None:
    """run_evaluate announces the number of images, then reports each scored batch."""
    from training.dispatch import run_evaluate

    totals: list[int] = []
    done: list[int] = []
    report = run_evaluate(
        tiny_dataset, model_dir=trained / "model", progress=done.append, on_total=totals.append
    )
    images = report["measured_on"]["images"]
    assert totals == [images]
    assert len(done) > 1 and all(n > 0 for n in done)  # one call per batch, not one at the end
    assert sum(done) == images


def test_evaluate_command_draws_its_progress_bar_unless_quiet(
    trained: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.commands import _progress

    monkeypatch.setattr(_progress, "wanted", lambda quiet: not quiet)  # as if stderr were a terminal
    args = ["evaluate", str(tiny_dataset), "--model", str(trained / "model"), "--json"]
    shown = CliRunner().invoke(app, args, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    images = json.loads(shown.stdout)["measured_on"]["images"]
    assert f"{images}/{images}" in shown.stderr
    quiet = CliRunner().invoke(app, [*args, "--quiet"], catch_exceptions=False)
    assert quiet.exit_code == 0, quiet.output
    assert f"/{images}" not in quiet.stderr


def test_train_resumes_from_its_last_checkpoint(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    _run(
        "train", tiny_dataset, "--out", out, "--input-size", "64x32", "--epochs", "3",
        "--batches-per-epoch", "2", "--batch-ids", "4", "--resume", trained / "last.pt",
    )  # fmt: skip
    import torch

    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert [h["epoch"] for h in state["history"]][:2] == [1, 2]
    assert state["epoch"] == 3


@pytest.mark.slow
def test_train_under_torchrun_with_two_gloo_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    """DistributedDataParallel on CPU: two processes train, rank 0 alone writes the model."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = ["train", str(tiny_dataset), "--out", str(out), "--input-size", "64x32", "--epochs", "1"]
    proc = subprocess.run(
        [*torchrun, str(MAMMONODE), *train, "--batches-per-epoch", "2", "--batch-ids", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _model, manifest = load_model(out / "model")
    assert manifest.training_data["best_epoch"] == 1
