"""Real-shaped mammograms never take `mammonode score` down.

The finding: on CBIS-DDSM files (Secondary Capture class with Modality MG, RLE 16-bit, about
4400-4700 x 2600-2900 with odd sizes, no ViewPosition, one patient and study per image) the CLI
died with exit 134, GDCM's RLE encoder aborting on the odd-sized CAM capture. Here the installed
console script scores a corpus of exactly that shape (made by the product's own generator) in a
subprocess, so an abort shows as an exit status instead of killing pytest, and every output file
is read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from corpus import NOMINAL_SIZE, real_shaped_corpus
from pydicom.uid import JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

from inference.dicom_header import read_dataset, read_meta
from inference.dicom_pixels import decode_pixels

pytestmark = pytest.mark.slow

MAMMONODE = Path(sys.executable).with_name("mammonode")
SCORE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Input:
    path: Path
    sop_uid: str
    sop_class: str
    study_uid: str
    patient_id: str
    laterality: str
    view: str
    rows: int
    columns: int


@dataclass(frozen=True)
class ScoreRun:
    inputs: dict[str, Input]  # by SOP Instance UID
    out: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Input]:
    """The real-shaped corpus, built once for the module, described from its headers."""
    paths = real_shaped_corpus(tmp_path_factory.mktemp("real-shaped") / "corpus")
    inputs: dict[str, Input] = {}
    for path in paths:
        ds = read_dataset(path, stop_before_pixels=True)
        meta = read_meta(ds)
        inputs[meta.sop_instance_uid] = Input(
            path=path,
            sop_uid=meta.sop_instance_uid,
            sop_class=meta.sop_class_uid,
            study_uid=meta.study_instance_uid,
            patient_id=meta.patient_id,
            laterality=meta.laterality,
            view=meta.view,
            rows=meta.rows,
            columns=meta.columns,
        )
    return inputs


@pytest.fixture(scope="module")
def scored(corpus: dict[str, Input], test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ScoreRun:
    """`mammonode score <corpus folder> --out <dir> --json`, run once as the installed script."""
    # <corpus>/train_images/<patient>/<image>.dcm: the images only, not the csv files and masks.
    folder = next(iter(corpus.values())).path.parents[1]
    out = tmp_path_factory.mktemp("real-shaped-out")
    start = time.monotonic()
    proc = subprocess.run(
        [str(MAMMONODE), "score", str(folder), "--out", str(out), "--model", str(test_model), "--json"],
        capture_output=True,
        text=True,
        timeout=SCORE_TIMEOUT_S,
        check=False,
    )
    return ScoreRun(corpus, out, proc, time.monotonic() - start)


def _summary(run: ScoreRun) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run.proc.stdout)
    return data


def test_corpus_has_the_shape_of_real_screening_films(corpus: dict[str, Input]) -> None:
    """The premise of the other tests: the inputs look like CBIS-DDSM, not like our digital phantoms."""
    assert len(corpus) == 6
    sizes = {(i.rows, i.columns) for i in corpus.values()}
    assert NOMINAL_SIZE in sizes
    syntaxes: set[str] = set()
    for item in corpus.values():
        assert item.sop_class == str(SecondaryCaptureImageStorage)
        assert item.rows >= 4000 and item.columns % 2 == 1
        ds = pydicom.dcmread(item.path, stop_before_pixels=True)
        assert ds.Modality == "MG" and "ViewPosition" not in ds and ds.BitsStored == 16
        assert item.laterality in ("L", "R") and item.view in ("CC", "MLO")
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
    assert syntaxes == {RLELossless, JPEG2000Lossless}
    assert len({i.study_uid for i in corpus.values()}) == len({i.patient_id for i in corpus.values()}) == 6


def test_score_exits_zero(scored: ScoreRun) -> None:
    assert scored.proc.returncode == 0, (
        f"mammonode score exited {scored.proc.returncode} after {scored.seconds:.0f} s\n"
        f"stderr tail:\n{scored.proc.stderr[-3000:]}"
    )


def test_json_names_every_image_once(scored: ScoreRun) -> None:
    assert scored.proc.returncode == 0, scored.proc.stderr[-2000:]
    summary = _summary(scored)
    assert summary["skipped"] == []
    images = [image for study in summary["studies"] for image in study["images"]]
    assert sorted(image["sop_instance_uid"] for image in images) == sorted(scored.inputs)
    for image in images:
        source = scored.inputs[image["sop_instance_uid"]]
        assert (image["laterality"], image["view"]) == (source.laterality, source.view)
        assert 0.0 <= image["probability"] <= 1.0
        assert image["cam_sc_sop_instance_uid"], f"no CAM capture for {image['sop_instance_uid']}"


def test_one_decodable_cam_capture_per_input_referencing_it(scored: ScoreRun) -> None:
    assert scored.proc.returncode == 0, scored.proc.stderr[-2000:]
    files = sorted((scored.out / "sc").glob("*.dcm"))
    assert len(files) == len(scored.inputs)
    referenced: list[str] = []
    for path in files:
        sc = read_dataset(path)
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.file_meta.TransferSyntaxUID == RLELossless
        source = scored.inputs[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        referenced.append(source.sop_uid)
        assert sc.StudyInstanceUID == source.study_uid and sc.PatientID == source.patient_id
        assert sc.SOPInstanceUID not in scored.inputs
        grey = decode_pixels(sc)
        assert grey.shape == (sc.Rows, sc.Columns) and float(np.ptp(grey)) > 0
        # The source's grid shrunk by a whole factor (no strips), hung by modality, side and view.
        factor = -(-max(source.rows, source.columns) // 2048)
        assert (sc.Rows, sc.Columns) == (source.rows // factor, source.columns // factor)
        assert sc.Modality == "MG" and sc.ImageLaterality == source.laterality
        if source.view in ("CC", "MLO"):
            assert sc.ViewCodeSequence[0].CodeValue == {"CC": "399162004", "MLO": "399368009"}[source.view]
    assert sorted(referenced) == sorted(scored.inputs)


def test_one_structured_report_per_study(scored: ScoreRun) -> None:
    assert scored.proc.returncode == 0, scored.proc.stderr[-2000:]
    files = sorted((scored.out / "sr").glob("*.dcm"))
    studies = sorted({i.study_uid for i in scored.inputs.values()})
    assert len(files) == len(studies)
    assert sorted(str(pydicom.dcmread(p).StudyInstanceUID) for p in files) == studies
    summary = _summary(scored)
    assert sorted(study["study_instance_uid"] for study in summary["studies"]) == studies
