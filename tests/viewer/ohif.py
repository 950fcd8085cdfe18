"""A real viewer for the node's results: OHIF 3.12.10 in headless Debian chromium, reading Orthanc.

What a radiologist would see is checked with the viewer a site is likely to use, not with our own
reader. The pieces, all on free loopback ports and none of them reaching the network:

* :class:`DicomWebOrthanc`: the test PACS of ``tests/node/peers.py`` with Debian's
  ``orthanc-dicomweb`` plugin loaded (QIDO-RS / WADO-RS under ``/dicom-web/``).
* :class:`ViewerServer`: a small HTTP server that serves OHIF's built ``dist/`` (unpacked by
  ``.ci/setup`` into ``.cache/ohif/3.12.10/dist``) with an ``app-config.js`` of ours, and
  reverse-proxies ``/dicom-web/*`` to Orthanc, so the browser sees one origin and needs no CORS.
* :class:`Browser`: playwright driving ``/usr/bin/chromium`` (never a browser playwright would
  download); every request that leaves the viewer's origin is aborted and recorded, and the
  console, page errors and failed requests are kept for failure messages.

Design notes (``../shared/design.md``, Practical notes, Viewers): 3.13.2 misreads VOI LUT
Function LINEAR and leaves MG views black, the shipped ``app-config.js`` points at a public demo
server and must be replaced, ``httpErrorHandler`` must be defined, and as root chromium needs
``--no-sandbox``; WebGL comes from SwiftShader (``--use-angle=swiftshader``).
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
from peers import DICOMWEB_PACKAGE, LOOPBACK, Orthanc, dicomweb_plugin, free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.12.10"
OHIF_DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
"""Where ``.ci/setup`` unpacks ``npm pack @ohif/app@3.12.10``; ``MAMMONODE_OHIF_DIST`` overrides."""
CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (``.ci/setup``); ``MAMMONODE_CHROMIUM`` overrides."""
DICOMWEB_ROOT = "/dicom-web/"
ARTIFACTS = REPO / "test-artifacts" / "ohif"
"""Screenshots and browser logs of the viewer test (git-ignored); ``MAMMONODE_TEST_ARTIFACTS``
moves the parent folder."""

CHROMIUM_FLAGS = (
    "--use-angle=swiftshader",  # WebGL without a GPU (cornerstone3D renders with WebGL)
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",  # the machine has no network: no calls home
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
)


def ohif_dist() -> Path:
    return Path(os.environ.get("MAMMONODE_OHIF_DIST", OHIF_DIST))


def chromium_binary() -> str | None:
    path = os.environ.get("MAMMONODE_CHROMIUM", CHROMIUM)
    return path if os.access(path, os.X_OK) else None


def artifacts_dir() -> Path:
    base = os.environ.get("MAMMONODE_TEST_ARTIFACTS")
    return Path(base) / "ohif" if base else ARTIFACTS


def missing_prerequisites() -> list[str]:
    """What .ci/setup installs for the viewer test and is not here (empty when all is)."""
    missing = []
    if not (ohif_dist() / "index.html").is_file():
        missing.append(f"OHIF {OHIF_VERSION} dist/ ({ohif_dist()})")
    if chromium_binary() is None:
        missing.append(f"chromium ({CHROMIUM})")
    if dicomweb_plugin() is None:
        missing.append(DICOMWEB_PACKAGE)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (dev extra)")
    return missing


# -- Orthanc with DICOMweb -------------------------------------------------------------------------


class DicomWebOrthanc(Orthanc):
    """The test PACS with the DICOMweb plugin: QIDO-RS and WADO-RS at ``/dicom-web/``."""

    def __init__(self, *args: Any, plugin: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugin = plugin

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["Plugins"] = [self.plugin]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": True,
            "Ssl": False,
            # the full dataset in /metadata: OHIF reads an SR's content tree from it
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        }
        return config

    def upload_all(self, paths: list[Path]) -> list[str]:
        return [self.upload(p) for p in paths]


# -- OHIF served from one origin with the DICOMweb proxy ------------------------------------------


