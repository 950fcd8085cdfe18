"""Histology patch training (seeds 002 and 004): loaders, split, end-to-end training and evaluation.

The patches are drawn on the fly: malignant = purple tissue with dark nuclei, benign = pale pink
stroma. The task is easy on purpose, so a few CPU epochs of CancerNet must separate the classes;
a model that does not is broken plumbing (labels, channels, threshold), not a hard problem.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.manifest import load_manifest
from inference.model_io import load_model
from inference.types import InputError
from training.datasets.histology import (
    PatchDataset,
    PatchRecord,
    class_labels,
    load_class_folders,
    load_idc,
)
from training.histology_run import METRIC_KEYS, evaluate_histology, run_histology_train, split_groups
from training.request import TrainRequest

SIZE = 32


def _patch(rng: np.random.Generator, label: int, size: int = SIZE) -> np.ndarray:
    """A BGR patch (OpenCV order): purple with dark nuclei when malignant, pale pink when benign."""
    if label:
        base = np.array([170, 95, 150]) + rng.integers(-20, 20, 3)
    else:
        base = np.array([215, 200, 240]) + rng.integers(-15, 15, 3)
    image = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    if label:
        for _ in range(int(rng.integers(4, 8))):
            centre = tuple(int(v) for v in rng.integers(3, size - 3, 2))
            cv2.circle(image, centre, int(rng.integers(2, 5)), (90, 20, 60), -1)
    return image


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def make_idc(root: Path, *, both: int = 5, benign_only: int = 3, per_class: int = 6, seed: int = 0) -> Path:
    """``<patient>/<0|1>/*.png`` with ``both`` patients holding both classes and some benign-only."""
    rng = np.random.default_rng(seed)
    for p in range(both + benign_only):
        patient = f"{10250 + p}"
        for label in (0, 1) if p < both else (0,):
            for i in range(per_class):
                name = f"{patient}_idx5_x{50 * i}_y{50 * p}_class{label}.png"
                _write(root / patient / str(label) / name, _patch(rng, label))
    return root


def make_folders(root: Path, names: tuple[str, ...] = ("benign", "malignant"), per_class: int = 16) -> Path:
    """``<class>/*.png``; the label of each class follows :func:`class_labels`."""
    rng = np.random.default_rng(1)
    labels = class_labels(list(names)) if len(names) == 2 else dict.fromkeys(names, 0)
    for name in names:
        for i in range(per_class):
            _write(root / name / f"{name}_{i:03d}.png", _patch(rng, labels[name]))
    return root


def _request(dataset: Path, out: Path, layout: str) -> TrainRequest:
    """Four short epochs of 8 batches: enough steps for batch-norm statistics to settle."""
    return TrainRequest(
        dataset=dataset,
        out=out,
        layout=layout,
        architecture="cancernet",
        input_size=(SIZE, SIZE),
        epochs=4,
        batch_ids=16,
        batches_per_epoch=8,
        lr=3e-3,
        seed=0,
    )


# --- loaders ---------------------------------------------------------------------------------


def test_idc_labels_come_from_folders_and_groups_from_patients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_idc(tmp_path / "idc", both=2, benign_only=1, per_class=2)
    (root / "10250" / "1" / "notes.txt").write_text("not a patch")
    (root / "IDC_regular_ps50_idx5").mkdir()  # the Kaggle archive's nested copy: no 0/ or 1/
    with caplog.at_level(logging.WARNING):
        records = load_idc(root)
    assert len(records) == 2 * 2 * 2 + 1 * 2
    assert all(r.path.suffix == ".png" for r in records)
    assert all(r.label == int(r.path.parent.name) for r in records)
    assert all(r.group == r.path.parent.parent.name for r in records)
    assert {r.group for r in records} == {"10250", "10251", "10252"}
    assert "skipped 1 non-image files" in caplog.text
    assert "IDC_regular_ps50_idx5" in caplog.text


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("benign", "malignant"), {"benign": 0, "malignant": 1}),
        (("Malignant", "Benign"), {"Benign": 0, "Malignant": 1}),
        (("1", "0"), {"0": 0, "1": 1}),
        (("positive", "negative"), {"negative": 0, "positive": 1}),
        (("benign", "tumour"), {"benign": 0, "tumour": 1}),  # one name known: the other is the rest
        (("zebra", "apple"), {"apple": 0, "zebra": 1}),  # none known: sorted order
    ],
)
def test_class_folder_names_map_to_labels(names: tuple[str, str], expected: dict[str, int]) -> None:
    assert class_labels(list(names)) == expected


def test_class_folders_same_meaning_is_rejected() -> None:
    with pytest.raises(InputError, match="both mean label 0"):
        class_labels(["0", "benign"])


def test_many_class_folders_are_summarised_in_one_line() -> None:
    with pytest.raises(InputError, match=r"found 279 \(10000, 10001, 10002, 10003, 10004, \.\.\.\)$"):
        class_labels([str(10000 + i) for i in range(279)])  # an IDC root read as class folders


def test_three_class_folders_raise(tmp_path: Path) -> None:
    root = make_folders(tmp_path / "f", names=("benign", "malignant", "normal"), per_class=1)
    with pytest.raises(InputError, match=r"exactly two class folders, found 3 \(benign, malignant, normal\)"):
        load_class_folders(root)


def test_empty_datasets_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no IDC patches"):
        load_idc(empty)
    with pytest.raises(InputError, match="found 0"):
        load_class_folders(empty)
    with pytest.raises(InputError, match="not found"):
        load_idc(tmp_path / "missing")
    root = make_folders(tmp_path / "f", per_class=2)
    for path in (root / "malignant").iterdir():
        path.unlink()
    (root / "malignant" / "readme.txt").write_text("only notes here")
    with pytest.raises(InputError, match=r"malignant holds no images"):
        load_class_folders(root)


def test_class_folder_groups_follow_nesting_and_breakhis_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "f"
    _write(root / "benign" / "a.png", _patch(rng, 0))
    _write(root / "benign" / "patient7" / "b.jpg", _patch(rng, 0))
    _write(root / "benign" / "patient7" / "c.tif", _patch(rng, 0))
    _write(root / "malignant" / "SOB_M_DC-14-2523-400-001.png", _patch(rng, 1))
    _write(root / "malignant" / "100X" / "SOB_M_DC-14-2523-100-004.png", _patch(rng, 1))
    (root / ".DS_Store").write_bytes(b"\0")
    records = {r.path.relative_to(root).as_posix(): r for r in load_class_folders(root)}
    assert set(records) == {
        "benign/a.png",
        "benign/patient7/b.jpg",
        "benign/patient7/c.tif",
        "malignant/SOB_M_DC-14-2523-400-001.png",
        "malignant/100X/SOB_M_DC-14-2523-100-004.png",
    }
    assert records["benign/a.png"].group == "image:benign/a.png"
    assert records["benign/patient7/b.jpg"].group == records["benign/patient7/c.tif"].group
    # One BreaKHis slide at two magnifications is one group, whatever the folders say.
    assert (
        records["malignant/SOB_M_DC-14-2523-400-001.png"].group
        == records["malignant/100X/SOB_M_DC-14-2523-100-004.png"].group
        == "slide:14-2523"
    )
    assert all(r.label == (name.startswith("malignant/")) for name, r in records.items())


# --- dataset ---------------------------------------------------------------------------------


def test_patch_dataset_items_are_rgb_resized_and_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bgr = _patch(rng, 1, size=50)
    grey = cv2.cvtColor(_patch(rng, 0, size=40), cv2.COLOR_BGR2GRAY)
    _write(tmp_path / "a.png", bgr)
    _write(tmp_path / "b.png", grey)
    records = [PatchRecord(tmp_path / "a.png", 1, "p1"), PatchRecord(tmp_path / "b.png", 0, "p2")]
    dataset = PatchDataset(records, (SIZE, SIZE + 8))
    image, label, pid, index = dataset[0]
    assert image.shape == (3, SIZE, SIZE + 8) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert (label, pid, index) == (1.0, str(tmp_path / "a.png"), 0)
    # RGB order: the malignant patch is purple, so red and blue exceed green on average.
    red, green, blue = image.mean(dim=(1, 2)).tolist()
    assert red > green and blue > green
    assert dataset[1][0].shape == (3, SIZE, SIZE + 8)  # grey-scale comes out as 3 channels
    assert dataset.prediction_ids == [str(r.path) for r in records] and dataset.labels == [1.0, 0.0]
    assert dataset.batch([0, 1]).shape == (2, 3, SIZE, SIZE + 8)
    # Cached: the files can go once decoded.
    (tmp_path / "a.png").unlink()
    assert torch.equal(dataset[0][0], image)


def test_undecodable_image_is_an_input_error_naming_the_file(tmp_path: Path) -> None:
    root = make_folders(tmp_path / "f", per_class=2)
    broken = root / "benign" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    dataset = PatchDataset(load_class_folders(root), (SIZE, SIZE))
    with pytest.raises(InputError, match=r"cannot decode image .*broken\.png"):
        dataset.preload(workers=2)


def test_mammography_sized_grid_for_patches_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.histology_run import _warn_if_upsampling

    records = load_idc(make_idc(tmp_path / "idc", both=1, benign_only=0, per_class=2))
    with caplog.at_level(logging.WARNING):
        _warn_if_upsampling(records, (SIZE, SIZE))
        assert not caplog.records
        _warn_if_upsampling(records, (1024, 512))
    assert "enlarges the typical 32x32 patch" in caplog.text


# --- split -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("both", "benign_only"), [(5, 3), (8, 0)])
def test_split_keeps_patients_on_one_side_with_both_classes(
    tmp_path: Path, both: int, benign_only: int
) -> None:
    """(8, 0) is the real IDC situation: every patient has malignant patches."""
    records = load_idc(make_idc(tmp_path / "idc", both=both, benign_only=benign_only, per_class=1))
    train, val = split_groups(records, 0.25, seed=3)
    assert {r.group for r in train}.isdisjoint({r.group for r in val})
    assert len(train) + len(val) == len(records)
    assert {r.label for r in train} == {r.label for r in val} == {0, 1}


def test_split_with_too_few_groups_is_an_input_error(tmp_path: Path) -> None:
    records = load_idc(make_idc(tmp_path / "idc", both=2, benign_only=0, per_class=1))
    with pytest.raises(InputError, match="cannot split 2 groups"):
        split_groups(records, 0.2, seed=0)


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One short CancerNet run on a synthetic IDC set, shared by the tests that inspect it."""
    base = tmp_path_factory.mktemp("idc_run")
    data = make_idc(base / "idc", both=5, benign_only=3, per_class=8)
    model_dir = run_histology_train(_request(data, base / "out", "idc"))
    return data, model_dir


def test_idc_training_writes_a_loadable_model_that_separates_the_classes(idc_run: tuple[Path, Path]) -> None:
    data, model_dir = idc_run
    assert model_dir == data.parent / "out" / "model"
    model, manifest = load_model(model_dir)
    assert manifest.in_chans == 3 and model.in_chans == 3 and manifest.architecture == "cancernet"
    assert (manifest.preprocess.input_height, manifest.preprocess.input_width) == (SIZE, SIZE)
    assert manifest.aggregation == "mean"
    assert manifest.training_data["layout"] == "idc"
    assert manifest.training_data["dataset"] == "idc"
    assert manifest.training_data["patches_train"] + manifest.training_data["patches_validation"] == 104
    assert manifest.training_data["patients_train"] + manifest.training_data["patients_validation"] == 8
    patch = manifest.metrics["validation_patch"]
    assert "validation split of idc" in patch["measured_on"]
    assert patch["roc_auc"] > 0.9
    assert manifest.training_data["best_val_loss"] < 0.5  # learnt, well below chance (ln 2)
    assert patch["threshold"] == manifest.threshold
    assert patch["sensitivity"] >= 0.9  # the threshold was chosen for it on these patches
    assert "validation_patient" in manifest.metrics
    assert (data.parent / "out" / "best.pt").is_file()
    with torch.inference_mode():
        logit, cam = model(torch.rand(2, 3, SIZE, SIZE))
    assert logit.shape == (2,) and cam.shape == (2, SIZE // 8, SIZE // 8)


def test_evaluate_histology_reports_patch_and_patient_metrics(idc_run: tuple[Path, Path]) -> None:
    data, model_dir = idc_run
    totals: list[int] = []
    done: list[int] = []
    report = evaluate_histology(data, model_dir, "idc", progress=done.append, on_total=totals.append)
    assert totals == [104] and done == [64, 40]  # one progress call per scored batch
    for level in ("patch", "patient"):
        assert set(METRIC_KEYS) <= set(report[level]), level
        assert "threshold_at_sensitivity" in report[level]
    assert report["patch"]["n"] == 104 and report["patient"]["n"] == 8
    assert report["patch"]["roc_auc"] > 0.9
    assert report["patch"]["threshold"] == load_manifest(model_dir).threshold
    assert report["measured_on"] == {"dataset": str(data), "layout": "idc", "patches": 104, "patients": 8}
    assert len(report["model"]["weights_sha256"]) == 64
    json.dumps(report)  # JSON-friendly for `mammonode evaluate --json`


def test_evaluate_rejects_an_unknown_layout_and_a_grey_model(
    idc_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from inference.manifest import ModelManifest
    from inference.model import build_model
    from inference.model_io import save_model

    data, model_dir = idc_run
    with pytest.raises(InputError, match="unknown histology layout 'rsna2'"):
        evaluate_histology(data, model_dir, "rsna2")
    grey = tmp_path / "grey"
    grey_manifest = ModelManifest("grey", "1", "cancernet", in_chans=1)
    save_model(build_model("cancernet", in_chans=1), grey_manifest, grey)
    with pytest.raises(InputError, match="takes 1 channel"):
        evaluate_histology(data, grey, "idc")


def test_cli_train_and_evaluate_idc(idc_run: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.commands.app import app

    data, trained = idc_run
    runner = CliRunner()
    out = tmp_path / "cli_run"
    args = ["train", str(data), "--out", str(out), "--layout", "idc", "--architecture", "cancernet"]
    args += ["--input-size", f"{SIZE}x{SIZE}", "--epochs", "1", "--batch-ids", "16", "--name", "idc-cli"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"model written to {out / 'model'}" in result.output
    manifest = load_manifest(out / "model")
    assert manifest.name == "idc-cli" and manifest.training_data["layout"] == "idc"

    result = runner.invoke(app, ["evaluate", str(data), "--model", str(trained), "--layout", "idc", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.output)
    assert set(METRIC_KEYS) <= set(report["patch"]) and "patient" in report
    result = runner.invoke(app, ["evaluate", str(data), "--model", str(trained), "--layout", "idc"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "patch " in result.output and "patient " in result.output


def test_folders_training_and_evaluation(tmp_path: Path) -> None:
    data = make_folders(tmp_path / "breakhis", per_class=24)
    model_dir = run_histology_train(_request(data, tmp_path / "out", "folders"))
    manifest = load_manifest(model_dir)
    assert manifest.training_data["layout"] == "folders"
    assert manifest.training_data["groups_train"] + manifest.training_data["groups_validation"] == 48
    assert set(manifest.metrics) == {"validation_patch"}  # no patients in this layout
    assert manifest.metrics["validation_patch"]["roc_auc"] > 0.9
    assert manifest.training_data["best_val_loss"] < 0.5
    report = evaluate_histology(data, model_dir, "folders")
    assert set(METRIC_KEYS) <= set(report["patch"]) and "patient" not in report
    assert report["patch"]["roc_auc"] > 0.9


def test_training_on_three_classes_stops_before_any_epoch(tmp_path: Path) -> None:
    data = make_folders(tmp_path / "f", names=("benign", "malignant", "normal"), per_class=1)
    with pytest.raises(InputError, match="exactly two class folders"):
        run_histology_train(_request(data, tmp_path / "out", "folders"))
    assert not (tmp_path / "out").exists()
