"""Ingest: how fast the node durably receives C-STOREs, against dcmtk's ``storescp`` in the same run.

The same files (copies of the bench's 4-view study, each a new study) are sent by dcmtk's
``storescu`` in one association, as a modality does, to three receivers in turn:

- ``storescp +B +xa -pdu 131072``: dcmtk's receiver, writing each dataset as received (``+B``)
  with 128 KiB PDUs, the largest storescp takes; it does not fsync;
- the node at the same 128 KiB maximum PDU (tuned the same way: both ends, and storescu, use
  128 KiB PDUs). Its default ``max_pdu`` (1 MiB) would change nothing on the wire: storescu
  (dcmtk 3.6.7) sends P-DATA PDUs of at most 128 KiB whatever the receiver offers.

The node is a `mammonode serve --role receiver` process with a fresh data folder and SQLite
database, answering Success only once each file is fsync'd and its row committed (invariant 1).
Each receiver is started fresh for each round, the order of the receivers turns from round to
round, and the page cache is written out (``sync``) before each timed send, so no receiver pays
for another's writes. A round's figure is storescu's wall time from start to exit; the report
keeps every round, the median and the best, and the ratio of the medians (and of the bests)
against storescp: above 1 the node is faster.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread, uid
from sqlalchemy import func, select

from node.db.models import Instance
from node.db.session import make_engine, session_factory
from node.dicom.loopback import LOOPBACK, free_port
from node.tools.bench_peers import (
    PeerError,
    ServeProcess,
    all_files,
    copy_studies,
    dcmtk_tool,
    missing_dcmtk,
    stop_process,
    wait_for_port,
)

TUNED_PDU = 131_072
"""128 KiB: storescp's largest ``-pdu``; both ends use it for the headline ratio."""
TARGET_MIN = 1.0
"""Issue 12: the node at least as fast as the tuned storescp (reported, not enforced)."""
STORESCU_FLAGS: dict[str, str] = {
    uid.ExplicitVRLittleEndian: "-xe",
    uid.JPEGLosslessSV1: "-xs",
    uid.JPEGLSLossless: "-xt",
    uid.JPEG2000Lossless: "-xv",
    uid.JPEG2000: "-xw",
    uid.RLELossless: "-xr",
}
"""The storescu flag proposing each transfer syntax (storescu needs the one matching the files)."""
SEND_TIMEOUT = 600.0
AE_TITLE = "MAMMONODE"
CALLING_AE = "BENCHSCU"


@dataclass(frozen=True)
class IngestSettings:
    rounds: int = 5
    copies: int = 4
    """The study is sent this many times per round, each copy a new study (4 x 4 views = 16 files)."""
    node_pdus: tuple[int, ...] = (TUNED_PDU,)
    """The node's ``max_pdu`` settings to time (each a receiver of its own)."""


@dataclass(frozen=True)
class _Receiver:
    name: str
    max_pdu: int
    node: bool


def unavailable_reason(files: Sequence[Path]) -> str | None:
    """Why the ingest bench cannot run on ``files`` here (one line), or None."""
    missing = missing_dcmtk("storescp", "storescu")
    if missing:
        return missing
    syntaxes = {str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) for path in files}
    if len(syntaxes) != 1 or next(iter(syntaxes)) not in STORESCU_FLAGS:
        names = ", ".join(sorted(uid.UID(s).name for s in syntaxes))
        return f"storescu cannot send these files in one association (transfer syntaxes: {names})"
    return None


def run_ingest(files: Sequence[Path], work: Path, settings: IngestSettings) -> dict[str, Any]:
    """The ingest section of the bench report (see the module docstring); ``{"unavailable": why}``
    when dcmtk is missing or storescu cannot send the files."""
    reason = unavailable_reason(files)
    if reason is not None:
        return {"unavailable": reason}
    try:
        return _run(files, work, settings)
    except (PeerError, OSError, subprocess.TimeoutExpired) as exc:
        return {"failed": str(exc)[:300]}


