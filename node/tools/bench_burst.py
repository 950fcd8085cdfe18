"""Burst: a run of screening studies through `mammonode serve` to an Orthanc PACS, end to end.

The node runs as deployed: a `mammonode serve` process (all roles) with a fresh data folder and
SQLite database, the bench's model, and an Orthanc on loopback as its destination. The bench
plays the modality: it sends ``studies`` copies of a 4-view study (each a new patient and study),
one association per study, back to back, and notes when each study's last image was acknowledged.
Meanwhile it polls Orthanc's ``/changes`` every 0.1 s and notes when each result arrived; which
results belong to which study (the CAM secondary captures and the SR) it reads from the node's
database. It reports:

- studies per hour: the studies over the time from the first image sent to the last result stored;
- latency per study, from its last image acknowledged to its last result stored at the PACS (p50,
  p95): this includes the node's assembly grace period and its polling, as a user sees them;
- resident memory of the node process and its pixel-pool children, summed, sampled every 0.1 s:
  idle before the burst, the peak during it, and idle again after it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from node.config import NodeConfig
from node.db.models import Job, OutputObject, Study
from node.db.session import make_engine, session_factory
from node.db.states import JobState
from node.dicom.loopback import LOOPBACK
from node.dicom.sender import store_files
from node.peer_settings import Destination
from node.tools.bench_ingest import format_ingest, format_ingest_ratios
from node.tools.bench_peers import (
    OrthancPACS,
    PeerError,
    ServeProcess,
    StudyCopy,
    copy_studies,
    orthanc_binary,
)

POLL_SECONDS = 0.1
"""How often Orthanc's changes and the node's memory are read: the precision of the figures."""
CALLING_AE = "BENCHMOD"
SETTLE_SECONDS = 5.0
"""After the last result, the node is left this long before its idle memory is read."""
MIB = 1024 * 1024
DEFAULTS = NodeConfig()
NODE_FIGURES = ("batch_size", "grace_seconds", "poll_seconds", "study_quiet_seconds")
"""The node settings that shape the figures, reported with them."""


@dataclass(frozen=True)
class BurstSettings:
    studies: int = 20
    timeout_seconds: float | None = None
    """Give up when the results are not all at the PACS by then (default 120 s + 60 s per study)."""
    node_settings: dict[str, Any] = field(default_factory=dict)
    """More `mammonode serve` settings (TOML keys), e.g. ``{"batch_size": 4}``."""

    @property
    def timeout(self) -> float:
        return self.timeout_seconds if self.timeout_seconds is not None else 120.0 + 60.0 * self.studies


def unavailable_reason() -> str | None:
    """Why the burst cannot run here (one line), or None."""
    if orthanc_binary() is None:
        return "Orthanc not found (/usr/sbin/Orthanc or on PATH; apt install orthanc)"
    return None


def run_burst(study: Sequence[Path], model_dir: Path, work: Path, settings: BurstSettings) -> dict[str, Any]:
    """The burst section of the bench report (see the module docstring); ``{"unavailable": why}``
    without Orthanc, ``{"failed": why}`` when a peer fails or the results do not all arrive."""
    reason = unavailable_reason()
    if reason is not None:
        return {"unavailable": reason}
    try:
        return _run(study, model_dir, work, settings)
    except (PeerError, OSError) as exc:
        return {"failed": str(exc)[:300]}


def _run(study: Sequence[Path], model_dir: Path, work: Path, settings: BurstSettings) -> dict[str, Any]:
    binary = orthanc_binary()
    assert binary is not None
    copies = copy_studies(study, work / "files", settings.studies, "burst")
    node_settings = {"model_dir": str(model_dir), **settings.node_settings}
    node = ServeProcess(work / "node", node_settings)
    pacs = OrthancPACS(work / "orthanc", {"mammonode": (node.ae_title, LOOPBACK, node.port)})
    node.settings["destinations"] = pacs.destination
    pacs.start(binary)
    try:
        with node:
            return _measure(node, pacs, copies, settings)
    finally:
        pacs.stop()


@dataclass
class _Watch:
    """What the two background threads see: result arrivals and memory samples."""

    arrivals: dict[str, float] = field(default_factory=dict)
    """Orthanc instance ID -> when it was first seen in ``/changes`` (monotonic seconds)."""
    rss: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


def _measure(
    node: ServeProcess, pacs: OrthancPACS, copies: list[StudyCopy], settings: BurstSettings
) -> dict[str, Any]:
    watch = _Watch()
    threads = [
        threading.Thread(target=_poll_changes, args=(pacs, watch), daemon=True),
        threading.Thread(target=_sample_rss, args=(node, watch), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)  # a few idle samples
        idle_before = _rss_since(watch, 0.0)
        target = Destination(node.ae_title, LOOPBACK, node.port)
        started = time.monotonic()
        sent: dict[str, float] = {}
        for copy in copies:
            outcomes = store_files(copy.files, target, CALLING_AE)
            sent[copy.study_uid] = time.monotonic()
            failed = [o.detail for o in outcomes if not o.ok]
            if failed:
                raise PeerError(f"the node refused an image of a burst study: {failed[0]}")
        arrived = _wait_for_results(node, pacs, watch, sent, started + settings.timeout)
        finished = max(arrived.values())
        peak = max((rss for at, rss in watch.rss if started <= at <= finished), default=0)
        time.sleep(SETTLE_SECONDS)
        idle_after = _rss_since(watch, time.monotonic() - 1.0)
    finally:
        watch.stop.set()
        for thread in threads:
            thread.join(5.0)
    latencies = [arrived[uid] - sent[uid] for uid in sent]
    p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95]))
    return {
        "studies": len(copies),
        "images_per_study": len(copies[0].files),
        "image_size": _image_size(copies[0].files[0]),
        "seconds": finished - started,
        "studies_per_hour": len(copies) * 3600.0 / (finished - started),
        "results_per_study": _results_per_study(node),
        "latency_seconds": {
            "p50": p50,
            "p95": p95,
            "max": max(latencies),
            "mean": statistics.fmean(latencies),
        },
        "latencies": [round(v, 3) for v in latencies],
        "rss_megabytes": {
            "idle_before": idle_before / MIB,
            "peak": peak / MIB,
            "idle_after": idle_after / MIB,
        },
        "node": {name: node.settings.get(name, getattr(DEFAULTS, name)) for name in NODE_FIGURES},
        "poll_seconds": POLL_SECONDS,
    }


def _rss_since(watch: _Watch, since: float) -> int:
    """The smallest memory sample since ``since`` (an idle figure); 0 before any sample."""
    return min((rss for at, rss in list(watch.rss) if at >= since), default=0)


def _poll_changes(pacs: OrthancPACS, watch: _Watch) -> None:
    """Note when each new instance appears in Orthanc's change log."""
    since = 0
    while not watch.stop.is_set():
        try:
            page = pacs.get_json(f"/changes?since={since}&limit=1000")
        except PeerError as exc:
            watch.error = str(exc)
            return
        now = time.monotonic()
        for change in page.get("Changes", []):
            if change.get("ChangeType") == "NewInstance":
                watch.arrivals.setdefault(str(change["ID"]), now)
        since = int(page.get("Last", since))
        if page.get("Done", True):
            watch.stop.wait(POLL_SECONDS)


