"""Real DICOM peers for the node's end-to-end tests: Orthanc plays the PACS, dcmtk the modality.

Issue 3 is done only when the node works with peers it did not write itself, so the end-to-end
tests talk to a real Orthanc (``Orthanc CONFIG.json``, Debian's 1.10 build) and to dcmtk's
``storescu``/``echoscu`` over loopback sockets. This module starts and stops those peers, talks
to Orthanc's REST API with ``urllib`` only (no test-only dependency), and writes the small
synthetic JPEG 2000 mammograms they exchange. A small pynetdicom storage SCP stands in for a
destination where a test needs to see exactly what arrived.

Everything listens on a free loopback port chosen per test, never 11112 / 4242 / 8042. Orthanc has
no bind-address option, so its REST API is kept local by ``RemoteAccessAllowed: false`` and its
ports are random.

Typical end-to-end use (``orthanc`` is the fixture of the same name in conftest.py)::

    node_port = free_port()
    pacs = orthanc({"mammonode": ("MAMMONODE", "127.0.0.1", node_port)})
    # start the node on node_port with destinations=(Destination.parse(pacs.destination),)
    files = write_study(tmp_path / "study", patient_id="P1", study_uid=STUDY)
    assert storescu(files, node_port).returncode == 0
    ids = pacs.wait_for_instances(5, timeout=120)
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from inference.types import SCREENING_SIDE_VIEWS
from node.dicom.loopback import LOOPBACK, free_port

log = logging.getLogger(__name__)

ORTHANC_AET = "ORTHANC"
VERIFICATION = "1.2.840.10008.1.1"
"""The Verification SOP class (C-ECHO)."""
ORTHANC_FALLBACK_BINARY = "/usr/sbin/Orthanc"
"""Debian installs Orthanc in /usr/sbin, which is not on every user's PATH."""
DICOMWEB_PACKAGE = "orthanc-dicomweb"
DICOMWEB_ROOT = "/dicom-web"

Modality = tuple[str, str, int]
"""An Orthanc ``DicomModalities`` entry: (AE title, host, port)."""

FOUR_VIEWS = SCREENING_SIDE_VIEWS
STUDY_IMAGE_SIZE = (384, 288)
"""Rows x columns of the synthetic mammograms: the size of the node tests' other images, so the
tiny test models score them in well under a second each on a shared CPU."""

# storescu proposes exactly one compressed transfer syntax per flag (design.md, practical notes).
STORESCU_SYNTAX_FLAGS: dict[str, str] = {
    "explicit": "-xe",
    "jpeg-lossless": "-xs",
    "jpegls": "-xt",
    "jpeg2000": "-xv",
    "rle": "-xr",
}
"""training.synth transfer-syntax name -> the storescu flag that can send a file encoded with it."""


def scu_modality(ae_title: str) -> Modality:
    """A DicomModalities entry for a peer that only calls Orthanc (a modality's storescu, a test's
    pynetdicom SCU): Orthanc needs a port but never dials it; a free one makes a stray call fail."""
    return (ae_title, LOOPBACK, free_port())


def orthanc_binary() -> str | None:
    """The Orthanc executable: on PATH, else Debian's /usr/sbin/Orthanc; None when not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return ORTHANC_FALLBACK_BINARY if os.access(ORTHANC_FALLBACK_BINARY, os.X_OK) else None


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library (``dpkg -L orthanc-dicomweb``: the ``.so`` in Orthanc's
    plugin folder); None when the Debian package is not installed."""
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(
        ["dpkg", "-L", DICOMWEB_PACKAGE], capture_output=True, text=True, timeout=30, check=False
    )
    if listing.returncode != 0:
        return None
    libraries = [line for line in listing.stdout.splitlines() if line.endswith(".so") and "/plugins/" in line]
    return libraries[0] if libraries else None


class OrthancError(RuntimeError):
    """Orthanc did not start, or its REST API answered a request with an error."""


@dataclass(frozen=True)
class OrthancTLS:
    """DICOM TLS for an :class:`Orthanc` (keys checked against Orthanc 1.10.1): its DICOM port
    speaks TLS only, with ``certificate`` and ``private_key`` (PEM), trusting the CAs in
    ``trusted_certificates`` for its peers; every registered modality is called over TLS too."""

    certificate: Path
    private_key: Path
    trusted_certificates: Path
    remote_certificate_required: bool = True


