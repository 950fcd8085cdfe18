"""Issue 11's "Tests scrape the real endpoint during an e2e run": `mammonode serve` with
``metrics_port`` set, dcmtk ``storescu`` as the modality and a real Orthanc as the PACS.

The node runs as its own process, so its counters start at zero and every figure is exact. The
endpoint is scraped before the study arrives, while it is being scored and sent, and after;
the exposition is parsed with prometheus_client's parser. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from peers import LOOPBACK, OrthancFactory, free_port, storescu
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from inference.manifest import load_manifest

pytestmark = [pytest.mark.peers, pytest.mark.dcmtk, pytest.mark.slow]

MAMMONODE = Path(sys.executable).with_name("mammonode")
NODE_AE = "MAMMONODE"
MODALITY_AE = "MODALITY"
RESULTS_PER_STUDY = 6
"""4 CAM captures, the score report and the Mammography CAD SR of a 4-view study."""
TIMEOUT = 120.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> tuple[Samples, str]:
    """Every sample of ``/metrics`` by (sample name, labels), and the exposition text."""
    status, text = http_get(f"{base}/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


@contextmanager
def serve(config: Path, base: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``mammonode serve --config FILE`` until ``/healthz`` answers; killed on exit if still up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(MAMMONODE), "serve", "--config", str(config)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            try:
                if http_get(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.3)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def wait_for(base: str, name: str, labels: dict[str, str], target: float) -> tuple[Samples, str]:
    """Scrape until the sample reaches ``target``; the last scrape."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples, text = scrape(base)
        if (value(samples, name, **labels) or 0) >= target:
            return samples, text
        assert time.monotonic() < deadline, f"{name}{labels} never reached {target}:\n{text}"
        time.sleep(0.3)


def test_the_metrics_endpoint_follows_a_study_from_modality_to_pacs(
    db_url: str,
    tmp_path: Path,
    test_model: Path,
    orthanc: OrthancFactory,
    j2k_study: list[Path],
) -> None:
    port, metrics_port = free_port(), free_port()
    pacs = orthanc({"mammonode": (NODE_AE, LOOPBACK, port)})
    settings: dict[str, Any] = {
        "ae_title": NODE_AE,
        "port": port,
        "bind_address": LOOPBACK,
        "data_dir": str(tmp_path / "node-data"),
        "database_url": db_url,
        "model_dir": str(test_model),
        "allowed_aes": MODALITY_AE,
        "destinations": pacs.destination,
        "grace_seconds": 0.5,
        "study_quiet_seconds": 30.0,
        "poll_seconds": 0.2,
        "metrics_port": metrics_port,
        "metrics_bind_address": LOOPBACK,
    }
    config = tmp_path / "node.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    base = f"http://{LOOPBACK}:{metrics_port}"
    manifest = load_manifest(test_model)
    patient_id = str(dcmread(j2k_study[0], stop_before_pixels=True).PatientID)

    with serve(config, base, tmp_path / "serve.log") as process:
        idle, _ = scrape(base)
        assert value(idle, "mammonode_instances_received_total") == 0
        assert value(idle, "mammonode_jobs", state="pending") == 0
        assert http_get(f"{base}/readyz")[0] == 200

        proc = storescu(j2k_study, port, aec=NODE_AE, aet=MODALITY_AE, syntax="-xv")
        assert proc.returncode == 0, proc.stderr
        flowing, _ = scrape(base)  # received, and still within the grace period or scoring
        assert value(flowing, "mammonode_instances_received_total") == 4
        assert (
            value(flowing, "mammonode_transmissions_total", outcome="sent", destination_kind="dicom") or 0
        ) < 6

        sent = {"outcome": "sent", "destination_kind": "dicom"}
        done, text = wait_for(base, "mammonode_transmissions_total", sent, RESULTS_PER_STUDY)
        pacs.wait_for_instances(RESULTS_PER_STUDY, timeout=TIMEOUT)
        readyz = http_get(f"{base}/readyz")
        healthz = http_get(f"{base}/healthz")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0

    assert value(done, "mammonode_associations_total", result="accepted", reason="none") == 1
    assert value(done, "mammonode_instances_received_total") == 4
    assert labels_of(done, "mammonode_instances_refused_total") == []
    assert value(done, "mammonode_scoring_duration_seconds_count") == 1
    assert 0 < (value(done, "mammonode_scoring_duration_seconds_sum") or 0) < TIMEOUT
    assert value(done, "mammonode_scoring_duration_seconds_bucket", le="+Inf") == 1
    assert value(done, "mammonode_images_scored_total") == 4
    assert (value(done, "mammonode_scoring_images_per_second") or 0) > 0
    for outcome in ("failed", "dead"):
        assert value(done, "mammonode_transmissions_total", outcome=outcome, destination_kind="dicom") == 0
    assert value(done, "mammonode_database_up") == 1
    assert value(done, "mammonode_jobs", state="pending") == 0  # the queue is back to empty
    assert value(done, "mammonode_jobs", state="done") == 1
    assert value(done, "mammonode_oldest_pending_job_age_seconds") == 0
    assert value(done, "mammonode_studies", state="scored") == 1
    assert value(done, "mammonode_outbox_transmissions", state="sent") == RESULTS_PER_STUDY
    assert labels_of(done, "mammonode_model_info") == [
        {
            "name": manifest.name,
            "version": manifest.version,
            "weights_sha256": manifest.weights_sha256,
            "backend": "torch",
        }
    ]
    assert patient_id not in text and patient_id not in readyz[1]
    assert healthz == (200, "ok\n")
    assert readyz[0] == 200
    checks = json.loads(readyz[1])["checks"]
    assert {name: check["state"] for name, check in checks.items()} == dict.fromkeys(
        ("database", "spool", "model", "backlog"), "ok"
    )
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert f"metrics and health on {base} (/metrics, /healthz, /readyz)" in log
