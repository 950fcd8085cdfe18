"""Real-shaped mammograms go through `mammonode serve` to the PACS.

The finding: real screening films (CBIS-DDSM: Secondary Capture class with Modality MG, RLE or
JPEG 2000, 16-bit, about 4400-4700 x 2600-2900 with odd widths, no ViewPosition, one image per
study) took the node down -- GDCM's RLE encoder aborted on the odd-sized CAM capture. Here every
file of the real-shaped corpus (``corpus.real_shaped_corpus``, the product's own generator) is
sent by dcmtk ``storescu`` in its own transfer syntax (``-xr`` RLE, ``-xv`` JPEG 2000 lossless) to
a `mammonode serve` subprocess, which must deliver to Orthanc one decodable CAM SC per image and
one SR per (single-view) study; the SR is PARTIAL and names the expected views that are missing.
Runs on SQLite and PostgreSQL; the corpus is built once for both.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from corpus import real_shaped_corpus
from harness import (
    NODE_AE,
    ServeFactory,
    delivered,
    evidence_uids,
    node_settings,
    source_uids,
    sr_texts,
    store,
    wait_until,
)
from peers import LOOPBACK, OrthancFactory, free_port
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, RLELossless
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.dicom_pixels import decode_pixels
from node.db.models import Instance

pytestmark = [pytest.mark.peers, pytest.mark.dcmtk, pytest.mark.slow]

MODALITY_AE = "MODALITY"
FLAGS = {str(RLELossless): "-xr", str(JPEG2000Lossless): "-xv"}
EXPECTED_VIEWS = ("L-CC", "L-MLO", "R-CC", "R-MLO")
RESULT_TIMEOUT = 600.0
"""Six full-size films decoded, scored, rendered and encoded on a shared 2-core box."""
SETTLE_SECONDS = 3.0


@dataclass(frozen=True)
class Film:
    path: Path
    sop_uid: str
    study_uid: str
    transfer_syntax: str
    rows: int
    columns: int


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> list[Film]:
    """The real-shaped corpus, built once for the module (both databases)."""
    paths = real_shaped_corpus(tmp_path_factory.mktemp("real-shaped-serve") / "corpus")
    out = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        out.append(
            Film(
                path,
                str(ds.SOPInstanceUID),
                str(ds.StudyInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
                int(ds.Rows),
                int(ds.Columns),
            )
        )
    # The premise: the shapes that once aborted the node, in both compressed syntaxes.
    assert {f.transfer_syntax for f in out} == set(FLAGS)
    assert all(f.rows >= 4000 and f.columns % 2 == 1 for f in out)
    assert len({f.study_uid for f in out}) == len(out)
    return out


def test_every_real_shaped_film_is_delivered_with_its_cam_and_a_partial_report(
    db_url: str,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    serve_node: ServeFactory,
    films: list[Film],
) -> None:
    port = free_port()
    pacs = orthanc({"mammonode": (NODE_AE, LOOPBACK, port)})
    settings = node_settings(
        data_dir=tmp_path / "data",
        db_url=db_url,
        model_dir=test_model,
        port=port,
        destinations=[pacs.destination],
        allowed_aes=[MODALITY_AE],
        study_quiet_seconds=3.0,  # single-view studies: ready after the quiet period; no kills here
        expected_views=list(EXPECTED_VIEWS),
    )
    node = serve_node(settings, echo_ae=MODALITY_AE)
    node.start()
    started = time.monotonic()
    by_syntax: dict[str, list[Film]] = defaultdict(list)
    for film in films:
        by_syntax[film.transfer_syntax].append(film)
    for syntax, group in by_syntax.items():
        sent = store([f.path for f in group], port, aet=MODALITY_AE, syntax=FLAGS[syntax])
        assert sorted(sent.acknowledged) == sorted(f.path for f in group), sent.log

    def all_arrived() -> bool:
        got = delivered(pacs)
        return len(got.captures) >= len(films) and len(got.reports) == len(got.cad_reports) == len(films)

    wait_until(all_arrived, f"{len(films)} CAM SCs, SRs and CAD SRs in Orthanc", RESULT_TIMEOUT, 1.0)
    seconds = time.monotonic() - started
    time.sleep(SETTLE_SECONDS)
    assert node.running and node.runs == 1, node.log_tail()
    print(f"\n[real-shaped serve] {len(films)} films delivered in {seconds:.0f} s")

    got = delivered(pacs)
    assert got.others == []
    assert len(got.captures) == len(got.reports) == len(got.cad_reports) == len(films)
    with sessions() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    for film in films:
        (capture,) = [c for c in got.captures if source_uids(c) == [film.sop_uid]]
        assert str(capture.StudyInstanceUID) == film.study_uid
        grey = decode_pixels(capture)  # the CAM capture is a valid, non-blank image
        assert grey.shape == (capture.Rows, capture.Columns) and float(np.ptp(grey)) > 0

        (report,) = got.reports_of(film.study_uid)
        assert evidence_uids(report) == {film.sop_uid}
        row = rows[film.sop_uid]
        present = f"{row.laterality}-{row.view}"
        missing = [view for view in EXPECTED_VIEWS if view != present]
        assert report.CompletionFlag == "PARTIAL", f"{film.path.name}: a one-view study is not COMPLETE"
        statements = [t for t in sr_texts(report) if "missing" in t.lower()]
        assert statements and all(view in statements[0] for view in missing), (
            f"{film.path.name} ({present}): no SR statement names the missing views {missing}: "
            f"{sr_texts(report)}"
        )
        (cad,) = got.cad_reports_of(film.study_uid)
        assert cad.CompletionFlag == "PARTIAL" and evidence_uids(cad) == {film.sop_uid}
        cad_text = " ".join(sr_texts(cad))
        assert all(view in cad_text for view in missing), f"CAD SR does not name {missing}: {cad_text}"