class Orthanc:
    """One Orthanc server with its own configuration, storage and free ports, in ``workdir``.

    ``modalities`` maps Orthanc's symbolic names to (AE title, host, port). Orthanc only accepts
    C-ECHO and C-STORE from the AE titles listed there (``DicomAlwaysAllowEcho`` and
    ``DicomAlwaysAllowStore`` are false), so a test must register the node's own AE title (its
    calling AE when it sends results) and any SCU it uses against Orthanc; the same entries are
    where ``send_to_modality`` sends. ``check_called_aet`` makes Orthanc refuse associations not
    addressed to ``aet``, which catches a node sending to the wrong destination AE.

    :meth:`stop` (clean) or :meth:`kill` (crash), then :meth:`start`, restarts it on the same ports
    with the same stored instances (the "destination down" scenario). Use as a context manager or
    through the ``orthanc`` fixture, which kills it at teardown.

    ``dicomweb`` loads Debian's DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS at :attr:`dicomweb_url`).
    ``users`` (name -> password) turns HTTP basic authentication on for the REST API and DICOMweb;
    this object's own REST calls then log in as the first user. ``tls`` (:class:`OrthancTLS`) makes
    its DICOM port, and its calls to the modalities, DICOM TLS.
    """

    def __init__(
        self,
        workdir: Path,
        modalities: Mapping[str, Modality] | None = None,
        *,
        aet: str = ORTHANC_AET,
        check_called_aet: bool = True,
        http_port: int | None = None,
        dicom_port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 30.0,
        dicomweb: bool = False,
        users: Mapping[str, str] | None = None,
        tls: OrthancTLS | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.modalities: dict[str, Modality] = dict(modalities or {})
        self.aet = aet
        self.check_called_aet = check_called_aet
        self._fixed_ports = http_port is not None or dicom_port is not None
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.binary = binary or orthanc_binary()
        self.startup_timeout = startup_timeout
        self.dicomweb = dicomweb
        self.users: dict[str, str] = dict(users or {})
        self.tls = tls
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:34567``."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def destination(self) -> str:
        """This Orthanc as the node's ``AE@HOST:PORT`` destination (``MAMMONODE_DESTINATIONS``)."""
        return f"{self.aet}@{LOOPBACK}:{self.dicom_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb service (with ``dicomweb=True``), e.g. for STOW-RS."""
        return f"{self.url}{DICOMWEB_ROOT}"

    @property
    def stow_destination(self) -> str:
        """This Orthanc as the node's DICOMweb destination (``stow:URL``), without credentials."""
        return f"stow:{self.dicomweb_url}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is started with (keys checked against Orthanc 1.10.1)."""
        storage = self.workdir / "storage"
        return {
            "Name": "MammoNode test PACS",
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "LuaScripts": [],
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {name: [ae, host, port] for name, (ae, host, port) in self.modalities.items()},
            "DicomScuTimeout": 30,
            "UnknownSopClassAccepted": False,
            "SaveJobs": False,
            "WebDavEnabled": False,
            "StorageCompression": False,
            "OverwriteInstances": False,
            **self._dicomweb_config(),
            **({"AuthenticationEnabled": True, "RegisteredUsers": self.users} if self.users else {}),
            **self._tls_config(),
        }

    def _tls_config(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        modalities = {
            name: {"AET": ae, "Host": host, "Port": port, "UseDicomTls": True}
            for name, (ae, host, port) in self.modalities.items()
        }
        return {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.tls.certificate),
            "DicomTlsPrivateKey": str(self.tls.private_key),
            "DicomTlsTrustedCertificates": str(self.tls.trusted_certificates),
            "DicomTlsRemoteCertificateRequired": self.tls.remote_certificate_required,
            "DicomModalities": modalities,
        }

    def _dicomweb_config(self) -> dict[str, Any]:
        if not self.dicomweb:
            return {}
        plugin = dicomweb_plugin()
        if plugin is None:
            raise OrthancError(
                f"the DICOMweb plugin is not installed (.ci/setup installs {DICOMWEB_PACKAGE})"
            )
        return {"Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": f"{DICOMWEB_ROOT}/"}}

    def write_config(self) -> Path:
        """Write :meth:`config` as JSON to ``workdir/orthanc.json`` and return its path."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        return self.config_path

    def start(self) -> Orthanc:
        """Start Orthanc and return once both its REST API and its DICOM port answer.

        If it dies during startup on ports this object chose (another process took one in the
        meantime), it is retried with new ports, at most three times; with ports fixed by the caller
        or on a restart it is not, since peers are configured with them.
        """
        if self.running:
            return self
        if self.binary is None:
            raise OrthancError("Orthanc is not installed (.ci/setup installs the Debian package)")
        attempts = 1 if self._fixed_ports else 3
        for attempt in range(attempts):
            try:
                self._start_once()
                self._fixed_ports = True  # from now on peers know these ports
                return self
            except OrthancError:
                self.kill()
                if attempt == attempts - 1:
                    raise
                self.http_port, self.dicom_port = free_port(), free_port()
                log.warning("Orthanc did not start; retrying on new ports")
        return self  # pragma: no cover - the loop returns or raises

    def _start_once(self) -> None:
        assert self.binary is not None
        self.write_config()
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [self.binary, str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if self.system().get("DicomPort") == self.dicom_port and _port_open(self.dicom_port):
                    log.info("Orthanc up: REST %s, DICOM %s", self.url, self.dicom_port)
                    return
            except (OrthancError, OSError):
                pass
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer within {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Orthanc: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Stored data stay.

        A clean stop takes Orthanc 1.10 about 3.5 s (its HTTP and DICOM servers wind down on
        internal timers); :meth:`kill` is immediate.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL Orthanc at once: a crashed PACS, or a fast teardown. Its SQLite index survives
        (journaled), so :meth:`start` brings back what it had stored."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Orthanc's log (for failure messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float = 120.0,
    ) -> bytes:
        """One REST call; the raw response body. HTTP errors raise OrthancError with Orthanc's text."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise OrthancError(f"{method} {path}: {exc.reason}") from None

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON answer."""
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``path`` and decode the JSON answer."""
        return json.loads(self.request("POST", path, json.dumps(payload).encode("utf-8")))

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AE title and ports of the running server."""
        return dict(self.get_json("/system"))

    def instances(self) -> list[str]:
        """``GET /instances``: the Orthanc IDs (not SOP Instance UIDs) of every stored instance."""
        return [str(i) for i in self.get_json("/instances")]

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``: tag keyword -> value, e.g. ``SOPClassUID``,
        ``StudyInstanceUID``, ``SOPInstanceUID``, ``Modality``, ``SeriesDescription``."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/tags?simplify``: every tag by keyword, sequences as lists of dicts
        (e.g. ``SourceImageSequence``, ``CurrentRequestedProcedureEvidenceSequence`` of an SR).
        Pixel data and other large binary values are left out by Orthanc."""
        return dict(self.get_json(f"/instances/{instance_id}/tags?simplify"))

    def instance_file(self, instance_id: str) -> bytes:
        """``GET /instances/{id}/file``: the stored DICOM Part 10 file, as received."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def dataset(self, instance_id: str) -> Dataset:
        """The stored instance read with pydicom (pixel data not decoded), for deep checks."""
        return dcmread(DicomBytesIO(self.instance_file(instance_id)))

    def upload(self, path: Path) -> str:
        """``POST /instances`` with a DICOM file; returns its Orthanc instance ID.

        Orthanc answers ``Status`` ``Success`` or ``AlreadyStored`` (same SOP Instance UID); any
        other status raises OrthancError.
        """
        answer = json.loads(
            self.request("POST", "/instances", Path(path).read_bytes(), content_type="application/dicom")
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path} answered {answer}")
        return str(answer["ID"])

    def send_to_modality(self, name: str, resource_ids: Sequence[str]) -> dict[str, Any]:
        """``POST /modalities/{name}/store`` (synchronous): C-STORE the given Orthanc resources
        (instance, series, study or patient IDs) to the modality registered as ``name``.

        Returns Orthanc's job summary (``InstancesCount``, ``FailedInstancesCount``, ...); a failed
        association or a refused C-STORE makes Orthanc answer with an HTTP error -> OrthancError.
        """
        payload = {"Resources": list(resource_ids), "Synchronous": True}
        return dict(self.post_json(f"/modalities/{name}/store", payload))

    def echo_modality(self, name: str) -> bool:
        """``POST /modalities/{name}/echo``: does the registered modality answer a C-ECHO?"""
        try:
            self.request("POST", f"/modalities/{name}/echo", b"{}")
        except OrthancError:
            return False
        return True

    def wait_for_instances(self, n: int, timeout: float = 60.0, poll: float = 0.25) -> list[str]:
        """Poll ``GET /instances`` until at least ``n`` instances are stored; return their IDs.

        Raises TimeoutError saying how many arrived. It returns as soon as ``n`` are in: to check
        that no more follow, assert the count again after a pause. Orthanc keeps the first copy of
        a SOP Instance UID it already holds (``OverwriteInstances`` false), so a resend of
        identical UIDs never raises the count: counts check "no new UIDs", not "no resend".
        """
        deadline = time.monotonic() + timeout
        while True:
            ids = self.instances()
            if len(ids) >= n:
                return ids
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Orthanc holds {len(ids)} instance(s) after {timeout} s, expected {n}")
            time.sleep(poll)


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- dcmtk, the modality ----------------------------------------------------------------------


@functools.cache
def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's ``name`` (``storescu``, ``echoscu``): the first on PATH that says it is
    dcmtk. pynetdicom installs Python apps of the same names into the virtual environment, which
    come first on PATH and take other options; calling one of them by mistake fails for the wrong
    reason. FileNotFoundError when dcmtk is not installed."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder) if folder else None
        if candidate is None:
            continue
        try:
            version = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if "dcmtk" in version.stdout:
            return candidate
    raise FileNotFoundError(f"dcmtk's {name} is not on PATH (.ci/setup installs dcmtk)")


def storescu(
    files: Sequence[Path | str],
    port: int,
    aec: str = "MAMMONODE",
    aet: str = "MODALITY",
    syntax: str = "-xv",
    *,
    host: str = LOOPBACK,
    no_halt: bool = False,
    extra: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``storescu`` sending ``files`` in one association from ``aet`` to ``aec``, as a
    modality does.

    ``syntax`` is the one transfer-syntax flag storescu proposes (see STORESCU_SYNTAX_FLAGS;
    ``-xv`` = JPEG 2000 lossless, which a J2K file needs). ``returncode`` is 0 only when every
    file was stored with Success (or a Warning): by default storescu stops at the first refused or
    failed C-STORE and exits non-zero (dcmtk 3.6.7 exits with the status' high byte, e.g. 167 for
    0xA7xx, 1 when it could not send or associate). ``no_halt`` sends the remaining files after a
    failure, but then storescu exits 0 whatever happened, so check ``stderr`` instead.
    ACSE/DIMSE timeouts keep a stuck peer from hanging the test.
    """
    args = [
        dcmtk_tool("storescu"),
        *(["--no-halt"] if no_halt else []),
        "-aet",
        aet,
        "-aec",
        aec,
        syntax,
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "120",
        *extra,
        host,
        str(port),
        *(str(f) for f in files),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def echoscu(
    port: int,
    aec: str,
    aet: str = "MODALITY",
    *,
    host: str = LOOPBACK,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``echoscu``: one C-ECHO from ``aet`` to ``aec``; returncode 0 means answered Success."""
    args = [
        dcmtk_tool("echoscu"),
        "-aet",
        aet,
        "-aec",
        aec,
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "30",
        host,
        str(port),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


# -- synthetic studies --------------------------------------------------------------------------


def write_mammogram(
    path: Path,
    *,
    patient_id: str,
    study_uid: str,
    laterality: str,
    view: str,
    transfer_syntax: str = "jpeg2000",
    size: tuple[int, int] = STUDY_IMAGE_SIZE,
    seed: int = 0,
    instance_number: int = 1,
) -> Dataset:
    """Write one synthetic screening mammogram (MG For Presentation) to ``path``; return it.

    The phantom and file come from training.synth (the same generator as the training data), so it
    carries everything a unit sends: ImageLaterality, ViewPosition, ViewCodeSequence, VOI.
    ``transfer_syntax`` is a training.synth name; the default JPEG 2000 lossless is encoded with
    pydicom + pylibjpeg-openjpeg, since dcmtk has no J2K encoder. Series and SOP Instance UIDs are
    derived from ``study_uid``, laterality, view and ``instance_number`` (give a late extra view of
    the same breast a new number), so the same arguments give the same file.
    """
    from inference.uids import derive_uid
    from training.synth import make_dicom, synth_breast, write_dicom

    rng = np.random.default_rng([seed, instance_number, *laterality.encode(), *view.encode()])
    pixels, _ = synth_breast(rng, laterality=laterality, view=view, size=size)
    ds = make_dicom(
        pixels,
        patient_id=patient_id,
        study_uid=study_uid,
        laterality=laterality,
        view=view,
        transfer_syntax=transfer_syntax,
        sop_instance_uid=derive_uid("tests", "peers", study_uid, laterality, view, str(instance_number)),
        instance_number=instance_number,
    )
    write_dicom(ds, path)
    return ds


def write_study(
    folder: Path,
    *,
    patient_id: str,
    study_uid: str,
    views: Sequence[tuple[str, str]] = FOUR_VIEWS,
    transfer_syntax: str = "jpeg2000",
    size: tuple[int, int] = STUDY_IMAGE_SIZE,
    seed: int = 0,
) -> list[Path]:
    """Write a screening study (default: the 4 views L/R x CC/MLO, JPEG 2000 lossless) into
    ``folder`` as ``<L|R>_<CC|MLO>.dcm`` and return the paths in view order.

    Read SOP Instance UIDs back with pydicom (``dcmread(p, stop_before_pixels=True)``) to check
    the references in the results.
    """
    paths = []
    for number, (laterality, view) in enumerate(views, start=1):
        path = Path(folder) / f"{laterality}_{view}.dcm"
        write_mammogram(
            path,
            patient_id=patient_id,
            study_uid=study_uid,
            laterality=laterality,
            view=view,
            transfer_syntax=transfer_syntax,
            size=size,
            seed=seed,
            instance_number=number,
        )
        paths.append(path)
    return paths


# -- a pynetdicom storage SCP, a destination that records what it got ---------------------------


@dataclass
class Received:
    """One instance a :class:`StorageSCP` received: who sent it, in which syntax, the dataset."""

    calling_ae: str
    transfer_syntax: str
    dataset: Dataset


@dataclass
class StorageSCP:
    """What a running :func:`storage_scp` has received so far (thread-safe list)."""

    ae_title: str
    port: int
    status: int = 0x0000
    """The status every C-STORE is answered with; set it (to a named status) to make the SCP
    refuse, e.g. 0xA700 out of resources. Only instances answered with Success are recorded."""
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def modality(self) -> Modality:
        """This SCP as an Orthanc DicomModalities entry."""
        return (self.ae_title, LOOPBACK, self.port)

    def sop_instance_uids(self) -> list[str]:
        with self._lock:
            return [str(r.dataset.SOPInstanceUID) for r in self.received]

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Received]:
        """Wait until at least ``n`` instances arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.received) >= n:
                    return list(self.received)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"storage SCP got {len(self.received)} instance(s), expected {n}")
            time.sleep(0.05)