def _run(files: Sequence[Path], work: Path, settings: IngestSettings) -> dict[str, Any]:
    sent = all_files(copy_studies(files, work / "files", settings.copies, "ingest"))
    syntax = str(dcmread(sent[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    receivers = [_Receiver("storescp", TUNED_PDU, node=False)]
    for pdu in settings.node_pdus:
        name = "node" if pdu == TUNED_PDU else f"node_pdu_{pdu}"
        receivers.append(_Receiver(name, pdu, node=True))
    seconds: dict[str, list[float]] = {r.name: [] for r in receivers}
    for number in range(settings.rounds):
        turn = number % len(receivers)
        for receiver in receivers[turn:] + receivers[:turn]:
            folder = work / f"round{number}-{receiver.name}"
            seconds[receiver.name].append(_one_run(receiver, sent, syntax, folder))
            shutil.rmtree(folder, ignore_errors=True)
    megabytes = sum(path.stat().st_size for path in sent) / 1e6
    out: dict[str, Any] = {
        "files": len(sent),
        "megabytes": round(megabytes, 3),
        "transfer_syntax_uid": syntax,
        "rounds": settings.rounds,
        "sender": f"storescu -pdu {TUNED_PDU} {STORESCU_FLAGS[syntax]}, one association",
        "receivers": {},
    }
    for receiver in receivers:
        times = seconds[receiver.name]
        median = statistics.median(times)
        out["receivers"][receiver.name] = {
            "command": _describe(receiver),
            "max_pdu": receiver.max_pdu,
            "durable": receiver.node,
            "seconds": times,
            "median_seconds": median,
            "best_seconds": min(times),
            "megabytes_per_second": megabytes / median,
            "instances_per_second": len(sent) / median,
        }
    return out


def _describe(receiver: _Receiver) -> str:
    if receiver.node:
        return f"node (serve), max PDU {receiver.max_pdu}"
    return f"storescp +B +xa -pdu {receiver.max_pdu}"


def _one_run(receiver: _Receiver, files: Sequence[Path], syntax: str, folder: Path) -> float:
    """Start the receiver fresh in ``folder``, send ``files``, check all arrived; storescu's seconds."""
    folder.mkdir(parents=True)
    if receiver.node:
        node = ServeProcess(folder, {"max_pdu": receiver.max_pdu, "ae_title": AE_TITLE}, role="receiver")
        with node:
            seconds = _send(files, node.port, syntax)
        stored = _node_instances(node.database_url)
    else:
        out = folder / "received"
        out.mkdir()
        port = free_port()
        storescp = dcmtk_tool("storescp")
        assert storescp is not None  # checked by unavailable_reason
        command = [str(storescp), "-aet", AE_TITLE, "+B", "+xa", "-pdu", str(receiver.max_pdu)]
        log_path = folder / "storescp.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [*command, "-od", str(out), str(port)], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(port, process, "storescp", log_path)
            seconds = _send(files, port, syntax)
        finally:
            stop_process(process)
        stored = sum(1 for path in out.iterdir() if path.is_file())
    if stored != len(files):
        raise PeerError(f"{receiver.name} stored {stored} of {len(files)} files")
    return seconds


def _send(files: Sequence[Path], port: int, syntax: str) -> float:
    """storescu's wall time for ``files`` in one association, after writing out the page cache."""
    storescu = dcmtk_tool("storescu")
    assert storescu is not None  # checked by unavailable_reason
    command = [str(storescu), "-aet", CALLING_AE, "-aec", AE_TITLE, "-pdu", str(TUNED_PDU)]
    command += [STORESCU_FLAGS[syntax], LOOPBACK, str(port), *map(str, files)]
    os.sync()  # the previous run's dirty pages are written now, not during this one
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=SEND_TIMEOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise PeerError(f"storescu failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return seconds


def _node_instances(url: str) -> int:
    """Instance rows committed by the (stopped) node."""
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def add_ingest(report: dict[str, Any], ingest: dict[str, Any]) -> None:
    """Put the ingest section, its ratios and its target into a bench report."""
    report["ingest"] = ingest
    ratios = ingest_ratios(ingest)
    report.setdefault("ratios", {}).update(ratios)
    tuned = ratios.get("ingest_node_vs_storescp")
    targets = report.setdefault("targets", {})
    targets["ingest_vs_storescp_min"] = TARGET_MIN
    targets.setdefault("met", {})["ingest_vs_storescp"] = None if tuned is None else tuned >= TARGET_MIN


def ingest_ratios(ingest: dict[str, Any]) -> dict[str, Any]:
    """Each node figure against storescp: its median and its best time, as speed ratios (> 1: the
    node is faster)."""
    if "receivers" not in ingest:
        return {}
    receivers = ingest["receivers"]
    ref = receivers["storescp"]
    out: dict[str, Any] = {}
    for name, figures in receivers.items():
        if name == "storescp":
            continue
        out[f"ingest_{name}_vs_storescp"] = ref["median_seconds"] / figures["median_seconds"]
        out[f"ingest_{name}_vs_storescp_best"] = ref["best_seconds"] / figures["best_seconds"]
    return out


def format_ingest(ingest: dict[str, Any]) -> list[str]:
    """The ingest section of the plain-text report."""
    if "receivers" not in ingest:
        return [f"ingest: {_why(ingest)}"]
    lines = [
        f"ingest: {ingest['files']} files, {ingest['megabytes']:.1f} MB, "
        f"{uid.UID(ingest['transfer_syntax_uid']).name}, sent by {ingest['sender']}; "
        f"{ingest['rounds']} interleaved round(s), fresh receiver each",
        f"  {'receiver':<48} {'median s':>9} {'best s':>8} {'MB/s':>7} {'inst/s':>7}",
    ]
    for figures in ingest["receivers"].values():
        durable = " (fsync + commit)" if figures["durable"] else " (no fsync)"
        lines.append(
            f"  {figures['command'] + durable:<48} {figures['median_seconds']:>9.3f} "
            f"{figures['best_seconds']:>8.3f} {figures['megabytes_per_second']:>7.1f} "
            f"{figures['instances_per_second']:>7.1f}"
        )
    return lines


def _why(section: dict[str, Any]) -> str:
    if "unavailable" in section:
        return f"unavailable: {section['unavailable']}"
    return f"failed: {section.get('failed', 'no figures')}"


def format_ingest_ratios(ingest: dict[str, Any]) -> list[str]:
    """The ingest lines of the report's ratio block, with the issue's target on the tuned one."""
    if "receivers" not in ingest:
        return ["  ingest vs storescp: not measured"]
    lines = []
    ratios = ingest_ratios(ingest)
    for name, figures in ingest["receivers"].items():
        if name == "storescp":
            continue
        median, best = ratios[f"ingest_{name}_vs_storescp"], ratios[f"ingest_{name}_vs_storescp_best"]
        verdict = ""
        if figures["max_pdu"] == TUNED_PDU:
            verdict = f"  [target >= {TARGET_MIN}x: {'met' if median >= TARGET_MIN else 'NOT met'}]"
        lines.append(
            f"  ingest, node at max PDU {figures['max_pdu']} vs storescp at {TUNED_PDU}: "
            f"{median:.2f}x (best vs best {best:.2f}x){verdict}"
        )
    return lines
