"""The reliability tests' harness: `mammonode serve` as a process a test may kill -9 and restart,
a modality that resends what was not acknowledged, and the node's memory read from /proc.

Why a subprocess: the findings these tests pin are about a real process -- a C++ codec abort,
a SIGKILL in the middle of a C-STORE, a job or a send, the memory a node keeps after a burst --
none of which an in-process ``Node`` can show. Why dcmtk as the modality: a real modality learns
what was stored only from the C-STORE responses it received, and sends the rest again once the
node answers; :class:`Modality` does exactly that, from ``storescu -v``'s own account.

Everything here is bounded: every wait has a deadline and names what it waited for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import LOOPBACK, dcmtk_tool, echoscu

MAMMONODE = Path(sys.executable).with_name("mammonode")
STORESCU = "/usr/bin/storescu"
"""dcmtk's storescu by absolute path: pynetdicom installs a Python ``storescu`` into the venv."""
NODE_AE = "MAMMONODE"
START_TIMEOUT = 120.0
"""Model load, schema check and pixel-pool spawn on a loaded 2-core box, with room to spare."""


def wait_until(condition: Callable[[], bool], what: str, timeout: float, interval: float = 0.2) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took. TimeoutError names ``what``."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (not within {timeout:.0f} s)")
        time.sleep(interval)
    return time.monotonic() - started


def storescu_path() -> str:
    """dcmtk's storescu: /usr/bin/storescu, else the dcmtk one found on PATH."""
    return STORESCU if os.access(STORESCU, os.X_OK) else dcmtk_tool("storescu")


# -- configuration -----------------------------------------------------------------------------


def node_settings(
    *,
    data_dir: Path,
    db_url: str,
    model_dir: Path,
    port: int,
    destinations: Sequence[str],
    allowed_aes: Sequence[str],
    **overrides: Any,
) -> dict[str, Any]:
    """Settings under their TOML names (node/config.py), fast retries by default."""
    values: dict[str, Any] = {
        "ae_title": NODE_AE,
        "port": port,
        "bind_address": LOOPBACK,
        "data_dir": str(data_dir),
        "database_url": db_url,
        "model_dir": str(model_dir),
        "allowed_aes": list(allowed_aes),
        "destinations": list(destinations),
        "grace_seconds": 0.5,
        "study_quiet_seconds": 30.0,
        "poll_seconds": 0.2,
        "retry_initial_seconds": 1.0,
        "retry_max_seconds": 2.0,
    }
    values.update(overrides)
    return values


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    """A `mammonode serve --config` TOML file; destinations (``AE@HOST:PORT``) as tables."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items() if key != "destinations"]
    for text in settings.get("destinations", []):
        ae, _, rest = str(text).partition("@")
        host, _, port = rest.rpartition(":")
        lines += ["[[destinations]]", f"ae_title = {json.dumps(ae)}", f"host = {json.dumps(host)}"]
        lines.append(f"port = {int(port)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- /proc -------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list), empty when it is gone."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        if Path(f"/proc/{current}").exists():
            tree.append(current)
            todo += children_of(current)
    return tree


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of one process from /proc/PID/status; empty when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def pss_kib(pid: int) -> int:
    """Proportional set size (kB) of one process: shared pages split among their users, so the
    sum over a tree is not inflated by the libraries every pool child maps too."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


@dataclass
class MemoryStats:
    """What :class:`MemorySampler` saw of the serve process tree, in MB."""

    peak_tree_rss_mb: float = 0.0
    """Largest sum of VmRSS over the tree at one sample."""
    peak_tree_hwm_mb: float = 0.0
    """Largest, over the serve runs, of the sum of each tree member's own VmHWM (its peak): an
    upper bound of the run's peak, since the members need not peak at the same moment."""
    peak_serve_hwm_mb: float = 0.0
    """VmHWM of the serve process itself (largest over the runs)."""
    peak_child_hwm_mb: float = 0.0
    """Largest VmHWM of any one child (a pixel-work process)."""
    samples: int = 0


