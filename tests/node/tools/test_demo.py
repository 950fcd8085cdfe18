"""`mammonode demo`: two synthetic studies (one cancer, one normal) scored and reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from inference.dicom_header import is_mammogram, read_dataset, read_meta
from inference.types import RESEARCH_NOTICE
from node.commands import app as cli
from node.tools.demo import run_demo
from training.synth.synthesise import FOUR_VIEWS, synthesise_studies

MAMMONODE = Path(sys.executable).with_name("mammonode")


def _demo(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.app, ["demo", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _uids(out: Path) -> set[str]:
    return {p.stem for sub in ("sc", "sr") for p in (out / sub).glob("*.dcm")}


def test_offline_demo_scores_one_cancer_and_one_normal_study_and_says_where_the_results_are(
    test_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    code, stdout, stderr = _demo("--out", out, "--model", test_model, "--seed", "3", "--offline")
    assert code == 0, stderr

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["notice"] == RESEARCH_NOTICE
    assert len(summary["studies"]) == 2
    for study in summary["studies"]:
        assert {(i["laterality"], i["view"]) for i in study["images"]} == FOUR_VIEWS
        assert len(study["images"]) == 4
    assert len(list((out / "png").glob("*.png"))) == 8
    assert len(list((out / "sc").glob("*.dcm"))) == 8
    assert len(list((out / "sr").glob("*.dcm"))) == 2

    lines = stdout.splitlines()
    assert sum(line.startswith("exam ") for line in lines) == 2
    assert sum(line.startswith("image ") for line in lines) == 8
    truth = [line for line in lines if line.strip().startswith("patient ")]
    assert len(truth) == 2
    assert sum("cancer in" in line for line in truth) == 1
    assert sum("normal (no cancer)" in line for line in truth) == 1
    for study in summary["studies"]:
        decision = "RECALL" if study["recall_recommended"] else "no recall"
        assert any(
            f"patient {study['patient_id']}:" in line
            and f"P={study['exam_probability']:.3f} -> {decision}" in line
            for line in truth
        )
    for sub in ("png", "sc", "sr", "cad"):
        assert any(str(out / sub) in line for line in lines), sub
    # The synthetic inputs were temporary; only the results stay in OUT.
    assert sorted(p.name for p in out.iterdir()) == ["cad", "png", "sc", "sr", "summary.json"]

    # Same seed again into the same folder: the same objects, none added (invariant 6).
    before = _uids(out)
    code, _, stderr = _demo("--out", out, "--model", test_model, "--seed", "3", "--offline")
    assert code == 0, stderr
    assert _uids(out) == before and len(before) == 10


@pytest.mark.slow
def test_demo_sends_the_studies_through_a_loopback_node_and_collects_what_it_returns(
    test_model: Path, tmp_path: Path
) -> None:
    """The README's main job: node, modality and PACS on 127.0.0.1, real associations."""
    from sqlalchemy import create_engine, text

    out = tmp_path / "demo"
    code, stdout, stderr = _demo("--out", out, "--model", test_model, "--seed", "3")
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["notice"] == RESEARCH_NOTICE
    assert len(summary["studies"]) == 2
    sent = {s["study_uid"] for s in summary["studies"]}
    for sub, n in (("sc", 8), ("sr", 2), ("png", 8)):
        assert len(list((out / sub).iterdir())) == n, sub
    for path in (out / "sc").glob("*.dcm"):
        ds = read_dataset(path)
        assert str(ds.StudyInstanceUID) in sent
        meta = read_meta(ds)
        # Hung like its source (modality MG), yet never taken for a mammogram to score again.
        assert meta.modality == "MG" and is_mammogram(ds, meta)[0] is False
    lines = stdout.splitlines()
    assert any(line.startswith("sent 8 images over DICOM") for line in lines)
    truth = [line for line in lines if line.strip().startswith("patient ")]
    assert sum("cancer in" in line for line in truth) == 1 and sum("normal" in line for line in truth) == 1
    for study in summary["studies"]:
        assert any(study["study_uid"] in line and "scored" in line for line in lines)

    # The node's own record of it: receipt, scoring and delivery of both studies, audited.
    engine = create_engine(f"sqlite:///{out / 'node' / 'mammonode.sqlite'}")
    with engine.connect() as conn:
        events = dict(conn.execute(text("SELECT event, count(*) FROM audit_events GROUP BY event")).all())
    engine.dispose()
    assert events["instance.received"] == 8
    assert events["study.scored"] == 2
    assert events["result.sent"] == 12  # per study: 4 captures, the report, the CAD SR

    # Again into the same folder: a new node, the same result objects (invariant 6).
    before = _uids(out)
    code, _, stderr = _demo("--out", out, "--model", test_model, "--seed", "3")
    assert code == 0, stderr
    assert _uids(out) == before and len(before) == 10


def test_synthesised_studies_are_one_cancer_and_one_normal_complete_exam(tmp_path: Path) -> None:
    studies = synthesise_studies(tmp_path / "a", seed=11, size=(384, 288))
    assert sorted(bool(s.cancer_sides) for s in studies) == [False, True]
    for study in studies:
        metas = [read_meta(read_dataset(path, stop_before_pixels=True)) for path in study.files]
        assert {(m.laterality, m.view) for m in metas} == FOUR_VIEWS and len(metas) == 4
        assert {m.patient_id for m in metas} == {study.patient_id}
        assert len({m.study_instance_uid for m in metas}) == 1
    again = synthesise_studies(tmp_path / "b", seed=11, size=(384, 288))
    first = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in studies for p in s.files
    ]
    second = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in again for p in s.files]
    assert first == second


def test_score_step_sees_the_synthetic_files_which_are_removed_afterwards(
    test_model: Path, tmp_path: Path
) -> None:
    """The seam the network demo will use: the score step gets existing files, OUT and the model,
    and its exit status is the demo's."""
    out = tmp_path / "out"
    calls: list[tuple[list[Path], Path, Path]] = []

    def fake_step(files: list[Path], step_out: Path, model: Path) -> int:
        assert all(p.is_file() for p in files)
        assert all(out in p.parents for p in files)
        calls.append((list(files), step_out, model))
        return 7

    assert run_demo(out, test_model, 0, synthesise=synthesise_studies, score_step=fake_step).exit_code == 7
    assert len(calls) == 1
    files, step_out, model = calls[0]
    assert len(files) == 8 and step_out == out and model == test_model
    assert not any(p.exists() for p in files)
    assert list(out.iterdir()) == []


def test_demo_without_the_training_extra_says_how_to_install_it(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # makes `import training.synth.synthesise` fail, as in a serving-only install
    monkeypatch.setitem(sys.modules, "training.synth", None)
    monkeypatch.setitem(sys.modules, "training.synth.synthesise", None)
    out = tmp_path / "out"
    code, stdout, stderr = _demo("--out", out, "--model", test_model)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "pip install 'mammonode[train]'" in lines[0]
    assert stdout == ""
    assert not out.exists()


def test_demo_with_a_non_model_folder_is_one_error_line(tmp_path: Path) -> None:
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(MAMMONODE), "demo", "--out", str(out), "--model", str(not_a_model)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {not_a_model} is not a model folder (no model.json)"]
    assert not out.exists()
