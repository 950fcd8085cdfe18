"""The bundled demo model: it loads offline, says what it is, and ranks malignant above benign."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.backends.torch_backend import TorchBackend
from inference.bundled import bundled_model_dir
from inference.dicom_header import read_dataset, read_meta
from inference.manifest import load_manifest, verify_weights
from inference.pipeline import Pipeline
from inference.types import RESEARCH_NOTICE
from training.synth.synthesise import synthesise_studies


def test_bundled_model_manifest_is_honest_about_its_training_data() -> None:
    model_dir = bundled_model_dir()
    manifest = load_manifest(model_dir)
    verify_weights(model_dir, manifest)
    assert manifest.synthetic_training_data
    assert (manifest.preprocess.input_height, manifest.preprocess.input_width) == (512, 256)
    assert (model_dir / manifest.weights_file).stat().st_size <= 20 * 1024 * 1024
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "mammonode synth" in card and "mammonode train" in card and "mammonode evaluate" in card
    assert manifest.metrics["test"]["measured_on"], "every metric names the data it was measured on"


def test_bundled_model_meets_its_targets_on_the_recorded_test_set() -> None:
    """The figures `mammonode evaluate --record test` stored: issue 2's bar for the demo model,
    and the model card quotes the same numbers."""
    model_dir = bundled_model_dir()
    test = load_manifest(model_dir).metrics["test"]
    assert (
        test["measured_on"]["images"] > 500
        and test["model"]["weights_sha256"] == load_manifest(model_dir).weights_sha256
    )
    assert test["breast"]["roc_auc"] >= 0.95
    assert test["cam"]["pointing_game"] >= 0.8 and test["cam"]["n_images"] > 100
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"pointing game {test['cam']['pointing_game']:.3f}" in card
    assert f"| breast (`pagg`) | {test['breast']['roc_auc']:.4f}" in card
    # issue 13: the test set has distractors, and the model is not drawn to them
    peaks = test["distractors"]["cam_peak_on_distractor"]["cancer_free_images"]["any"]
    assert peaks["images_with"] > 100 and peaks["rate"] < 0.05
    assert f"CAM peak on a distractor in {peaks['rate']:.1%} of the {peaks['n_images']}" in card
    marker = test["distractors"]["false_positive_rate"]["cancer_free_breasts"]["marker"]
    assert marker["with"]["n"] > 30 and marker["without"]["n"] > 30
    assert marker["with"]["rate"] <= 1.5 * marker["without"]["rate"]


def test_bundled_onnx_graph_ships_and_agrees_with_the_weights() -> None:
    from inference.backends.loader import load_backend
    from inference.backends.parity import compare_outputs
    from training.onnx_export import parity_inputs

    model_dir = bundled_model_dir()
    manifest = load_manifest(model_dir)
    assert manifest.onnx_file == "model.onnx"
    x = parity_inputs(manifest, count=2)
    report = compare_outputs(
        TorchBackend(model_dir).infer(x), load_backend("onnxruntime", model_dir).infer(x)
    )
    assert report.ok, report


@pytest.mark.slow
def test_malignant_synthetic_study_scores_higher_than_benign(tmp_path: Path) -> None:
    backend = TorchBackend(bundled_model_dir())
    pipeline = Pipeline(backend)
    assert pipeline.algorithm.notice == RESEARCH_NOTICE
    for seed in (101, 202):
        studies = synthesise_studies(tmp_path / str(seed), seed)
        cancer = next(s for s in studies if s.cancer_sides)
        normal = next(s for s in studies if not s.cancer_sides)
        scores = {}
        for study in (cancer, normal):
            images = []
            for path in study.files:
                ds = read_dataset(path)
                images.append(pipeline.prepare(ds, read_meta(ds)))
            (scores[study.patient_id],) = pipeline.score(images)
        cancer_score = scores[cancer.patient_id]
        normal_score = scores[normal.patient_id]
        sick = {b.laterality: b.probability for b in cancer_score.breasts}
        healthy_sides = [side for side in ("L", "R") if side not in cancer.cancer_sides]
        for side in cancer.cancer_sides:
            assert all(sick[side] > sick[healthy] for healthy in healthy_sides)
            assert all(sick[side] > b.probability for b in normal_score.breasts)
        assert cancer_score.exam_probability > normal_score.exam_probability
