"""`mammonode score` end to end: real synthetic DICOM in, real SC/SR/PNG/JSON files out, re-read.

In-process runs go through the Typer app with ``CliRunner`` (same code path as the console script
up to `main()`); the one-line error contract of `main()` is checked by running the installed
console script in a subprocess, and in-process through `main()` itself where a subprocess would
only add a torch import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner, Result

from inference.manifest import load_manifest
from inference.overlay import BANNER_RGB
from inference.types import RESEARCH_NOTICE
from node.commands import app as cli
from training.datasets.rsna import load_rsna
from training.synth import TRANSFER_SYNTAXES
from training.synth.encoding import MIXED_SYNTAXES

MAMMONODE = Path(sys.executable).with_name("mammonode")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One synthetic input image: its train.csv row joined with its DICOM header."""

    path: Path
    patient_id: str
    laterality: str
    view: str
    cancer: int
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax: str


def _sources(root: Path) -> dict[str, Source]:
    """SOP Instance UID -> Source for every row of the synth train.csv."""
    out: dict[str, Source] = {}
    for record in load_rsna(root):
        ds = pydicom.dcmread(record.path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = Source(
            path=record.path,
            patient_id=str(record.patient_id),
            laterality=record.laterality,
            view=record.view,
            cancer=record.cancer,
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        )
    return out


def _score(*args: str | Path) -> Result:
    """Run `mammonode score ARGS` in-process; unexpected exceptions propagate with their trace."""
    return CliRunner().invoke(cli.app, ["score", *map(str, args)], catch_exceptions=False)


def _run_console(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a user would."""
    return subprocess.run(
        [str(MAMMONODE), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return data


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe is not None
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def _content_texts(items: Any) -> list[tuple[str, str]]:
    """(concept code value, text) of every TEXT content item of an SR tree, depth first."""
    found: list[tuple[str, str]] = []
    for item in items:
        if item.get("ValueType") == "TEXT":
            found.append((str(item.ConceptNameCodeSequence[0].CodeValue), str(item.TextValue)))
        if "ContentSequence" in item:
            found.extend(_content_texts(item.ContentSequence))
    return found


def _patient_dir(root: Path, patient_id: str) -> Path:
    return root / "train_images" / patient_id


# --------------------------------------------------------------------------------------------
# Scoring runs shared by the tests of this module (each one is a full CLI run)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(synth_root: Path) -> dict[str, Source]:
    return _sources(synth_root)


@pytest.fixture(scope="module")
def scored_json(
    synth_root: Path, test_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("score-json") / "out"
    return _score(synth_root / "train_images", "--out", out, "--model", test_model, "--json"), out


@pytest.fixture(scope="module")
def scored_table(
    synth_root: Path, test_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Result, Path]:
    """The same inputs and model as ``scored_json``, into another folder, printing the table."""
    out = tmp_path_factory.mktemp("score-table") / "out"
    return _score(synth_root / "train_images", "--out", out, "--model", test_model), out


@pytest.fixture(scope="module")
def first_patient(sources: dict[str, Source]) -> str:
    return min(s.patient_id for s in sources.values())


# --------------------------------------------------------------------------------------------
# Output: JSON, table, grouping
# --------------------------------------------------------------------------------------------


def test_json_output_equals_summary_and_groups_images_by_patient_study_and_side(
    scored_json: tuple[Result, Path], sources: dict[str, Source], test_model: Path
) -> None:
    result, out = scored_json
    assert result.exit_code == 0, result.stderr
    assert "skipped" not in result.stderr
    printed = json.loads(result.stdout)
    assert printed == _summary(out)

    manifest = load_manifest(test_model)
    assert printed["model"]["name"] == manifest.name
    assert printed["model"]["version"] == manifest.version
    assert printed["model"]["weights_sha256"] == manifest.weights_sha256
    assert printed["model"]["notice"] == RESEARCH_NOTICE
    assert printed["skipped"] == []

    patients = {s.patient_id for s in sources.values()}
    studies = {study["patient_id"]: study for study in printed["studies"]}
    assert set(studies) == patients and len(printed["studies"]) == len(patients)
    for patient, study in studies.items():
        expected = {uid: s for uid, s in sources.items() if s.patient_id == patient}
        assert study["study_instance_uid"] == {s.study_uid for s in expected.values()}.pop()
        images = {image["sop_instance_uid"]: image for image in study["images"]}
        assert set(images) == set(expected)
        for uid, image in images.items():
            assert (image["laterality"], image["view"]) == (expected[uid].laterality, expected[uid].view)
        breasts = {breast["laterality"]: breast for breast in study["breasts"]}
        assert set(breasts) == {s.laterality for s in expected.values()}
        for side, breast in breasts.items():
            assert set(breast["image_probabilities"]) == {
                uid for uid, s in expected.items() if s.laterality == side
            }
            assert breast["probability"] == breast["aggregates"][breast["method"]]
        assert study["exam_probability"] == max(b["probability"] for b in study["breasts"])
        assert study["recall_recommended"] == (study["exam_probability"] >= study["threshold"])


def test_table_lists_exam_breast_and_image_rows_of_each_study(scored_table: tuple[Result, Path]) -> None:
    result, out = scored_table
    assert result.exit_code == 0, result.stderr
    summary = _summary(out)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["level", "study"]
    rows = [line.split() for line in lines[1:] if line.strip()]

    expected: list[list[str]] = []
    for study in summary["studies"]:
        decision = "RECALL" if study["recall_recommended"] else "no"
        expected.append(["exam", study["study_instance_uid"], f"{study['exam_probability']:.3f}", decision])
        for b in study["breasts"]:
            expected.append(["breast", b["laterality"], b["method"], f"{b['probability']:.3f}"])
        for i in study["images"]:
            expected.append(
                ["image", i["sop_instance_uid"], i["laterality"], i["view"], f"{i['probability']:.3f}"]
            )
    assert [row[: len(e)] for row, e in zip(rows, expected, strict=True)] == expected


def test_one_sc_and_png_per_image_and_one_sr_and_cad_sr_per_study_named_by_their_uids(
    scored_json: tuple[Result, Path], sources: dict[str, Source]
) -> None:
    _, out = scored_json
    summary = _summary(out)
    sc_files = sorted((out / "sc").glob("*.dcm"))
    sr_files = sorted((out / "sr").glob("*.dcm"))
    cad_files = sorted((out / "cad").glob("*.dcm"))
    png_files = sorted((out / "png").glob("*.png"))
    assert len(sc_files) == len(png_files) == len(sources)
    assert len(sr_files) == len(cad_files) == len({s.study_uid for s in sources.values()})
    assert {p.stem for p in cad_files} == {s["cad_sr_sop_instance_uid"] for s in summary["studies"]}
    assert not (out / "pr").exists()  # presentation states only when asked for
    assert {p.stem for p in png_files} == set(sources)
    assert {p.stem for p in sc_files} == {
        i["cam_sc_sop_instance_uid"] for s in summary["studies"] for i in s["images"]
    }
    assert {p.stem for p in sr_files} == {s["sr_sop_instance_uid"] for s in summary["studies"]}
    for kind, files in (("sc", sc_files), ("sr", sr_files), ("cad", cad_files), ("png", png_files)):
        assert sorted(Path(p).resolve() for p in summary["written"][kind]) == [p.resolve() for p in files]


def test_every_transfer_syntax_of_the_generator_is_scored(
    scored_json: tuple[Result, Path], sources: dict[str, Source]
) -> None:
    _, out = scored_json
    mixed = [TRANSFER_SYNTAXES[name] for name in MIXED_SYNTAXES]  # what the synth fixture holds
    assert {s.transfer_syntax for s in sources.values()} == set(mixed)
    scored = {i["sop_instance_uid"] for s in _summary(out)["studies"] for i in s["images"]}
    referenced = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID)
        for p in (out / "sc").glob("*.dcm")
    }
    for syntax in mixed:
        uids = {uid for uid, s in sources.items() if s.transfer_syntax == syntax}
        assert uids and uids <= scored and uids <= referenced, syntax


# --------------------------------------------------------------------------------------------
# The DICOM objects written
# --------------------------------------------------------------------------------------------


@pytest.mark.dcmtk
def test_every_written_object_passes_dciodvfy(scored_json: tuple[Result, Path]) -> None:
    _, out = scored_json
    files = [p for sub in ("sc", "sr", "cad") for p in sorted((out / sub).glob("*.dcm"))]
    assert {p.parent.name for p in files} == {"sc", "sr", "cad"}
    problems = {p.name: errors for p in files if (errors := _dciodvfy_errors(p))}
    assert problems == {}


def test_sc_joins_the_source_study_in_a_new_series_and_references_the_source(
    scored_json: tuple[Result, Path], sources: dict[str, Source]
) -> None:
    _, out = scored_json
    sc_series: set[str] = set()
    referenced: set[str] = set()
    for path in sorted((out / "sc").glob("*.dcm")):
        sc = pydicom.dcmread(path)
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.file_meta.TransferSyntaxUID == RLELossless
        assert str(sc.SOPInstanceUID) == path.stem
        ref = sc.SourceImageSequence[0]
        source = sources[str(ref.ReferencedSOPInstanceUID)]
        referenced.add(source.sop_uid)
        assert str(sc.PatientID) == source.patient_id
        assert str(sc.StudyInstanceUID) == source.study_uid
        assert str(sc.SeriesInstanceUID) not in {s.series_uid for s in sources.values()}
        assert sc.ImageLaterality == source.laterality
        # Placed like its source by a hanging protocol, on the source's grid (shrunk by a whole factor).
        assert sc.Modality == "MG"
        assert sc.ViewCodeSequence[0].CodeValue == {"CC": "399162004", "MLO": "399368009"}[source.view]
        header = pydicom.dcmread(source.path, stop_before_pixels=True)
        factor = -(-max(header.Rows, header.Columns) // 2048)
        assert (sc.Rows, sc.Columns) == (header.Rows // factor, header.Columns // factor)
        if "ImagerPixelSpacing" in header or "PixelSpacing" in header:
            spacing = header.get("PixelSpacing") or header.ImagerPixelSpacing
            assert [float(v) for v in sc.PixelSpacing] == pytest.approx([float(v) * factor for v in spacing])
        pixels = sc.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        assert pixels.shape[:2] == (sc.Rows, sc.Columns)
        assert RESEARCH_NOTICE in str(sc.ImageComments)
        sc_series.add(str(sc.SeriesInstanceUID))
    assert referenced == set(sources)
    # One CAM series per study.
    assert len(sc_series) == len({s.study_uid for s in sources.values()})


def test_synthetic_data_notice_is_burned_in_inside_the_image(
    scored_json: tuple[Result, Path],
    no_notice_model: Path,
    synth_root: Path,
    first_patient: str,
    tmp_path: Path,
) -> None:
    """Same weights, with and without the synthetic-data flag: both captures have the source's
    own grid (nothing is added around the image), and the notice is a red band burned into a
    corner panel of the one with it; the rest of the picture is the same."""
    _, out = scored_json
    plain_out = tmp_path / "plain"
    result = _score(_patient_dir(synth_root, first_patient), "--out", plain_out, "--model", no_notice_model)
    assert result.exit_code == 0, result.stderr
    assert _summary(plain_out)["model"]["notice"] is None
    assert _summary(out)["model"]["notice"] == RESEARCH_NOTICE

    def by_source(folder: Path) -> dict[str, pydicom.Dataset]:
        items = (pydicom.dcmread(p) for p in (folder / "sc").glob("*.dcm"))
        return {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID): ds for ds in items}

    with_notice, without = by_source(out), by_source(plain_out)
    assert without and set(without) <= set(with_notice)
    for uid, plain_sc in without.items():
        noted_sc = with_notice[uid]
        noted, plain = noted_sc.pixel_array, plain_sc.pixel_array
        assert noted.shape == plain.shape
        assert (noted_sc.Rows, noted_sc.Columns) == (plain_sc.Rows, plain_sc.Columns)
        red = np.all(noted == BANNER_RGB, axis=2)
        assert red.any() and not np.all(plain == BANNER_RGB, axis=2).any()
        rows, cols = np.nonzero(red)  # the band tops a panel in a corner: at a side, in one half
        assert cols.min() == 0 or cols.max() == noted.shape[1] - 1
        assert rows.max() < noted.shape[0] / 2 or rows.min() >= noted.shape[0] / 2
        differ = np.any(noted != plain, axis=2)
        assert 0 < differ.mean() < 0.5  # only the corner panel differs
        assert RESEARCH_NOTICE not in str(plain_sc.get("ImageComments", ""))


def test_sr_references_every_source_and_names_model_version_weights_and_notice(
    scored_json: tuple[Result, Path], sources: dict[str, Source], test_model: Path
) -> None:
    _, out = scored_json
    manifest = load_manifest(test_model)
    summary_srs = {s["study_instance_uid"]: s["sr_sop_instance_uid"] for s in _summary(out)["studies"]}
    seen_studies: set[str] = set()
    for path in sorted((out / "sr").glob("*.dcm")):
        sr = hd.sr.srread(path)
        study_uid = str(sr.StudyInstanceUID)
        seen_studies.add(study_uid)
        assert summary_srs[study_uid] == str(sr.SOPInstanceUID) == path.stem
        expected = {uid for uid, s in sources.items() if s.study_uid == study_uid}
        assert str(sr.PatientID) == {sources[uid].patient_id for uid in expected}.pop()
        captures = {
            str(ds.SOPInstanceUID)
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in (out / "sc").glob("*.dcm"))
            if str(ds.StudyInstanceUID) == study_uid
        }
        # The evidence: the scored images and the CAM captures the report references.
        assert captures and {sop for _, _, sop, _ in sr.get_evidence()} == expected | captures
        report = sr.content
        assert isinstance(report, hd.sr.MeasurementReport)
        groups = report.get_planar_roi_measurement_groups()
        regions = [group.roi for group in groups]
        assert groups and all(roi is not None for roi in regions), "every group needs an image region"
        placed_on = {
            str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for roi in regions
        }
        assert placed_on == expected

        texts = _content_texts(sr.ContentSequence)
        versions = {text for code, text in texts if code == codes.DCM.AlgorithmVersion.value}
        parameters = {text for code, text in texts if code == codes.DCM.AlgorithmParameters.value}
        comments = {text for code, text in texts if code == codes.DCM.Comment.value}
        assert versions == {manifest.version}
        assert f"weights_sha256={manifest.weights_sha256}" in parameters
        assert RESEARCH_NOTICE in comments
    assert seen_studies == {s.study_uid for s in sources.values()}


# --------------------------------------------------------------------------------------------
# Idempotence (design invariant 6)
# --------------------------------------------------------------------------------------------


@pytest.mark.dcmtk
def test_presentation_states_when_asked_for_reference_each_image_and_pass_dciodvfy(
    synth_root: Path, test_model: Path, first_patient: str, sources: dict[str, Source], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _score(
        _patient_dir(synth_root, first_patient), "--out", out, "--model", test_model, "--presentation-states"
    )
    assert result.exit_code == 0, result.output
    states = sorted((out / "pr").glob("*.dcm"))
    mine = {uid for uid, s in sources.items() if s.patient_id == first_patient}
    referenced = set()
    for path in states:
        ds = pydicom.dcmread(path)
        referenced.add(
            str(ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        )
        assert _dciodvfy_errors(path) == []
    assert referenced == mine and len(states) == len(mine)


def _result_uids(out: Path) -> set[str]:
    return {p.stem for sub in ("sc", "sr", "cad") for p in (out / sub).glob("*.dcm")}


def test_rescoring_the_same_inputs_gives_the_same_uids(
    scored_json: tuple[Result, Path], scored_table: tuple[Result, Path]
) -> None:
    (_, first), (_, second) = scored_json, scored_table
    assert _result_uids(first) and _result_uids(first) == _result_uids(second)
    series = [
        {
            str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
            for p in (out / "sc").glob("*.dcm")
        }
        for out in (first, second)
    ]
    assert series[0] == series[1]


def test_rescoring_a_folder_that_holds_the_previous_results_reads_only_the_images(
    synth_root: Path, first_patient: str, test_model: Path, tmp_path: Path
) -> None:
    """`score DIR --out DIR/results` run twice: the second run must not take the first run's PNGs,
    captures, report and summary for inputs (which would be skipped and make the exit status 1)."""
    folder = tmp_path / "studies"
    shutil.copytree(_patient_dir(synth_root, first_patient), folder)
    out = folder / "results"
    first = _score(folder, "--out", out, "--model", test_model)
    assert first.exit_code == 0, first.stderr
    uids = _result_uids(out)
    second = _score(folder, "--out", out, "--model", test_model)
    assert second.exit_code == 0, second.stderr
    assert "skipped" not in second.stderr
    assert _summary(out)["skipped"] == []
    assert _result_uids(out) == uids and len(uids) == len(list(folder.glob("*.dcm"))) + 2


def test_different_weights_give_different_uids(
    scored_json: tuple[Result, Path],
    sources: dict[str, Source],
    other_weights_model: Path,
    test_model: Path,
    synth_root: Path,
    first_patient: str,
    tmp_path: Path,
) -> None:
    assert load_manifest(other_weights_model).weights_sha256 != load_manifest(test_model).weights_sha256
    _, first = scored_json
    out = tmp_path / "other"
    result = _score(_patient_dir(synth_root, first_patient), "--out", out, "--model", other_weights_model)
    assert result.exit_code == 0, result.stderr
    patient_images = {uid for uid, s in sources.items() if s.patient_id == first_patient}
    other = _result_uids(out)
    assert len(other) == len(patient_images) + 2  # one SC per image, the SR and the CAD SR
    assert other.isdisjoint(_result_uids(first))
    # ...while describing the very same source images.
    refs = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SourceImageSequence[0].ReferencedSOPInstanceUID)
        for p in (out / "sc").glob("*.dcm")
    }
    assert refs == patient_images


# --------------------------------------------------------------------------------------------
# Unusable inputs and errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path: Path, synth_root: Path, first_patient: str) -> dict[str, Path]:
    """A non-DICOM file, a mammogram header without pixel data and a real CT image."""
    folder = tmp_path / "bad"
    folder.mkdir()
    text = folder / "notes.txt"
    text.write_text("not an image\n", encoding="utf-8")
    donor = sorted(_patient_dir(synth_root, first_patient).glob("*.dcm"))[0]
    ds = pydicom.dcmread(donor)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    no_pixels = folder / "no_pixels.dcm"
    ds.save_as(no_pixels)
    ct = folder / "ct.dcm"
    ct_source = get_testdata_file("CT_small.dcm")  # a real CT image shipped with pydicom
    assert isinstance(ct_source, str)
    shutil.copy(ct_source, ct)
    return {"text": text, "no_pixels": no_pixels, "ct": ct}


def test_unusable_inputs_are_reported_once_each_and_the_rest_is_still_scored(
    bad_inputs: dict[str, Path], synth_root: Path, first_patient: str, test_model: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "does-not-exist.dcm"
    patient = _patient_dir(synth_root, first_patient)
    out = tmp_path / "out"
    result = _score(
        bad_inputs["text"],
        bad_inputs["no_pixels"],
        bad_inputs["ct"],
        missing,
        patient,
        "--out",
        out,
        "--model",
        test_model,
    )

    assert result.exit_code == 1
    stderr = result.stderr.splitlines()
    reasons = {
        "text": "not a DICOM file",
        "no_pixels": "no pixel data",
        "ct": "modality CT is not mammography",
    }
    for key, reason in reasons.items():
        lines = [line for line in stderr if str(bad_inputs[key]) in line]
        assert len(lines) == 1 and reason in lines[0], (key, stderr)
    lines = [line for line in stderr if str(missing) in line]
    assert len(lines) == 1 and "no such file" in lines[0]
    assert _error_lines(result.stderr) == []

    summary = _summary(out)
    assert {item["path"] for item in summary["skipped"]} == {*map(str, bad_inputs.values()), str(missing)}
    assert [s["patient_id"] for s in summary["studies"]] == [first_patient]
    scored = {i["sop_instance_uid"] for i in summary["studies"][0]["images"]}
    assert len(scored) == len(list(patient.glob("*.dcm")))
    assert len(list((out / "sc").glob("*.dcm"))) == len(scored)
    assert len(list((out / "sr").glob("*.dcm"))) == 1


def test_nothing_scorable_exits_1_with_one_error_line(
    bad_inputs: dict[str, Path], test_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _score(*bad_inputs.values(), "--out", out, "--model", test_model)
    assert result.exit_code == 1
    assert _error_lines(result.stderr) == ["error: no image could be scored"]
    assert not any((out / "sc").glob("*.dcm"))
    assert _summary(out)["studies"] == []


def test_tampered_weights_end_as_one_error_line_from_main(
    test_model: Path,
    synth_root: Path,
    first_patient: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`main()` turns an InputError raised deep in model loading into one line and status 1."""
    model = tmp_path / "model"
    shutil.copytree(test_model, model)
    weights = model / load_manifest(model).weights_file
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "mammonode",
            "score",
            str(_patient_dir(synth_root, first_patient)),
            "--out",
            str(out),
            "--model",
            str(model),
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1 and "SHA-256" in lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The installed console script
# --------------------------------------------------------------------------------------------


def test_console_script_help_exits_0() -> None:
    top = _run_console("--help")
    assert top.returncode == 0, top.stderr
    assert "score" in top.stdout and "demo" in top.stdout
    sub = _run_console("score", "--help")
    assert sub.returncode == 0, sub.stderr
    assert "--model" in sub.stdout and "--json" in sub.stdout
    bare = _run_console()  # no command: the help on stderr and the usage-error status, no trace
    assert bare.returncode == 2
    assert "Traceback" not in bare.stderr and "Usage:" in bare.stderr


def test_console_script_unknown_option_is_one_error_line_with_status_2(tmp_path: Path) -> None:
    proc = _run_console("score", tmp_path, "--out", tmp_path / "out", "--no-such-option")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--no-such-option" in lines[0]
    assert not (tmp_path / "out").exists()


def test_console_script_model_option_on_a_non_model_folder_is_one_error_line(
    tmp_path: Path, synth_root: Path, first_patient: str
) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    proc = _run_console(
        "score", _patient_dir(synth_root, first_patient), "--out", out, "--model", not_a_model
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {not_a_model} is not a model folder (no model.json)"]
    assert not out.exists()