def _sample_rss(node: ServeProcess, watch: _Watch) -> None:
    while not watch.stop.is_set():
        watch.rss.append((time.monotonic(), node.rss_bytes()))
        watch.stop.wait(POLL_SECONDS)


def _wait_for_results(
    node: ServeProcess, pacs: OrthancPACS, watch: _Watch, sent: dict[str, float], deadline: float
) -> dict[str, float]:
    """When the last result of each study arrived at the PACS (monotonic seconds, by Study UID),
    once the node has scored every study and Orthanc holds every result it wrote."""
    uids: dict[str, str] = {}  # Orthanc ID -> SOP Instance UID
    engine = make_engine(node.database_url)
    try:
        sessions = session_factory(engine)
        while True:
            if watch.error:
                raise PeerError(watch.error)
            if node.process is None or node.process.poll() is not None:
                raise PeerError("mammonode serve stopped during the burst")
            for orthanc_id in list(watch.arrivals):
                if orthanc_id not in uids:
                    tags = pacs.get_json(f"/instances/{orthanc_id}")["MainDicomTags"]
                    uids[orthanc_id] = str(tags.get("SOPInstanceUID", ""))
            expected = _expected_results(sessions, sent)
            at = {uids[i]: watch.arrivals[i] for i in uids}
            if expected is not None and all(uid in at for outputs in expected.values() for uid in outputs):
                return {study: max(at[uid] for uid in outputs) for study, outputs in expected.items()}
            if time.monotonic() > deadline:
                done = 0 if expected is None else len(expected)
                raise PeerError(f"results of {done} of {len(sent)} studies were in when the burst timed out")
            time.sleep(0.5)
    finally:
        engine.dispose()