@contextmanager
def storage_scp(
    ae_title: str = "TESTSCP", port: int | None = None, status: int | None = None
) -> Iterator[StorageSCP]:
    """A pynetdicom C-STORE SCP on loopback for the storage classes the node exchanges
    (MG For Presentation/Processing, Secondary Capture, Comprehensive 3D / Enhanced SR) in every
    transfer syntax pydicom knows, so a J2K file arrives as J2K. Datasets are decoded without
    their pixels; the server stops on exit. ``status`` (default Success) is what it answers.
    """
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, evt
    from pynetdicom.events import Event
    from pynetdicom.status import Status

    scp = StorageSCP(ae_title, port or free_port(), int(Status.SUCCESS) if status is None else status)

    def on_store(event: Event) -> int:
        answer = scp.status
        if answer != Status.SUCCESS:
            return answer
        ds = event.dataset
        ds.file_meta = event.file_meta
        item = Received(event.assoc.requestor.ae_title, str(event.context.transfer_syntax), ds)
        with scp._lock:
            scp.received.append(item)
        return answer

    ae = AE(ae_title)
    ae.maximum_pdu_size = 0  # unlimited: mammograms are large
    for sop_class in STORAGE_CLASSES.values():
        ae.add_supported_context(sop_class, list(AllTransferSyntaxes))
    ae.add_supported_context(VERIFICATION)
    server = ae.start_server((LOOPBACK, scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # block=False always returns the server
    try:
        yield scp
    finally:
        server.shutdown()


STORAGE_CLASSES: dict[str, str] = {
    "mg_presentation": "1.2.840.10008.5.1.4.1.1.1.2",
    "mg_processing": "1.2.840.10008.5.1.4.1.1.1.2.1",
    "secondary_capture": "1.2.840.10008.5.1.4.1.1.7",
    "comprehensive_3d_sr": "1.2.840.10008.5.1.4.1.1.88.34",
    "comprehensive_sr": "1.2.840.10008.5.1.4.1.1.88.33",
    "enhanced_sr": "1.2.840.10008.5.1.4.1.1.88.22",
    "mammography_cad_sr": uid.MammographyCADSRStorage,
    "grayscale_presentation_state": uid.GrayscaleSoftcopyPresentationStateStorage,
}
"""The storage SOP classes the node receives and sends, by a readable name."""


OrthancFactory = Callable[..., Orthanc]
"""The ``orthanc`` fixture: ``orthanc(modalities, **Orthanc kwargs) -> started Orthanc``."""
