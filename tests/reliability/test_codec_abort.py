"""A codec that aborts inside a live `mammonode serve` fails one image, not the node.

The finding: a C++ codec abort in the node process killed receiving, scoring and sending
together. Design invariants 8 and 9: pixel work runs in child processes, a child that dies fails
only the image it held, the SCP keeps answering, the rest of the study is scored and delivered,
and the SR says PARTIAL and names the image not analysed.

The abort comes from outside the product: ``abort_hook/sitecustomize.py`` on the serve process'
PYTHONPATH makes the pixel pool's child call ``os.abort()`` on the one image marked in its
ImageComments (see that module). Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    ABORT_HOOK,
    MAMMONODE,
    NODE_AE,
    Delivered,
    ServeFactory,
    delivered,
    evidence_uids,
    node_settings,
    source_uids,
    sr_texts,
    store,
    wait_until,
)
from peers import LOOPBACK, OrthancFactory, free_port, write_study
from pydicom import dcmread

pytestmark = [pytest.mark.peers, pytest.mark.dcmtk, pytest.mark.slow]

MODALITY_AE = "MODALITY"
MARKER = "MAMMONODE-TEST-ABORT"  # what abort_hook/sitecustomize.py looks for
RESULT_TIMEOUT = 180.0
SETTLE_SECONDS = 3.0
"""After the expected results arrived: long enough for a stray re-score or resend to show."""


def _mark_for_abort(path: Path) -> str:
    """Set the marker on one file (pixel data untouched, still in its transfer syntax)."""
    ds = dcmread(path)
    ds.ImageComments = MARKER
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _uids(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def _wait_for_results(pacs: object, study_uid: str, captures: int) -> Delivered:
    """Wait until Orthanc holds ``captures`` CAM captures, the SR and the CAD SR of the study."""

    def arrived() -> bool:
        got = delivered(pacs)
        reports = len(got.reports_of(study_uid)) + len(got.cad_reports_of(study_uid))
        return len(got.captures_of(study_uid)) >= captures and reports >= 2

    wait_until(arrived, f"{captures} CAM captures + 2 SRs of study {study_uid}", RESULT_TIMEOUT, 0.5)
    time.sleep(SETTLE_SECONDS)
    return delivered(pacs)


def test_an_aborting_codec_child_fails_one_image_and_the_node_keeps_serving(
    db_url: str,
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    serve_node: ServeFactory,
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
    )
    node = serve_node(settings, echo_ae=MODALITY_AE, pythonpath=[ABORT_HOOK])

    study_1 = "1.2.826.0.1.3680043.10.1471.1"
    study_2 = "1.2.826.0.1.3680043.10.1471.2"
    files_1 = write_study(tmp_path / "s1", patient_id="ABORT-1", study_uid=study_1)
    files_2 = write_study(tmp_path / "s2", patient_id="ABORT-2", study_uid=study_2, seed=1)
    aborting = _mark_for_abort(files_1[2])  # R-CC
    others = [uid for uid in _uids(files_1) if uid != aborting]

    node.start()
    pid = node.pid
    first = store(files_1, port, aet=MODALITY_AE, syntax="-xv")
    assert sorted(first.acknowledged) == sorted(files_1), first.log  # receipt never decodes

    got = _wait_for_results(pacs, study_1, captures=3)
    assert node.running and node.pid == pid, f"the node died or restarted:\n{node.log_tail()}"
    log = node.logs()
    assert f"{MARKER}: pixel-work child" in log and f"aborting on {aborting}" in log, (
        "the hook never aborted a child: the test proves nothing\n" + node.log_tail()
    )

    # The study's other three images have their CAM SCs; the aborted one has none.
    captures = got.captures_of(study_1)
    assert sorted(uid for c in captures for uid in source_uids(c)) == sorted(others)
    (report,) = got.reports_of(study_1)
    assert report.CompletionFlag == "PARTIAL", report.get("CompletionFlagDescription")
    named = [text for text in sr_texts(report) if aborting in text]
    assert named, f"the SR does not name the failed image {aborting}: {sr_texts(report)}"
    assert any("not analysed" in text.lower() for text in named), named
    assert set(others) <= evidence_uids(report)
    (cad,) = got.cad_reports_of(study_1)
    assert cad.CompletionFlag == "PARTIAL" and any(aborting in text for text in sr_texts(cad))

    # The node kept receiving and scoring: C-ECHO, then a whole new study end to end.
    assert node.echo()
    second = store(files_2, port, aet=MODALITY_AE, syntax="-xv")
    assert sorted(second.acknowledged) == sorted(files_2), second.log
    got = _wait_for_results(pacs, study_2, captures=4)
    assert sorted(uid for c in got.captures_of(study_2) for uid in source_uids(c)) == sorted(_uids(files_2))
    (report_2,) = got.reports_of(study_2)
    assert report_2.CompletionFlag == "COMPLETE"
    assert node.running and node.pid == pid and node.runs == 1
    # Nothing more than these results reached the PACS (no duplicates, no stray re-score).
    assert (len(got.captures), len(got.reports), len(got.cad_reports), len(got.others)) == (3 + 4, 2, 2, 0)

    # The audit log, read through the operator's CLI, has the failed image.
    listing = subprocess.run(
        [str(MAMMONODE), "audit", "list", "--study", study_1, "--json", "--config", str(node.config)],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    events = [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]
    failed = [e for e in events if e["event"] == "image.failed"]
    assert [e["sop_instance_uid"] for e in failed] == [aborting], events
