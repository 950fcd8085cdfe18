"""`mammonode export-cases` and `mammonode retrain`: de-identified RSNA-layout data from the spool,
and a fine-tuned challenger compared with the champion, which keeps serving."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from admin_helpers import (
    PRIVATE_TEXT,
    SECRET_INSTITUTION,
    SECRET_NAME,
    audit_events,
    cli,
    spool_study,
    study_uid,
)
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.dicom_header import read_meta
from inference.dicom_pixels import decode_pixels
from inference.manifest import load_manifest
from node import audit
from node.db.models import Instance, ModelVersion
from training.datasets.rsna import load_rsna

PATIENTS = ("MRN-ALPHA-7731", "MRN-BRAVO-0042")


def _spool_two(sessions: sessionmaker[Session], data_dir: Path) -> dict[str, list[str]]:
    return {
        pid: spool_study(sessions, data_dir, patient_id=pid, uid=study_uid(pid), seed=n)
        for n, pid in enumerate(PATIENTS)
    }


def _write_outcomes(
    path: Path, rows: list[tuple[str, str, str]], header: str = "study_uid,laterality,cancer"
) -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows), encoding="utf-8")
    return path


def test_export_cases_writes_a_loadable_deidentified_dataset(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    sops = _spool_two(sessions, data_dir)
    out = tmp_path / "export"

    result = cli(["export-cases", "--out", str(out)], db_url, data_dir)
    assert result.exit_code == 0, result.output
    assert "exported 8 images of 2 patients (4 breasts, 0 cancer)" in result.output

    records = load_rsna(out)
    assert len(records) == 8
    assert sorted({r.patient_id for r in records}) == [1, 2]
    assert {(r.laterality, r.view) for r in records} == {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}
    assert all(r.cancer == 0 and r.age == 60 for r in records)

    originals = {
        str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in (data_dir / "spool").rglob("*.dcm"))
    }
    secrets = [
        *PATIENTS,
        SECRET_NAME,
        SECRET_INSTITUTION,
        PRIVATE_TEXT,
        "ACC-998877",
        "WHO^DOCTOR",
    ]
    secrets += [study_uid(pid) for pid in PATIENTS] + [s for uids in sops.values() for s in uids]
    exported_pixels = []
    for record in records:
        raw = record.path.read_bytes()
        leaked = [s for s in secrets if s.encode() in raw]
        assert leaked == [], f"{record.path} still holds {leaked}"
        ds = dcmread(record.path)
        assert ds.PatientID == str(record.patient_id)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientBirthDate == "" and ds.StudyDate == ""
        assert "OtherPatientIDs" not in ds and "InstitutionName" not in ds
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        meta = read_meta(ds)
        assert (meta.laterality, meta.view) == (record.laterality, record.view)
        exported_pixels.append(decode_pixels(ds))
    # Pixels go out as received: every exported image is one of the originals, bit for bit.
    original_pixels = [decode_pixels(ds) for ds in originals.values()]
    for pixels in exported_pixels:
        assert sum(np.array_equal(pixels, o) for o in original_pixels) == 1

    (event,) = audit_events(sessions, audit.DATA_EXPORTED)
    details = event.details or {}
    assert sorted(details["studies"]) == sorted(study_uid(pid) for pid in PATIENTS)
    assert details["images"] == 8 and details["labelled"] is False
    assert event.actor.startswith("cli:")

    again = cli(["export-cases", "--out", str(out)], db_url, data_dir)
    assert "exists and is not empty" in str(again.exception)


def test_export_cases_with_labels_and_burned_in_images(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    _spool_two(sessions, data_dir)
    with sessions() as session:
        first_l = session.scalars(
            select(Instance).where(Instance.laterality == "L").order_by(Instance.id).limit(1)
        ).one()
    burned = data_dir / "spool" / first_l.spool_path
    ds = dcmread(burned)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(burned, enforce_file_format=True)

    labels = _write_outcomes(tmp_path / "outcomes.csv", [(study_uid(PATIENTS[0]), "L", "1")])
    out = tmp_path / "labelled"
    result = cli(["export-cases", "--out", str(out), "--labels", str(labels)], db_url, data_dir)
    assert result.exit_code == 0, result.output
    assert "skipped: 1 burned-in annotation" in result.output
    records = load_rsna(out)
    assert [(r.laterality, r.cancer) for r in records] == [("L", 1)]

    with_burned = tmp_path / "with-burned"
    cli(
        ["export-cases", "--out", str(with_burned), "--labels", str(labels), "--include-burned-in"],
        db_url,
        data_dir,
    )
    assert len(load_rsna(with_burned)) == 2


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([(study_uid("nobody"), "L", "1")], None, "outcomes line 2: unknown study UID"),
        (
            [(study_uid(PATIENTS[0]), "X", "1")],
            None,
            "outcomes.csv line 2: laterality must be L or R, got 'X'",
        ),
        ([(study_uid(PATIENTS[0]), "L", "maybe")], None, "line 2: cancer must be 0 or 1, got 'maybe'"),
        ([("../../etc", "L", "1")], None, "line 2: study_uid '../../etc' is not a valid DICOM UID"),
        (
            [(study_uid(PATIENTS[0]), "L", "1"), (study_uid(PATIENTS[0]), "l", "0")],
            None,
            "line 3: study " + study_uid(PATIENTS[0]) + " L already given on line 2",
        ),
        ([(study_uid(PATIENTS[0]), "L", "1")], "study,side,cancer", "lacks column(s) study_uid, laterality"),
    ],
)
def test_bad_outcome_rows_are_one_line_errors(
    rows: list[tuple[str, str, str]],
    header: str | None,
    message: str,
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    spool_study(sessions, data_dir, patient_id=PATIENTS[0], uid=study_uid(PATIENTS[0]), views=(("L", "CC"),))
    labels = _write_outcomes(tmp_path / "outcomes.csv", rows, **({"header": header} if header else {}))
    result = cli(["retrain", "--labels", str(labels), "--out", str(tmp_path / "run")], db_url, data_dir)
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert "\n" not in str(result.exception)
    assert not (tmp_path / "run").exists()
    assert audit_events(sessions, audit.DATA_EXPORTED) == []


def test_a_labelled_breast_without_images_is_an_error(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    spool_study(sessions, data_dir, patient_id=PATIENTS[0], uid=study_uid(PATIENTS[0]), views=(("L", "CC"),))
    labels = _write_outcomes(tmp_path / "outcomes.csv", [(study_uid(PATIENTS[0]), "R", "0")])
    result = cli(["export-cases", "--labels", str(labels), "--out", str(tmp_path / "x")], db_url, data_dir)
    assert f"outcomes line 2: study {study_uid(PATIENTS[0])} has no scorable R image" in str(result.exception)


@pytest.mark.slow
def test_retrain_registers_a_challenger_and_keeps_the_champion_serving(
    test_model: Path, sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    rows = []
    for n in range(6):
        uid = study_uid(f"retrain-{n}")
        spool_study(sessions, data_dir, patient_id=f"MRN-RT-{n}", uid=uid, seed=10 + n)
        rows += [(uid, "L", "1" if n < 3 else "0"), (uid, "R", "0")]
    labels = _write_outcomes(tmp_path / "outcomes.csv", rows)
    champion_sha = load_manifest(test_model).weights_sha256
    assert cli(["model", "promote", str(test_model)], db_url, data_dir).exit_code == 0

    out = tmp_path / "retrain"
    args = [
        "retrain",
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batches-per-epoch",
        "2",
        "--batch-ids",
        "2",
        "--input-size",
        "128x64",
        "--model-version",
        "0.0.2-node",
    ]
    result = cli(args, db_url, data_dir)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    lines = result.output.splitlines()
    measured = next(line for line in lines if line.startswith("measured on the held-out split"))
    assert "2 patients, 4 breasts (1 cancer), 8 images" in measured
    champion_line = next(line for line in lines if line.startswith("champion"))
    challenger_line = next(line for line in lines if line.startswith("challenger "))
    assert champion_sha[:12] in champion_line and "0.0.2-node" in challenger_line
    assert champion_line.split()[-1] == challenger_line.split()[-1] == "4"  # breasts measured

    with sessions() as session:
        rows_db = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        assert [r.weights_sha256 for r in rows_db if r.active] == [champion_sha]
        (challenger,) = [r for r in rows_db if r.version == "0.0.2-node"]
        assert not challenger.active
        assert challenger.metrics is not None
        assert challenger.metrics["retrain_heldout"]["measured_on"]["breasts"] == 4
    manifest = load_manifest(Path(challenger.path))
    assert manifest.training_data["initialised_from"]["weights_sha256"] == champion_sha
    assert manifest.metrics["retrain_heldout"]["measured_on"]["breasts"] == 4

    (run,) = audit_events(sessions, audit.RETRAIN_RUN)
    details = run.details or {}
    assert details["champion"]["weights_sha256"] == champion_sha
    assert details["challenger"]["weights_sha256"] == challenger.weights_sha256
    assert details["train_patients"] == 4 and details["heldout_patients"] == 2
    (exported,) = audit_events(sessions, audit.DATA_EXPORTED)
    assert (exported.details or {})["labelled"] is True and (exported.details or {})["images"] == 24

    with (out / "heldout" / "train.csv").open(newline="") as fh:
        held = {row["patient_id"] for row in csv.DictReader(fh)}
    with (out / "train" / "train.csv").open(newline="") as fh:
        train = {row["patient_id"] for row in csv.DictReader(fh)}
    assert len(held) == 2 and len(train) == 4 and not held & train
