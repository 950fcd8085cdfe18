"""The ``distractors`` section of `mammonode evaluate` (issue 13): false positives of cancer-free
breasts with and without each distractor kind, and how often the CAM peak sits on one.

The figures are checked against counts made here from the csv files, with hand-made
probabilities and CAMs whose peaks are put on (or away from) known distractors; one end-to-end
run through the CLI uses a tiny random model (tests/model_factory.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from model_factory import save_calibrated_model
from typer.testing import CliRunner

from inference.geometry import original_to_grid
from inference.types import PreprocessConfig
from node.commands.app import app
from training.datasets.distractors import MARKER_KINDS, read_distractor_mask
from training.datasets.mammo import MammoSample, load_samples
from training.datasets.rsna import lesion_mask_path, load_rsna
from training.distractor_eval import GROUPS, distractor_report, format_distractors
from training.synth import generate_dataset

GRID = (128, 64)
TOLERANCE = 2.0


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "with"
    generate_dataset(root, patients=8, seed=31, cancer_rate=0.5, size=(256, 192), distractor_rate=2.5)
    return root


@pytest.fixture(scope="module")
def samples(dataset: Path) -> list[MammoSample]:
    records = load_rsna(dataset)
    config = PreprocessConfig(input_height=GRID[0], input_width=GRID[1])
    loaded, errors = load_samples(records, config, mask_paths=[lesion_mask_path(dataset, r) for r in records])
    assert not errors
    return loaded


def _grid_mask(dataset: Path, sample: MammoSample, kinds: set[str]) -> np.ndarray:
    rows = [
        r
        for r in _rows(dataset / "distractors.csv")
        if int(r["image_id"]) == sample.record.image_id and r["kind"] in kinds
    ]
    out = np.zeros(GRID, dtype=bool)
    if not rows:
        return out
    labels = read_distractor_mask(dataset, sample.record.patient_id, sample.record.image_id)
    for row in rows:
        out |= original_to_grid((labels == int(row["mask_value"])).astype(np.float32), sample.transform) > 0
    return out


def test_false_positive_rates_and_cam_peaks_match_counts_from_the_csv(
    dataset: Path, samples: list[MammoSample]
) -> None:
    rows = _rows(dataset / "distractors.csv")
    marked_breasts = {(r["patient_id"], r["laterality"]) for r in rows if r["kind"] in MARKER_KINDS}
    cancer = {(r["patient_id"], r["laterality"]): r["cancer"] == "1" for r in _rows(dataset / "train.csv")}
    free_marked = sum(1 for b, c in cancer.items() if not c and b in marked_breasts)
    free_unmarked = sum(1 for b, c in cancer.items() if not c and b not in marked_breasts)
    assert free_marked > 0 and free_unmarked > 0, "the fixture needs both kinds of cancer-free breast"

    # Every image of a marked cancer-free breast scores 0.9, everything else 0.1.
    def marked(s: MammoSample) -> bool:
        return (str(s.record.patient_id), s.record.laterality) in marked_breasts

    probabilities = np.array([0.9 if marked(s) and not s.label else 0.1 for s in samples])
    # One cancer-free image gets its CAM peak on a skin marker; every other peak lies on no
    # distractor (the grid pixel farthest from all of them).
    cams, target = [], None
    for sample in samples:
        cam = np.zeros(GRID, dtype=np.float32)
        markers = _grid_mask(dataset, sample, set(MARKER_KINDS))
        if target is None and not sample.label and markers.any():
            target = sample.record.image_id
            y, x = np.argwhere(markers)[0]
        else:
            anything = _grid_mask(dataset, sample, {r["kind"] for r in rows})
            far = np.full(GRID, 100.0) if not anything.any() else _distance_from(anything)
            t = sample.transform  # stay on the image: the peak is taken off the padding
            content = np.zeros(GRID, dtype=bool)
            content[
                t.pad_top : t.pad_top + t.resized_shape[0], t.pad_left : t.pad_left + t.resized_shape[1]
            ] = True
            far[~content] = 0
            y, x = np.unravel_index(int(np.argmax(far)), GRID)
            assert far[y, x] > TOLERANCE + 1
        cam[y, x] = 1.0
        cams.append(cam)
    assert target is not None

    section = distractor_report(
        dataset, samples, probabilities, cams, threshold=0.5, aggregation="mean", tolerance_px=TOLERANCE
    )
    fp = section["false_positive_rate"]["cancer_free_breasts"]["marker"]
    assert fp["with"] == {"false_positives": free_marked, "n": free_marked, "rate": 1.0}
    assert fp["without"] == {"false_positives": 0, "n": free_unmarked, "rate": 0.0}
    assert fp["ratio"] is None  # no false positive without a marker: the ratio is undefined
    n_free = sum(1 for s in samples if not s.label)
    peaks = section["cam_peak_on_distractor"]
    kind = next(r["kind"] for r in rows if int(r["image_id"]) == target and r["kind"] in MARKER_KINDS)
    for group in ("any", "marker"):
        assert peaks["cancer_free_images"][group]["peaks_on"] == 1
        assert peaks["cancer_free_images"][group]["rate"] == pytest.approx(1 / n_free)
        assert peaks["all_images"][group]["peaks_on"] == 1
        assert peaks["all_images"][group]["n_images"] == len(samples)
    assert peaks["cancer_free_images"][kind]["peaks_on"] >= 1
    for scope in peaks.values():  # a random peak would land on a distractor this often
        assert 0.0 < scope["any"]["chance_rate"] < 1.0
        assert scope["marker"]["chance_rate"] <= scope["any"]["chance_rate"]
    assert set(peaks["cancer_free_images"]) == set(GROUPS)
    text = "\n".join(format_distractors(section))
    assert f"marker                {free_marked}/{free_marked} (100.0%) vs 0/{free_unmarked} (0.0%)" in text


def _distance_from(mask: np.ndarray) -> np.ndarray:
    import cv2

    return np.asarray(cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5), dtype=np.float64)


def test_a_dataset_without_distractors_csv_gets_null_and_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    generate_dataset(root, patients=1, seed=2, size=(128, 96))
    records = load_rsna(root)
    samples, _ = load_samples(records, PreprocessConfig(input_height=GRID[0], input_width=GRID[1]))
    cams = [np.zeros(GRID, dtype=np.float32) for _ in samples]
    section = distractor_report(
        root, samples, np.zeros(len(samples)), cams, threshold=0.5, aggregation="mean", tolerance_px=16
    )
    assert section["false_positive_rate"] is None and section["cam_peak_on_distractor"] is None
    assert "distractors.csv" in section["reason"]
    assert format_distractors(section)[0].startswith("distractors: not measured (no distractors.csv")


@pytest.mark.slow
def test_evaluate_cli_reports_the_distractors_section(dataset: Path, tmp_path: Path) -> None:
    model = save_calibrated_model(tmp_path / "model", grid=GRID)
    runner = CliRunner()
    result = runner.invoke(
        app, ["evaluate", str(dataset), "--model", str(model), "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)["distractors"]
    assert section["reason"] is None and section["tolerance_px"] == 16
    breasts = section["false_positive_rate"]["cancer_free_breasts"]["any"]
    assert (
        breasts["with"]["n"] + breasts["without"]["n"]
        == json.loads(result.stdout)["breast"]["confusion_matrix"][0][0]
        + json.loads(result.stdout)["breast"]["confusion_matrix"][0][1]
    )
    text = runner.invoke(app, ["evaluate", str(dataset), "--model", str(model)], catch_exceptions=False)
    assert text.exit_code == 0 and "distractors (threshold" in text.stdout