class MemorySampler:
    """Samples the serve process tree's memory every ``interval`` s in a thread, across restarts
    (``pid_source`` returns the current serve pid, or None while it is down)."""

    def __init__(self, pid_source: Callable[[], int | None], interval: float = 0.5) -> None:
        self._pid_source = pid_source
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._hwm: dict[int, dict[int, int]] = {}  # serve pid -> member pid -> VmHWM kB
        self.stats = MemoryStats()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample(self) -> None:
        pid = self._pid_source()
        if pid is None:
            return
        run = self._hwm.setdefault(pid, {})
        total = 0
        for member in process_tree(pid):
            values = status_kib(member)
            total += values.get("VmRSS", 0)
            run[member] = max(run.get(member, 0), values.get("VmHWM", 0))
        stats = self.stats
        stats.samples += 1
        stats.peak_tree_rss_mb = max(stats.peak_tree_rss_mb, total / 1024)
        stats.peak_tree_hwm_mb = max(stats.peak_tree_hwm_mb, sum(run.values()) / 1024)
        stats.peak_serve_hwm_mb = max(stats.peak_serve_hwm_mb, run.get(pid, 0) / 1024)
        children = [hwm for member, hwm in run.items() if member != pid]
        stats.peak_child_hwm_mb = max(stats.peak_child_hwm_mb, max(children, default=0) / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)


def tree_memory_mb(pid: int) -> dict[str, float]:
    """The tree's current memory: summed VmRSS and PSS, and the serve process' own VmRSS (MB)."""
    tree = process_tree(pid)
    return {
        "tree_rss_mb": sum(status_kib(p).get("VmRSS", 0) for p in tree) / 1024,
        "tree_pss_mb": sum(pss_kib(p) for p in tree) / 1024,
        "serve_rss_mb": status_kib(pid).get("VmRSS", 0) / 1024,
        "processes": float(len(tree)),
    }


# -- the node as a process ---------------------------------------------------------------------


