"""The demo's score step over real DICOM: a node on loopback between a modality and a PACS.

:func:`score_over_network` plays all three parties on 127.0.0.1: it starts a MammoNode
(:class:`node.service.Node`, embedded SQLite in ``OUT/node``), a small results receiver standing
in for the PACS, and C-STOREs the synthetic studies to the node as a modality would. It waits
until every study's report and secondary captures have come back, then writes the CAM pictures
and ``summary.json`` (the shape :func:`node.tools.demo.describe_results` reads). The node's database
stays in ``OUT/node``, so ``mammonode studies`` and ``mammonode audit`` can be pointed at it.
Its progress lines go to the ``say`` callback the command gives (nothing here prints).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.pixels import pixel_array
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    MammographyCADSRStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from inference import MammoNodeError, algorithm_info, load_manifest
from node.config import AllowedPeer, Destination, NodeConfig
from node.dicom.loopback import LOOPBACK, free_port
from node.dicom.status import DimseStatus

log = logging.getLogger(__name__)

NODE_AE = "MAMMONODE"
MODALITY_AE = "DEMOMODALITY"
PACS_AE = "DEMOPACS"
WAIT_SECONDS = 600.0
"""Upper bound for the results of the demo's studies to come back (scoring on 2 CPU cores)."""


class DemoTimeout(MammoNodeError):
    """The node did not return the results in time."""


@dataclass
class ResultsReceiver:
    """A storage SCP that files every received SC and SR under ``out/sc`` and ``out/sr``."""

    out: Path
    port: int = field(default_factory=free_port)
    received: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=PACS_AE)
        ae.maximum_pdu_size = 0
        for sop_class in (
            SecondaryCaptureImageStorage,
            Comprehensive3DSRStorage,
            ComprehensiveSRStorage,
            MammographyCADSRStorage,
            GrayscaleSoftcopyPresentationStateStorage,
        ):
            ae.add_supported_context(sop_class, [RLELossless, ExplicitVRLittleEndian])
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        kind = "cad" if ds.SOPClassUID == MammographyCADSRStorage else "sr" if ds.Modality == "SR" else "sc"
        path = self.out / kind / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received[str(ds.StudyInstanceUID)].append(path)
        return int(DimseStatus.SUCCESS)

    def complete(self, expected: dict[str, int]) -> bool:
        """True when every study has its report, its CAD SR and one capture per sent image."""
        with self._lock:
            for study_uid, n_images in expected.items():
                paths = self.received.get(study_uid, [])
                if not {"sr", "cad"} <= {p.parent.name for p in paths}:
                    return False
                if sum(p.parent.name == "sc" for p in paths) < n_images:
                    return False
        return True


def _silent(line: str, err: bool) -> None:
    """The default ``say``: the progress lines are dropped."""


def _studies_in(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Study UID -> its patient and how many images the modality sends."""
    studies: dict[str, dict[str, Any]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        entry = studies.setdefault(str(ds.StudyInstanceUID), {"patient_id": str(ds.PatientID), "images": 0})
        entry["images"] += 1
    return studies


def _summary(
    receiver: ResultsReceiver,
    out: Path,
    model_dir: Path,
    studies: dict[str, dict[str, Any]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """PNGs of the received captures and ``summary.json``'s content (the offline demo's shape)."""
    from inference import save_png

    written: dict[str, list[str]] = {"png": [], "sc": [], "sr": [], "cad": []}
    for paths in receiver.received.values():
        for path in sorted(paths):
            written[path.parent.name].append(str(path))
            if path.parent.name == "sc":
                # The node's own RLE captures, decoded by pydicom's RLE decoder (never whatever comes first).
                png = save_png(pixel_array(path, decoding_plugin="pydicom"), out / "png" / f"{path.stem}.png")
                written["png"].append(str(png))
    by_uid = {row["study_uid"]: row for row in rows}
    manifest = load_manifest(model_dir)
    summary = {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "weights_sha256": manifest.weights_sha256,
            "notice": algorithm_info(manifest).notice,
        },
        "studies": [
            {
                "patient_id": s["patient_id"],
                "study_uid": uid,
                "exam_probability": by_uid[uid]["exam_probability"],
                "breasts": by_uid[uid]["breasts"],
                "recall_recommended": bool(by_uid[uid]["recall"]),
            }
            for uid, s in studies.items()
        ],
        "written": written,
    }
    return summary


def score_over_network(
    files: list[Path], out: Path, model_dir: Path, *, say: Callable[[str, bool], None] = _silent
) -> int:
    """Send ``files`` through a loopback node and collect its results in ``out``; exit status.

    ``say(line, err)`` receives the progress lines (node started, images sent, results back, the
    studies table) as they happen."""
    from node.admin.studies import format_studies, recent_studies
    from node.dicom.sender import store_files
    from node.service import Node

    studies = _studies_in(files)
    node_dir = out / "node"
    if node_dir.exists():  # the demo's own node from an earlier run: start from an empty one
        shutil.rmtree(node_dir)
    receiver = ResultsReceiver(out)
    receiver.start()
    config = NodeConfig(
        ae_title=NODE_AE,
        port=free_port(),
        bind_address=LOOPBACK,
        data_dir=node_dir,
        model_dir=model_dir,
        allowed_aes=(AllowedPeer(MODALITY_AE),),
        destinations=(Destination(PACS_AE, LOOPBACK, receiver.port),),
        grace_seconds=1.0,
        study_quiet_seconds=30.0,
        poll_seconds=0.2,
    )
    node = Node(config)
    try:
        node.start()
        say(f"node {NODE_AE} listening on 127.0.0.1:{config.port}; results go to {PACS_AE}", False)
        started = time.monotonic()
        outcomes = store_files(files, Destination(NODE_AE, LOOPBACK, config.port), MODALITY_AE)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise MammoNodeError(f"the node refused {len(failed)} image(s): {failed[0].detail}")
        say(f"sent {len(files)} images over DICOM (C-STORE) in {time.monotonic() - started:.1f} s", False)
        expected = {uid: s["images"] for uid, s in studies.items()}
        deadline = time.monotonic() + WAIT_SECONDS
        while not receiver.complete(expected):
            if time.monotonic() > deadline:
                raise DemoTimeout(f"no complete results after {WAIT_SECONDS:.0f} s; see mammonode studies")
            time.sleep(0.2)
        say(f"results back from the node after {time.monotonic() - started:.1f} s\n", False)
        rows = recent_studies(node.sessions, limit=len(studies))
        say(format_studies(rows), False)
    finally:
        node.stop()
        receiver.stop()

    summary = _summary(receiver, out, model_dir, studies, rows)
    summary["node_data"] = str(config.data_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0