def app_config_js() -> str:
    """OHIF's ``window.config``: one DICOMweb data source on this origin's ``/dicom-web``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "mammonode",
        "configuration": {
            "friendlyName": "MammoNode test Orthanc",
            "name": "orthanc",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "dicomUploadEnabled": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        # An SR put in a viewport is loaded as tracked measurements at once (no "track?" prompt),
        # as a site that trusts its CAD would configure it; the SR must be rehydratable for that.
        "disableConfirmationPrompts": True,
        "defaultDataSourceName": "mammonode",
        "dataSources": [source],
    }
    roots = "\n".join(
        f"window.config.dataSources[0].configuration.{key} = window.location.origin + '/dicom-web';"
        for key in ("wadoUriRoot", "qidoRoot", "wadoRoot")
    )
    return (
        "// Written by tests/viewer/ohif.py: OHIF reads only the test's Orthanc, on this origin.\n"
        f"window.config = {json.dumps(config, indent=2)};\n{roots}\n"
        "window.config.httpErrorHandler = error => {\n"
        "  console.error('OHIF HTTP error', error && error.status, error && error.url);\n"
        "};\n"
    )


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class ViewerServer:
    """OHIF's ``dist`` plus ``/app-config.js`` plus ``/dicom-web/*`` proxied to Orthanc."""

    dist: Path
    orthanc_port: int
    port: int = field(default_factory=free_port)
    requests: list[str] = field(default_factory=list)
    """``"GET /path -> 200"`` for every request served (for failure messages)."""
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ViewerServer:
        handler = _handler(self)
        self._server = _QuietServer((LOOPBACK, self.port), handler)
        threading.Thread(target=self._server.serve_forever, name="ohif-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def failed_requests(self) -> list[str]:
        return [line for line in list(self.requests) if not line.endswith((" 200", " 206", " 304"))]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that closes its keep-alive connections at exit is not an error."""
        log.debug("viewer server: connection from %s ended abruptly", client_address)


class _ViewerHandler(BaseHTTPRequestHandler):
    """Serves one :class:`ViewerServer` (set by :func:`_handler` on a subclass)."""

    protocol_version = "HTTP/1.1"
    viewer: ViewerServer
    dist: Path
    config: bytes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self, status: int) -> None:
        self.viewer.requests.append(f"{self.command} {self.path} -> {status}")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status)

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith(DICOMWEB_ROOT):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, self.config, "text/javascript")
        else:
            self._static(path)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if unquote(urlsplit(self.path).path).startswith(DICOMWEB_ROOT):
            self._proxy()
        else:
            self._send(405, b"", "text/plain")

    def _static(self, path: str) -> None:
        target = (self.dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.dist) or not target.is_file():
            target = self.dist / "index.html"  # a client-side route (/viewer?...), as _redirects says
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), content_type)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        # Host stays the viewer's: the plugin builds BulkDataURIs from it, so they point here.
        connection = http.client.HTTPConnection(LOOPBACK, self.viewer.orthanc_port, timeout=120)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as exc:
            self._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
            return
        finally:
            connection.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self._record(response.status)


def _handler(server: ViewerServer) -> type[BaseHTTPRequestHandler]:
    attributes = {"viewer": server, "dist": server.dist.resolve(), "config": app_config_js().encode("utf-8")}
    return type("ViewerHandler", (_ViewerHandler,), attributes)


# -- the browser -----------------------------------------------------------------------------------


@dataclass
class BrowserLog:
    """What the page said: console messages, uncaught errors, requests refused or failed."""

    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return self.page_errors + [m for m in self.console if m.startswith(("[error]", "[assert]"))]

    def text(self) -> str:
        """The whole log, less the JPEG 2000 decoder's per-image chatter."""
        parts = [
            "page errors:",
            *self.page_errors,
            "console:",
            *(m for m in self.console if not m.startswith("[log] [INFO]")),
            "requests blocked (off-origin):",
            *self.blocked,
            "requests failed:",
            *self.failed,
        ]
        return "\n".join(parts)

    def contains(self, needle: str) -> list[str]:
        return [line for line in self.page_errors + self.console if needle in line]


@contextmanager
def browser_page(origin: str, viewport: tuple[int, int] = (1600, 1000)) -> Iterator[tuple[Any, BrowserLog]]:
    """A playwright page in headless Debian chromium, confined to ``origin``; yields (page, log).

    Requests to any other origin are aborted and listed in ``log.blocked`` (OHIF must not need
    the network). Uses ``--no-sandbox`` only as root, where chromium refuses to start without it.
    """
    from playwright.sync_api import sync_playwright

    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError(f"chromium not found at {CHROMIUM} (.ci/setup installs it)")
    flags = list(CHROMIUM_FLAGS)
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    record = BrowserLog()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=flags)
        try:
            context = browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, service_workers="block"
            )
            # OHIF's first-visit tour would cover the viewport: mark it as seen.
            context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            page = context.new_page()
            page.set_default_timeout(60_000)

            def route(route: Any) -> None:
                url = route.request.url
                if url.startswith((origin + "/", "data:", "blob:")) or url == origin:
                    route.continue_()
                else:
                    record.blocked.append(url)
                    route.abort()

            page.route("**/*", route)
            page.on("console", lambda m: record.console.append(f"[{m.type}] {m.text}"))
            page.on("pageerror", lambda e: record.page_errors.append(f"{e.name}: {e.message}\n{e.stack}"))
            page.on(
                "requestfailed",
                lambda r: record.failed.append(f"{r.method} {r.url}: {r.failure}"),
            )
            yield page, record
        finally:
            browser.close()


