"""The peers the ingest and burst benchmarks run against: dcmtk, Orthanc and `mammonode serve`.

dcmtk's ``storescp`` is the reference receiver and its ``storescu`` the modality; Orthanc is the
PACS the results go to; the node runs as the product does, a `mammonode serve` process with its
own configuration, data folder and SQLite database. Every peer listens on a free loopback port and
keeps its files in a folder the caller owns (a temporary one). A missing tool is reported as a
reason (one line), never as an exception, so a bench section can say why it was not measured.

The finders take absolute paths: pynetdicom installs Python scripts named ``storescu`` and
``storescp`` into the virtual environment, which come first on PATH and take other options.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from inference import MammoNodeError, derive_uid
from node.dicom.loopback import LOOPBACK, free_port

log = logging.getLogger(__name__)

DCMTK_FOLDERS = ("/usr/bin", "/usr/local/bin")
"""Where Debian and a source build install dcmtk; searched before PATH."""
ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
STARTUP_SECONDS = 60.0
"""How long a peer may take to open its port (a node's first start migrates its database)."""


class PeerError(MammoNodeError):
    """A peer did not start, stopped early, or answered with an error."""


@functools.cache
def dcmtk_tool(name: str) -> Path | None:
    """dcmtk's ``name`` (``storescp``, ``storescu``) by absolute path: the first in
    :data:`DCMTK_FOLDERS`, then on PATH, whose ``--version`` says dcmtk; None when not installed."""
    candidates = [Path(folder, name) for folder in DCMTK_FOLDERS]
    candidates += [Path(folder, name) for folder in os.environ.get("PATH", "").split(os.pathsep) if folder]
    for candidate in dict.fromkeys(candidates):
        if not os.access(candidate, os.X_OK):
            continue
        try:
            version = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if "dcmtk" in version.stdout.lower():
            return candidate
    return None


def missing_dcmtk(*names: str) -> str | None:
    """Why these dcmtk tools cannot be used (one line), or None when all are installed."""
    missing = [name for name in names if dcmtk_tool(name) is None]
    if not missing:
        return None
    return (
        f"dcmtk's {', '.join(missing)} not found in {', '.join(DCMTK_FOLDERS)} or on PATH (apt install dcmtk)"
    )


def orthanc_binary() -> Path | None:
    """Orthanc's executable: Debian's /usr/sbin/Orthanc (not on every user's PATH), else PATH."""
    for candidate in ORTHANC_BINARIES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("Orthanc")
    return Path(found) if found else None


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log_path: Path) -> None:
    """Return once ``port`` accepts connections; PeerError if ``process`` exits or it takes too long."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while not port_open(port):
        if process.poll() is not None:
            raise PeerError(f"{what} exited with {process.returncode}: {log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise PeerError(f"{what} did not open port {port} within {STARTUP_SECONDS:.0f} s")
        time.sleep(0.05)


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL: a node records its stop and closes its database on SIGTERM."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


# -- the node ----------------------------------------------------------------------------------


class ServeProcess:
    """`mammonode serve` in a child process, configured by a TOML file in ``workdir``.

    The child gets this environment without ``MAMMONODE_*`` variables (the bench decides every
    setting) and the settings given; its log goes to ``workdir/serve.log``.
    """

    def __init__(self, workdir: Path, settings: Mapping[str, Any], *, role: str = "all") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.settings = {
            "ae_title": "MAMMONODE",
            "bind_address": LOOPBACK,
            "port": self.port,
            "data_dir": str(workdir / "data"),
            **settings,
        }
        self.role = role
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ae_title(self) -> str:
        return str(self.settings["ae_title"])

    @property
    def database_url(self) -> str:
        return f"sqlite:///{(Path(self.settings['data_dir']) / 'mammonode.sqlite').resolve()}"

    def start(self) -> ServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mammonode.toml"
        config.write_text(
            "".join(f"{key} = {json.dumps(value)}\n" for key, value in self.settings.items()),
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
        command = [
            sys.executable,
            "-m",
            "node.commands.app",
            "serve",
            "--config",
            str(config),
            "--role",
            self.role,
        ]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            wait_for_port(self.port, self.process, "mammonode serve", self.log_path)
        except PeerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def rss_bytes(self) -> int:
        """Resident memory of the node process and all its descendants (the pixel-pool children)."""
        if self.process is None or self.process.poll() is not None:
            return 0
        return sum(_rss(pid) for pid in (self.process.pid, *descendants(self.process.pid)))

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``, from ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# -- Orthanc, the PACS -------------------------------------------------------------------------


class OrthancPACS:
    """An Orthanc with its own configuration and storage in ``workdir``, on free loopback ports.

    ``modalities`` (name -> (AE title, host, port)) are the peers allowed to store to it. Its REST
    API stays local (``RemoteAccessAllowed: false``, no plugins); Orthanc has no bind-address
    option, so its ports are random.
    """

    AET = "ORTHANC"

    def __init__(self, workdir: Path, modalities: Mapping[str, tuple[str, str, int]]) -> None:
        self.workdir = workdir
        self.modalities = dict(modalities)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        """This Orthanc as a node destination, ``AE@HOST:PORT``."""
        return f"{self.AET}@{LOOPBACK}:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        storage = str(self.workdir / "storage")
        return {
            "Name": "MammoNode bench PACS",
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "DicomAet": self.AET,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "StorageCompression": False,
            "SaveJobs": False,
        }

    def start(self, binary: Path) -> OrthancPACS:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [str(binary), str(config)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            wait_for_port(self.dicom_port, self.process, "Orthanc", self.log_path)
            wait_for_port(self.http_port, self.process, "Orthanc", self.log_path)
        except PeerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def get_json(self, path: str) -> Any:
        """GET ``path`` from the REST API; PeerError on an HTTP or connection error."""
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=30) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PeerError(f"Orthanc GET {path}: {exc}") from None


# -- files -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyCopy:
    """One copy of a study made by :func:`copy_studies`: its Study Instance UID and files."""

    study_uid: str
    files: tuple[Path, ...]


def copy_studies(files: Sequence[Path], out: Path, copies: int, tag: str) -> list[StudyCopy]:
    """``copies`` copies of the study ``files``, each a new study of a new patient: new Patient ID,
    Study, Series and SOP Instance UIDs (derived from ``tag``, so reproducible), pixel data bytes
    unchanged (nothing is decoded or re-encoded)."""
    datasets = [dcmread(path) for path in files]
    studies: list[StudyCopy] = []
    for number in range(copies):
        study_uid = derive_uid("mammonode-bench", tag, str(number))
        written: list[Path] = []
        for index, ds in enumerate(datasets):
            ds.PatientID = f"BENCH{number:04d}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = derive_uid(study_uid, "series", str(index))
            ds.SOPInstanceUID = derive_uid(study_uid, "instance", str(index))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out / f"study{number:04d}" / f"{index}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
        studies.append(StudyCopy(study_uid, tuple(written)))
    return studies


def all_files(studies: Iterable[StudyCopy]) -> list[Path]:
    return [path for study in studies for path in study.files]