def _expected_results(sessions: Any, sent: dict[str, float]) -> dict[str, set[str]] | None:
    """Each sent study's result SOP Instance UIDs once all its jobs are done; None while any study
    is still being received, scored or written. A failed job is a PeerError."""
    with sessions() as session:
        rows = session.execute(
            select(Study.study_uid, Job.id, Job.state, Job.error).join(Job, Job.study_id == Study.id)
        ).all()
        outputs = session.execute(
            select(Study.study_uid, OutputObject.sop_instance_uid)
            .join(Job, Job.study_id == Study.id)
            .join(OutputObject, OutputObject.job_id == Job.id)
        ).all()
    states: dict[str, list[str]] = {}
    for study_uid, _job, state, error in rows:
        if state == JobState.FAILED:
            raise PeerError(f"the node failed to score burst study {study_uid}: {(error or '')[:200]}")
        states.setdefault(study_uid, []).append(state)
    if set(states) != set(sent) or any(s != JobState.DONE for ss in states.values() for s in ss):
        return None
    expected: dict[str, set[str]] = {uid: set() for uid in sent}
    for study_uid, sop_uid in outputs:
        expected[study_uid].add(sop_uid)
    return expected


def _results_per_study(node: ServeProcess) -> float:
    engine = make_engine(node.database_url)
    try:
        with session_factory(engine)() as session:
            count = len(session.scalars(select(OutputObject.id)).all())
            studies = len(session.scalars(select(Study.id)).all())
    finally:
        engine.dispose()
    return count / studies if studies else 0.0


def _image_size(path: Path) -> list[int]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return [int(ds.Rows), int(ds.Columns)]


def format_burst(burst: dict[str, Any]) -> list[str]:
    """The burst section of the plain-text report."""
    if "studies_per_hour" not in burst:
        why = burst.get("unavailable") or burst.get("failed")
        return [f"burst: {'unavailable' if 'unavailable' in burst else 'failed'}: {why}"]
    lat, rss, node = burst["latency_seconds"], burst["rss_megabytes"], burst["node"]
    rows, cols = burst["image_size"]
    return [
        f"burst: {burst['studies']} studies of {burst['images_per_study']} images {rows}x{cols} through "
        f"mammonode serve to Orthanc ({burst['results_per_study']:.0f} results per study), "
        f"{burst['seconds']:.1f} s",
        f"  studies per hour: {burst['studies_per_hour']:.0f}",
        f"  latency, last image sent to last result at the PACS: p50 {lat['p50']:.1f} s, "
        f"p95 {lat['p95']:.1f} s, max {lat['max']:.1f} s (node grace {node['grace_seconds']:g} s, "
        f"poll {node['poll_seconds']:g} s)",
        f"  RSS, node + pixel-pool children: idle {rss['idle_before']:.0f} MiB, peak {rss['peak']:.0f} MiB, "
        f"idle after {rss['idle_after']:.0f} MiB",
    ]


def network_lines(report: dict[str, Any]) -> list[str]:
    """The ingest and burst sections of a bench report's text, where the report has them."""
    lines = ["", *format_ingest(report["ingest"])] if "ingest" in report else []
    return lines + (["", *format_burst(report["burst"])] if "burst" in report else [])


def network_ratio_lines(report: dict[str, Any]) -> list[str]:
    """The ingest lines of the report's ratio block, where the report has an ingest section."""
    return format_ingest_ratios(report["ingest"]) if "ingest" in report else []