def image_stats(png: bytes) -> dict[str, float]:
    """Mean, standard deviation and non-black fraction of a screenshot (PNG bytes)."""
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise ValueError("screenshot is not a PNG")
    return {
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "nonblack": float((pixels > 16).mean()),
    }


def wait_for(condition: Any, what: str, timeout: float, poll: float = 0.5) -> Any:
    """Poll ``condition()`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} (after {timeout:.0f} s)")
        time.sleep(poll)


# -- OHIF, as a user drives it ---------------------------------------------------------------------

_DISPLAY_SETS_JS = """() => (window.services ? window.services.displaySetService.getActiveDisplaySets() : [])
    .map(d => ({uid: d.displaySetInstanceUID, series: d.SeriesInstanceUID, modality: d.Modality,
                images: d.numImageFrames || (d.instances || []).length,
                loaded: !!d.isLoaded, hydrated: !!d.isHydrated, rehydratable: !!d.isRehydratable,
                findings: d.measurements ? d.measurements.length : null}))"""

_VIEWPORT_JS = """() => {
  const s = window.services;
  if (!s) return null;
  const grid = s.viewportGridService.getState();
  const vp = grid.viewports.get(grid.activeViewportId);
  const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
  const csvp = engine && engine.getViewports().find(v => v.id === grid.activeViewportId);
  const imageId = csvp && csvp.getCurrentImageId ? csvp.getCurrentImageId() || '' : '';
  return {displaySets: (vp && vp.displaySetInstanceUIDs) || [], imageId: imageId,
          measurements: s.measurementService.getMeasurements().length};
}"""

_MEASUREMENTS_DRAWN_JS = """() => {
  const pane = document.querySelector('[data-cy=viewport-pane]');
  if (!pane || !window.services) return 0;
  const measured = window.services.measurementService.getMeasurements().map(m => m.uid);
  // cornerstone3D tags a drawn annotation's group (data-annotation-uid) or its shapes
  // (data-id "<annotation uid>-rect", "-line", ...), depending on the tool and its text box.
  const tags = Array.from(pane.querySelectorAll('svg [data-annotation-uid], svg [data-id]'))
                    .map(e => e.getAttribute('data-annotation-uid') || e.getAttribute('data-id'));
  return measured.filter(uid => tags.some(tag => tag === uid || tag.startsWith(uid + '-'))).length;
}"""


class Ohif:
    """One OHIF page: open a study, find a series' thumbnail, read what the viewer shows."""

    def __init__(self, page: Any, log: BrowserLog, base_url: str) -> None:
        self.page = page
        self.log = log
        self.base_url = base_url

    def open_study(self, study_uid: str) -> None:
        self.page.goto(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}")

    def display_sets(self) -> list[dict[str, Any]]:
        return list(self.page.evaluate(_DISPLAY_SETS_JS))

    def display_set(self, series_uid: str, timeout: float = 90.0) -> dict[str, Any]:
        """OHIF's display set of a series, once the study browser lists it."""

        def find() -> dict[str, Any] | None:
            return next((d for d in self.display_sets() if d["series"] == series_uid), None)

        found: dict[str, Any] = wait_for(find, f"OHIF lists no series {series_uid}", timeout)
        return found

    def open_series(self, series_uid: str) -> dict[str, Any]:
        """Double-click the series' thumbnail in the study browser, as a user puts it in the
        viewport; returns its display set."""
        display_set = self.display_set(series_uid)
        thumbnail = self.page.locator(f"#thumbnail-{display_set['uid']}")
        thumbnail.wait_for(state="visible", timeout=60_000)
        thumbnail.dblclick()
        return display_set

    def viewport(self) -> dict[str, Any]:
        """The active viewport: its display sets, the image it shows, OHIF's measurement count."""
        return dict(self.page.evaluate(_VIEWPORT_JS) or {})

    def measurements_drawn(self) -> int:
        """How many of OHIF's measurements cornerstone drew into the viewport's SVG layer."""
        return int(self.page.evaluate(_MEASUREMENTS_DRAWN_JS))

    def viewport_canvas(self) -> Any:
        return self.page.locator("[data-cy=viewport-pane] canvas").first

    def open_measurements_panel(self) -> Any:
        """Open the right-hand Measurements panel (if closed); returns its locator."""
        panel = self.page.locator("[data-cy=trackedMeasurements-panel]").first
        if not panel.is_visible():
            self.page.locator("[data-cy=trackedMeasurements-btn]").click()
        panel.wait_for(state="visible", timeout=30_000)
        return panel

    def measurements_panel_count(self) -> int | None:
        """N of the panel's "Measurements (N)" header; None when it is not shown."""
        header = self.page.locator("[data-cy=trackedMeasurements-panel]", has_text="Measurements (")
        if not header.count():
            return None
        text = header.first.inner_text()
        start = text.find("Measurements (") + len("Measurements (")
        digits = text[start : text.find(")", start)]
        return int(digits) if digits.isdigit() else None
