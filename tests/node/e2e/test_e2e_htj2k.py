"""Issue 12's "HTJ2K end to end": a modality sends 4-view studies in HTJ2K Lossless (.201), HTJ2K
Lossless RPCL (.202) and HTJ2K (.203, lossy here) to `mammonode serve`; the CAM captures and
reports of each arrive in a real Orthanc.

dcmtk 3.6.7's storescu cannot propose HTJ2K, so the modality is a pynetdicom SCU proposing the
study's one syntax (one association per study). Each study's L-CC is a 3328x2560 phantom, the size
of a real digital mammogram; the other views are small, to keep the run short. On SQLite and
PostgreSQL (``db_url``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import scu_store
from peers import FOUR_VIEWS, LOOPBACK, OrthancFactory, free_port, write_mammogram
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, MammographyCADSRStorage
from serve_helpers import serve_env, toml_config, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.uids import derive_uid
from node.db.models import Instance, Job, Score, Study, Transmission
from node.dicom.sender import echo
from node.dicom.status import DimseStatus
from training.synth import make_dicom, synth_breast, write_dicom

pytestmark = [pytest.mark.peers, pytest.mark.slow]

MAMMONODE = Path(sys.executable).with_name("mammonode")
NODE_AE = "MAMMONODE"
MODALITY_AE = "MODALITY"
SYNTAXES = {"htj2k": HTJ2KLossless, "htj2k-rpcl": HTJ2KLosslessRPCL, "htj2k-lossy": HTJ2K}
"""training.synth name -> Transfer Syntax UID: one study in each."""
MAMMOGRAM = (3328, 2560)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""
TIMEOUT = 180.0
"""Start, three studies scored (three of them full-size images) and sent, on a loaded 2-core box."""


@pytest.fixture(scope="module")
def htj2k_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Syntax name -> the 4 files of its study (L-CC 3328x2560, the others 384x288)."""
    folder = tmp_path_factory.mktemp("htj2k-studies")
    big, _ = synth_breast(np.random.default_rng(33), laterality="L", view="CC", size=MAMMOGRAM)
    studies: dict[str, list[Path]] = {}
    for number, name in enumerate(SYNTAXES, start=1):
        patient_id, study_uid = f"HTJ2K-{number}", derive_uid("tests", "e2e-htj2k", name)
        paths = []
        for instance, (laterality, view) in enumerate(FOUR_VIEWS, start=1):
            path = folder / name / f"{laterality}_{view}.dcm"
            if (laterality, view) == ("L", "CC"):
                ds = make_dicom(
                    big,
                    patient_id=patient_id,
                    study_uid=study_uid,
                    laterality=laterality,
                    view=view,
                    transfer_syntax=name,
                    sop_instance_uid=derive_uid(study_uid, "L-CC"),
                    instance_number=instance,
                )
                write_dicom(ds, path)
            else:
                write_mammogram(
                    path,
                    patient_id=patient_id,
                    study_uid=study_uid,
                    laterality=laterality,
                    view=view,
                    transfer_syntax=name,
                    instance_number=instance,
                )
            paths.append(path)
        studies[name] = paths
    return studies


@contextmanager
def serve(config: Path, port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``mammonode serve --config FILE`` until its DICOM port answers C-ECHO; killed on exit."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(MAMMONODE), "serve", "--config", str(config)],
            env=serve_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not echo(LOOPBACK, port, NODE_AE, MODALITY_AE).ok:
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.3)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def evidence(report: Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def check_results(results: list[Dataset], sent: list[Dataset]) -> None:
    """4 captures, one per sent image, and 2 reports citing every one: the whole study scored."""
    captures = [ds for ds in results if ds.SOPClassUID == SECONDARY_CAPTURE]
    reports = [ds for ds in results if ds.Modality == "SR"]
    cad = [ds for ds in reports if ds.SOPClassUID == MammographyCADSRStorage]
    sent_uids = {str(ds.SOPInstanceUID) for ds in sent}
    assert len(results) == RESULTS_PER_STUDY and len(captures) == 4 and len(reports) == 2 and len(cad) == 1
    assert {str(c.SourceImageSequence[0].ReferencedSOPInstanceUID) for c in captures} == sent_uids
    assert all(sent_uids <= evidence(report) for report in reports)
    assert cad[0].CompletionFlag == "COMPLETE"  # no view left out as not analysed
    assert {str(ds.PatientID) for ds in results} == {str(sent[0].PatientID)}


def test_htj2k_studies_go_from_modality_to_pacs(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    htj2k_studies: dict[str, list[Path]],
) -> None:
    port = free_port()
    pacs = orthanc({"mammonode": (NODE_AE, LOOPBACK, port)})
    config = toml_config(
        tmp_path / "node.toml",
        ae_title=NODE_AE,
        port=port,
        bind_address=LOOPBACK,
        data_dir=str(tmp_path / "node-data"),
        database_url=db_url,
        model_dir=str(test_model),
        allowed_aes=[MODALITY_AE],
        destinations=pacs.destination,
        grace_seconds=0.5,
        study_quiet_seconds=30.0,
        poll_seconds=0.2,
    )
    sent = {name: [header(p) for p in paths] for name, paths in htj2k_studies.items()}
    with serve(config, port, tmp_path / "serve.log") as process:
        for name, paths in htj2k_studies.items():  # one association per study, its syntax only
            assert {str(ds.file_meta.TransferSyntaxUID) for ds in sent[name]} == {SYNTAXES[name]}
            assert (sent[name][0].Rows, sent[name][0].Columns) == MAMMOGRAM  # the L-CC, full size
            assert scu_store(port, paths) == [DimseStatus.SUCCESS] * 4, name
        pacs.wait_for_instances(RESULTS_PER_STUDY * len(SYNTAXES), timeout=TIMEOUT)
        wait_until(
            lambda: _count_sent(sessions) == RESULTS_PER_STUDY * len(SYNTAXES),
            TIMEOUT,
            "not all results sent",
        )
        assert process.poll() is None, (tmp_path / "serve.log").read_text(errors="replace")

    in_pacs = [pacs.dataset(i) for i in pacs.instances()]
    assert len(in_pacs) == RESULTS_PER_STUDY * len(SYNTAXES)  # results only, each once
    for name, datasets in sent.items():
        study_uid = str(datasets[0].StudyInstanceUID)
        check_results([ds for ds in in_pacs if str(ds.StudyInstanceUID) == study_uid], datasets)
        with sessions() as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            assert study.state == "scored"
            syntaxes = set(
                session.scalars(select(Instance.transfer_syntax_uid).where(Instance.study_id == study.id))
            )
            assert syntaxes == {SYNTAXES[name]}  # stored as the modality sent them
            (job,) = session.scalars(select(Job).where(Job.study_id == study.id))
            assert job.state == "done"
            scored = set(
                session.scalars(
                    select(Score.sop_instance_uid).where(Score.job_id == job.id, Score.level == "image")
                )
            )
        assert scored == {str(ds.SOPInstanceUID) for ds in datasets}, name


def _count_sent(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return len(list(session.scalars(select(Transmission.id).where(Transmission.state == "sent"))))
