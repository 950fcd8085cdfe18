"""The compose demo's viewer origin, run for real: Debian's nginx with ``deploy/ohif/nginx.conf``,
the credentials file ``deploy/ohif/start.sh`` writes, OHIF's built viewer and an Orthanc with its
DICOMweb plugin and a password, as the ``ohif`` and ``orthanc`` services wire them.

Only what a container would change is replaced in the configuration, each line found exactly once
(so the test breaks when the file changes shape): the port, the viewer's folder (``.ci/setup``
unpacks the same OHIF release the image holds), the paths of the mounted files, and Orthanc's
address. What is checked: ``/app-config.js`` is ours, not the release's; the viewer's routes are
its index page; ``/dicom-web/`` reaches Orthanc, which refuses anonymous requests, with the
credentials added by nginx; and the links Orthanc writes point back to the viewer's origin.
Not run: the ``ohif/app`` image itself (its nginx build and main configuration) and Docker's DNS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from deploy_files import DEPLOY, REPO, load_compose
from peers import Orthanc

from node.dicom.loopback import free_port

pytestmark = pytest.mark.peers

NGINX = "/usr/sbin/nginx"
OHIF_DIST = REPO / ".cache" / "ohif" / "3.12.10" / "dist"


def _rendered(conf: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert conf.count(old) == 1, f"nginx.conf must have {old!r} once"
        conf = conf.replace(old, new)
    return conf


def _main_conf(folder: Path, server: Path) -> str:
    """What the image's /etc/nginx/nginx.conf does around the server block, in ``folder``."""
    lines = [
        "user root;" if os.geteuid() == 0 else "",  # workers use this test's folder
        "daemon off;",
        f"pid {folder / 'nginx.pid'};",
        f"error_log {folder / 'error.log'};",
        "events {}",
        "http {",
        "include /etc/nginx/mime.types;",
        "access_log off;",
        *(
            f"{kind}_temp_path {folder / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        f"include {server};",
        "}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def viewer_origin(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> Iterator[tuple[str, Orthanc]]:
    """nginx serving the deploy configuration on a free port, in front of a password Orthanc."""
    if not os.access(NGINX, os.X_OK) or not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"{NGINX} or {OHIF_DIST.relative_to(REPO)} is missing: run .ci/setup")
    environment = load_compose()["services"]["ohif"]["environment"]
    pacs = orthanc(dicomweb=True, users={environment["ORTHANC_USER"]: "viewer-test-secret"})
    auth = tmp_path / "orthanc-auth.conf"
    subprocess.run(
        ["sh", str(DEPLOY / "ohif" / "start.sh"), "true"],
        env={
            "PATH": os.defpath,
            "ORTHANC_USER": environment["ORTHANC_USER"],
            "ORTHANC_PASSWORD": "viewer-test-secret",
            "OHIF_ORTHANC_AUTH_FILE": str(auth),
        },
        check=True,
        timeout=30,
    )
    port = free_port()
    server = _rendered(
        (DEPLOY / "ohif" / "nginx.conf").read_text(encoding="utf-8"),
        {
            "listen 8080;": f"listen 127.0.0.1:{port};",
            "root /usr/share/nginx/html;": f"root {OHIF_DIST};",
            "alias /etc/ohif/app-config.js;": f"alias {DEPLOY / 'ohif' / 'app-config.js'};",
            "include /tmp/orthanc-auth.conf;": f"include {auth};",
            "set $orthanc http://orthanc:8042;": f"set $orthanc http://127.0.0.1:{pacs.http_port};",
        },
    )
    (tmp_path / "server.conf").write_text(server, encoding="utf-8")
    main = tmp_path / "nginx.conf"
    main.write_text(_main_conf(tmp_path, tmp_path / "server.conf"), encoding="utf-8")
    process = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/app-config.js", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not answer"
                time.sleep(0.2)
        yield url, pacs
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), ""


def test_one_origin_serves_ohif_our_config_and_orthancs_dicomweb_with_its_credentials(
    viewer_origin: tuple[str, Orthanc], synth_root: Path
) -> None:
    url, pacs = viewer_origin
    status, body, kind = _get(f"{url}/app-config.js")
    assert (status, body) == (200, (DEPLOY / "ohif" / "app-config.js").read_bytes()) and "javascript" in kind
    index = (OHIF_DIST / "index.html").read_bytes()
    assert _get(f"{url}/")[:2] == (200, index)
    assert _get(f"{url}/viewer?StudyInstanceUIDs=1.2.3")[:2] == (200, index), "client routes are the app"

    path = sorted((synth_root / "train_images").rglob("*.dcm"))[0]
    pacs.upload(path)
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    assert _get(f"{pacs.url}/dicom-web/studies")[0] == 401, "Orthanc refuses anonymous requests"
    status, body, kind = _get(f"{url}/dicom-web/studies")
    assert status == 200 and "json" in kind, body[:500]
    (study,) = json.loads(body)
    assert study["0020000D"]["Value"] == [dataset.StudyInstanceUID]
    # Orthanc builds its links from the Host header, which nginx passes: they lead back here.
    assert study["00081190"]["Value"] == [f"{url}/dicom-web/studies/{dataset.StudyInstanceUID}"]
    status, body, _ = _get(
        f"{url}/dicom-web/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
        f"/instances/{dataset.SOPInstanceUID}/metadata"
    )
    assert status == 200, body[:500]
    assert json.loads(body)[0]["00080018"]["Value"] == [dataset.SOPInstanceUID]
