"""`mammonode bench`: a quick run on this machine writes every figure, and the ratios come from the
run's own figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inference.manifest import load_manifest
from node.commands import app as cli
from node.tools.bench import SYNTAXES, data_inputs


@pytest.fixture(scope="module")
def quick_report(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `mammonode bench --quick` run on the test model (which has no ONNX: the bench exports
    one into a temporary copy, since the training extra is installed here)."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    result = CliRunner().invoke(
        cli.app, ["bench", "--quick", "--model", str(test_model), "--json", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs torch" in result.stdout and "end to end vs floor" in result.stdout
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report


def test_every_figure_comes_with_the_machine_and_the_model(
    quick_report: dict[str, Any], test_model: Path
) -> None:
    machine, model = quick_report["machine"], quick_report["model"]
    assert machine["cpus"] >= 1 and machine["cpu_model"]
    manifest = load_manifest(test_model)
    assert model["weights_sha256"] == manifest.weights_sha256
    assert model["input_size"] == [manifest.preprocess.input_height, manifest.preprocess.input_width]
    assert model["onnx_sha256"]  # exported for the run; the model folder itself is untouched
    assert manifest.onnx_file is None
    assert quick_report["settings"]["image_size"] == [384, 288]


def test_the_report_has_decode_preprocessing_inference_and_end_to_end_figures(
    quick_report: dict[str, Any],
) -> None:
    assert set(quick_report["decode"]) == set(SYNTAXES)
    assert all(d["seconds"] > 0 and d["image_size"] == [384, 288] for d in quick_report["decode"].values())
    assert quick_report["preprocessing"]["cpu"]["seconds_per_image"] > 0
    inference = quick_report["inference"]
    for name in ("torch", "onnxruntime"):
        assert set(inference[name]["batches"]) == {"1", "2"}
        assert all(b["images_per_second"] > 0 for b in inference[name]["batches"].values())
    assert "tensorrt" in inference  # measured, or unavailable with the reason
    if "unavailable" in inference["tensorrt"]:
        assert inference["tensorrt"]["unavailable"]
    e2e = quick_report["e2e"]
    assert e2e["backend"] == "onnxruntime" and e2e["images"] == 4 and e2e["seconds"] > 0
    assert e2e["floor_seconds"] == pytest.approx(e2e["decode_seconds"] + e2e["inference_seconds"])
    assert e2e["decode_seconds"] == pytest.approx(sum(e2e["decode_seconds_per_image"]))
    assert len(e2e["decode_seconds_per_image"]) == 4
    assert set(e2e["stages"]) >= {"decode", "preprocess", "infer", "render_sc_sr", "write"}


def test_ratios_are_computed_from_the_same_runs_figures(quick_report: dict[str, Any]) -> None:
    ratios, inference, e2e = quick_report["ratios"], quick_report["inference"], quick_report["e2e"]
    for size, value in ratios["onnxruntime_vs_torch"].items():
        ort = inference["onnxruntime"]["batches"][size]["images_per_second"]
        torch = inference["torch"]["batches"][size]["images_per_second"]
        assert value == pytest.approx(ort / torch)
    assert ratios["e2e_vs_floor"] == pytest.approx(e2e["seconds"] / e2e["floor_seconds"])
    dali = quick_report["preprocessing"]["dali_cpu"]
    if "seconds_per_image" in dali:
        cpu = quick_report["preprocessing"]["cpu"]["decode_and_preprocess_seconds_per_image"]
        assert ratios["dali_cpu_vs_cpu_preprocessing"] == pytest.approx(cpu / dali["seconds_per_image"])
    else:
        assert ratios["dali_cpu_vs_cpu_preprocessing"] is None
    targets = quick_report["targets"]
    assert targets["met"]["e2e_vs_floor"] == (ratios["e2e_vs_floor"] <= targets["e2e_vs_floor_max"])
    assert targets["met"]["onnxruntime_vs_torch"] == {
        size: value >= targets["onnxruntime_vs_torch_min"]
        for size, value in ratios["onnxruntime_vs_torch"].items()
    }


def test_without_the_training_extra_synthetic_inputs_are_refused_in_one_line(
    test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "training.synth", None)
    result = CliRunner().invoke(cli.app, ["bench", "--quick", "--model", str(test_model)])
    assert result.exit_code == 1
    assert "training extra" in result.stderr and "--data DIR" in result.stderr


def test_data_folders_give_one_file_per_transfer_syntax_and_the_largest_study(j2k_study: list[Path]) -> None:
    inputs = data_inputs(j2k_study[0].parent)
    assert inputs.syntaxes == {"jpeg2000": j2k_study[0]}
    assert sorted(inputs.study) == sorted(j2k_study) and inputs.origin == str(j2k_study[0].parent)


@pytest.mark.dcmtk
def test_a_quick_bench_times_ingest_once_and_sends_no_burst(quick_report: dict[str, Any]) -> None:
    ingest = quick_report["ingest"]
    assert ingest["rounds"] == 1 and ingest["files"] == 16  # the 4-view study, 4 copies
    receivers = ingest["receivers"]
    assert set(receivers) == {"storescp", "node"}
    tuned = receivers["storescp"]["median_seconds"] / receivers["node"]["median_seconds"]
    assert quick_report["ratios"]["ingest_node_vs_storescp"] == pytest.approx(tuned)
    assert quick_report["targets"]["met"]["ingest_vs_storescp"] == (tuned >= 1.0)
    assert "burst" not in quick_report  # --burst N asks for one