def _no_core_dumps() -> None:
    """In the serve process (inherited by its children): an aborting codec leaves no core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class ServedNode:
    """`mammonode serve --config CONFIG` as a subprocess: :meth:`start` waits for C-ECHO,
    :meth:`kill` is a crash (SIGKILL), :meth:`stop` a clean SIGTERM. Each run logs to
    ``workdir/serve-N.log``. ``pythonpath`` is prepended to the serve process' PYTHONPATH only
    (e.g. a sitecustomize that makes a codec abort). Use as a context manager: whatever is still
    running at exit (the serve process and any of its children) is killed by pid.
    """

    def __init__(
        self,
        config: Path,
        port: int,
        workdir: Path,
        *,
        echo_ae: str,
        ae_title: str = NODE_AE,
        pythonpath: Sequence[Path] = (),
    ) -> None:
        self.config = config
        self.port = port
        self.workdir = workdir
        self.echo_ae = echo_ae
        self.ae_title = ae_title
        self.pythonpath = list(pythonpath)
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.kills = 0
        self.start_seconds: list[float] = []
        self.lingering_children: list[int] = []
        """Children of a killed serve process still alive ``CHILD_EXIT_TIMEOUT`` s after it."""
        self._started: set[int] = set()

    CHILD_EXIT_TIMEOUT = 30.0
    """Pool children watch their parent every second and exit when it is gone; a loaded 2-core
    machine can take longer than that to schedule them (10 s was once too short)."""

    def __enter__(self) -> ServedNode:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running and self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.runs}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one torch thread: 2 shared cores
        if self.pythonpath:
            parts = [str(p) for p in self.pythonpath]
            if env.get("PYTHONPATH"):
                parts.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(parts)
        return env

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start a new run and wait until it answers C-ECHO; returns the seconds that took."""
        assert not self.running, "the node is already running"
        self.runs += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [str(MAMMONODE), "serve", "--config", str(self.config)],
                env=self.env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_no_core_dumps,
            )
        self._started.add(self.process.pid)
        deadline = started + timeout
        while not self.echo():
            if self.process.poll() is not None:
                raise AssertionError(f"mammonode serve exited {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mammonode serve did not answer C-ECHO in {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        seconds = time.monotonic() - started
        self.start_seconds.append(seconds)
        return seconds

    def echo(self) -> bool:
        """One dcmtk C-ECHO to the node: does it answer Success now?"""
        return echoscu(self.port, self.ae_title, self.echo_ae, timeout=60).returncode == 0

    def kill(self) -> None:
        """SIGKILL the serve process (a crash), then give its children time to exit on their own;
        any still alive after :attr:`CHILD_EXIT_TIMEOUT` are recorded and killed by pid."""
        assert self.process is not None and self.running, "the node is not running"
        children = process_tree(self.process.pid)[1:]
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL
        self.kills += 1
        deadline = time.monotonic() + self.CHILD_EXIT_TIMEOUT
        alive = children
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [c for c in alive if _alive(c)]
        for child in alive:
            self.lingering_children.append(child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the node's clean shutdown. Returns its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        if self.process is None:
            return
        tree = process_tree(self.process.pid) if self.running else []
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def logs(self) -> str:
        """Every run's log, concatenated."""
        parts = []
        for run in range(1, self.runs + 1):
            path = self.workdir / f"serve-{run}.log"
            if path.exists():
                parts.append(
                    f"--- serve run {run} ---\n" + path.read_text(encoding="utf-8", errors="replace")
                )
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- the modality ------------------------------------------------------------------------------

_SENDING = re.compile(r"^I: Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)\s*$")


@dataclass
class StoreRun:
    """One ``storescu -v --no-halt`` run: which files the SCP answered, and how."""

    returncode: int
    responses: dict[Path, str]
    """File -> the response status text dcmtk printed (``Success``, ``Refused: OutOfResources``...)."""
    log: str

    @property
    def acknowledged(self) -> list[Path]:
        return [p for p, s in self.responses.items() if s == "Success" or s.startswith("Warning")]

    @property
    def refused(self) -> dict[Path, str]:
        return {p: s for p, s in self.responses.items() if p not in set(self.acknowledged)}


def parse_storescu(text: str) -> dict[Path, str]:
    """File -> response status from ``storescu -v`` output (a file with no line got no response)."""
    responses: dict[Path, str] = {}
    current: Path | None = None
    for line in text.splitlines():
        sending = _SENDING.match(line)
        if sending:
            current = Path(sending.group(1))
            continue
        response = _RESPONSE.match(line)
        if response and current is not None:
            responses[current] = response.group(1).strip()
            current = None
    return responses


def store(
    files: Sequence[Path],
    port: int,
    *,
    aet: str,
    aec: str = NODE_AE,
    syntax: str = "-xe",
    timeout: float = 300,
) -> StoreRun:
    """dcmtk ``storescu -v --no-halt`` of ``files`` in one association; each file's response."""
    args = [
        storescu_path(),
        "-v",
        "--no-halt",
        "-aet",
        aet,
        "-aec",
        aec,
        syntax,
        "-to",
        "20",
        "-ta",
        "20",
        "-td",
        "60",
        LOOPBACK,
        str(port),
        *(str(f) for f in files),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout + proc.stderr
    return StoreRun(proc.returncode, parse_storescu(text), text)


@dataclass
class Modality:
    """A modality that sends ``files`` and sends again whatever was not acknowledged, once the node
    answers C-ECHO again, until everything is acknowledged or ``deadline`` (monotonic) passes.

    ``acknowledged`` is what the node answered Success to, ever (a file acknowledged and then
    resent is still acknowledged); ``history`` the per-run outcomes, for failure messages.
    """

    name: str
    aet: str
    files: list[Path]
    port: int
    syntax: str = "-xe"
    deadline: float = 0.0
    acknowledged: set[Path] = field(default_factory=set)
    history: list[str] = field(default_factory=list)
    error: BaseException | None = None
    runs: int = 0
    resent: int = 0

    def pending(self) -> list[Path]:
        return [f for f in self.files if f not in self.acknowledged]

    def run(self) -> None:
        try:
            while self.pending():
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"{self.name}: {len(self.pending())} file(s) never acknowledged")
                batch = self.pending()
                if self.runs:
                    self.resent += len(batch)
                self.runs += 1
                result = store(batch, self.port, aet=self.aet, syntax=self.syntax)
                self.acknowledged.update(result.acknowledged)
                self.history.append(
                    f"run {self.runs}: {len(batch)} sent, {len(result.acknowledged)} acked, "
                    f"refused {sorted(set(result.refused.values()))}, exit {result.returncode}"
                )
                if self.pending():
                    self._wait_for_node()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread through .error
            self.error = exc

    def _wait_for_node(self) -> None:
        """Back off a little, then until the node answers C-ECHO (a real modality's retry)."""
        time.sleep(0.5)
        while time.monotonic() < self.deadline:
            if echoscu(self.port, NODE_AE, self.aet, timeout=30).returncode == 0:
                return
            time.sleep(0.5)


@contextlib.contextmanager
def modalities_running(modalities: Sequence[Modality]) -> Iterator[list[threading.Thread]]:
    """Run each modality in a thread; on exit wait for them (bounded by their deadlines)."""
    threads = [threading.Thread(target=m.run, name=m.name, daemon=True) for m in modalities]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        for modality, thread in zip(modalities, threads, strict=True):
            thread.join(max(1.0, modality.deadline - time.monotonic() + 30))


# -- what reached the PACS ---------------------------------------------------------------------

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"


@dataclass
class Delivered:
    """The node's results stored in Orthanc, read back from the stored files (pixels not decoded)."""

    captures: list[Any]
    reports: list[Any]
    """The TID 1500 score reports."""
    cad_reports: list[Any]
    """The Mammography CAD SRs."""
    others: list[Any]

    def captures_of(self, study_uid: str) -> list[Any]:
        return [ds for ds in self.captures if str(ds.StudyInstanceUID) == study_uid]

    def reports_of(self, study_uid: str) -> list[Any]:
        return [ds for ds in self.reports if str(ds.StudyInstanceUID) == study_uid]

    def cad_reports_of(self, study_uid: str) -> list[Any]:
        return [ds for ds in self.cad_reports if str(ds.StudyInstanceUID) == study_uid]


def delivered(pacs: Any) -> Delivered:
    """Every instance in Orthanc (``peers.Orthanc``), sorted into CAM captures, score reports,
    CAD SRs and others."""
    datasets = [pacs.dataset(i) for i in pacs.instances()]
    return Delivered(
        captures=[ds for ds in datasets if ds.SOPClassUID == SECONDARY_CAPTURE and ds.Modality != "SR"],
        reports=[ds for ds in datasets if ds.Modality == "SR" and ds.SOPClassUID != MAMMOGRAPHY_CAD_SR],
        cad_reports=[ds for ds in datasets if ds.SOPClassUID == MAMMOGRAPHY_CAD_SR],
        others=[ds for ds in datasets if ds.SOPClassUID != SECONDARY_CAPTURE and ds.Modality != "SR"],
    )


def source_uids(capture: Any) -> list[str]:
    """The SOP Instance UIDs a CAM capture's SourceImageSequence references."""
    return [str(item.ReferencedSOPInstanceUID) for item in capture.get("SourceImageSequence", [])]


def evidence_uids(report: Any) -> set[str]:
    """The SOP Instance UIDs an SR lists as the evidence it was made from: its evidence sequence
    less the CAM captures it references as "Visual explanation" (DCM 130401) of its images."""
    listed = {
        str(sop.ReferencedSOPInstanceUID)
        for study in report.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    return listed - visual_explanation_uids(report)


def visual_explanation_uids(report: Any) -> set[str]:
    """The SOP Instance UIDs of the CAM captures an SR references ("Visual explanation" items)."""
    found: set[str] = set()
    todo = list(report.get("ContentSequence", []))
    while todo:
        item = todo.pop()
        names = item.get("ConceptNameCodeSequence", [])
        if item.get("ValueType") == "IMAGE" and names and names[0].CodeValue == "130401":
            found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        todo.extend(item.get("ContentSequence", []))
    return found


def sr_texts(report: Any) -> list[str]:
    """Every TEXT content item's value in an SR's content tree (depth first)."""
    texts: list[str] = []
    todo = list(report.get("ContentSequence", []))
    while todo:
        item = todo.pop(0)
        if str(item.get("ValueType", "")) == "TEXT":
            texts.append(str(item.TextValue))
        todo = list(item.get("ContentSequence", [])) + todo
    return texts


def orthanc_sop_uids(pacs: Any) -> list[str]:
    """SOP Instance UID of every instance Orthanc holds (one per stored instance)."""
    return [str(pacs.simplified_tags(i)["SOPInstanceUID"]) for i in pacs.instances()]


ServeFactory = Callable[..., ServedNode]
"""The ``serve_node`` fixture: ``serve_node(settings, *, echo_ae, pythonpath=()) -> ServedNode``
(config written, not started)."""

ABORT_HOOK = Path(__file__).parent / "abort_hook"
"""PYTHONPATH entry whose sitecustomize makes a pixel-work child abort on a marked image."""
