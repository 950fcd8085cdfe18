"""The bench's network sections against real peers: ingest (dcmtk's storescp and the node as a
`mammonode serve` process, same files, same run) and a burst of studies through `serve` to a
real Orthanc; a missing tool gives a one-line reason instead of figures."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from inference import resolve_model_dir
from node.tools import bench_burst, bench_ingest, bench_peers
from node.tools.bench_burst import BurstSettings, format_burst, run_burst
from node.tools.bench_ingest import (
    TUNED_PDU,
    IngestSettings,
    add_ingest,
    format_ingest,
    format_ingest_ratios,
    run_ingest,
)
from node.tools.bench_peers import copy_studies, dcmtk_tool


@pytest.mark.dcmtk
@pytest.mark.slow
def test_ingest_times_storescp_and_the_node_on_the_same_files(j2k_study: list[Path], tmp_path: Path) -> None:
    ingest = run_ingest(j2k_study, tmp_path, IngestSettings(rounds=2, copies=2))
    assert ingest["files"] == 8 and ingest["rounds"] == 2
    sent = sorted((tmp_path / "files").rglob("*.dcm"))
    assert ingest["megabytes"] == pytest.approx(sum(p.stat().st_size for p in sent) / 1e6, abs=1e-3)
    receivers = ingest["receivers"]
    assert list(receivers) == ["storescp", "node"]
    assert receivers["storescp"]["command"] == f"storescp +B +xa -pdu {TUNED_PDU}"
    assert not receivers["storescp"]["durable"] and receivers["node"]["durable"]
    assert receivers["node"]["max_pdu"] == TUNED_PDU
    for figures in receivers.values():
        assert len(figures["seconds"]) == 2 and all(0 < s < 60 for s in figures["seconds"])
        assert figures["best_seconds"] == min(figures["seconds"]) <= figures["median_seconds"]
        assert figures["instances_per_second"] == pytest.approx(8 / figures["median_seconds"])

    report: dict[str, Any] = {"ratios": {}, "targets": {"met": {}}}
    add_ingest(report, ingest)
    tuned = receivers["storescp"]["median_seconds"] / receivers["node"]["median_seconds"]
    assert report["ratios"]["ingest_node_vs_storescp"] == pytest.approx(tuned)
    assert report["targets"]["met"]["ingest_vs_storescp"] == (tuned >= 1.0)
    text = "\n".join(format_ingest(ingest) + format_ingest_ratios(ingest))
    assert "storescp +B +xa -pdu 131072 (no fsync)" in text and "node (serve), max PDU 131072" in text
    assert f"{tuned:.2f}x" in text and "target >= 1.0x" in text


def test_copies_are_new_studies_with_the_same_pixel_bytes(j2k_study: list[Path], tmp_path: Path) -> None:
    copies = copy_studies(j2k_study, tmp_path, 2, "test")
    assert len({c.study_uid for c in copies}) == 2
    originals = [dcmread(p) for p in j2k_study]
    uids: set[str] = set()
    for copy in copies:
        for original, path in zip(originals, copy.files, strict=True):
            ds = dcmread(path)
            assert ds.StudyInstanceUID == copy.study_uid != original.StudyInstanceUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert ds.PixelData == original.PixelData
            uids.add(ds.SOPInstanceUID)
    assert len(uids) == 8


def _no_tools(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Nothing in the usual folders, and only ``path`` on PATH."""
    monkeypatch.setattr(bench_peers, "DCMTK_FOLDERS", ())
    monkeypatch.setattr(bench_peers, "ORTHANC_BINARIES", ())
    monkeypatch.setenv("PATH", path)
    dcmtk_tool.cache_clear()


def test_pynetdicom_scripts_of_the_same_names_are_not_taken_for_dcmtk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    venv_bin = str(Path(sys.executable).parent)
    assert shutil.which("storescp", path=venv_bin)  # pynetdicom's app, shadowing dcmtk's on PATH
    try:
        _no_tools(monkeypatch, venv_bin)
        assert dcmtk_tool("storescp") is None
    finally:
        monkeypatch.undo()
        dcmtk_tool.cache_clear()
    assert dcmtk_tool("storescp") == Path("/usr/bin/storescp")


def test_a_missing_tool_is_a_one_line_reason(
    j2k_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        _no_tools(monkeypatch, str(tmp_path))
        ingest = run_ingest(j2k_study, tmp_path / "ingest", IngestSettings(rounds=1))
        burst = run_burst(j2k_study, resolve_model_dir(None), tmp_path / "burst", BurstSettings(studies=1))
    finally:
        monkeypatch.undo()
        dcmtk_tool.cache_clear()
    assert list(ingest) == ["unavailable"] and "storescp, storescu not found" in ingest["unavailable"]
    assert format_ingest(ingest) == [f"ingest: unavailable: {ingest['unavailable']}"]
    assert format_ingest_ratios(ingest) == ["  ingest vs storescp: not measured"]
    assert list(burst) == ["unavailable"] and "Orthanc not found" in burst["unavailable"]
    assert format_burst(burst) == [f"burst: unavailable: {burst['unavailable']}"]
    assert not (tmp_path / "ingest").exists() and not (tmp_path / "burst").exists()


def test_files_storescu_cannot_send_are_a_reason(tmp_path: Path, j2k_study: list[Path]) -> None:
    ds = dcmread(j2k_study[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: storescu 3.6.7 has no flag for it
    ds.save_as(tmp_path / "ht.dcm")
    reason = bench_ingest.unavailable_reason([tmp_path / "ht.dcm"])
    assert reason is not None and "storescu cannot send" in reason and "High-Throughput JPEG 2000" in reason


@pytest.mark.peers
@pytest.mark.slow
def test_burst_of_two_studies_through_serve_to_orthanc(j2k_study: list[Path], tmp_path: Path) -> None:
    burst = run_burst(j2k_study, resolve_model_dir(None), tmp_path, BurstSettings(studies=2))
    assert "failed" not in burst, burst.get("failed")
    assert burst["studies"] == 2 and burst["images_per_study"] == 4 and burst["image_size"] == [384, 288]
    assert burst["results_per_study"] >= 5  # a CAM capture per view and the SR
    assert burst["studies_per_hour"] == pytest.approx(2 * 3600 / burst["seconds"])
    lat = burst["latency_seconds"]
    assert len(burst["latencies"]) == 2
    # a study is ready after the node's grace period, so nothing arrives sooner
    assert burst["node"]["grace_seconds"] <= min(burst["latencies"])
    assert lat["p50"] <= lat["p95"] <= lat["max"] <= burst["seconds"]
    rss = burst["rss_megabytes"]
    assert 50 < rss["idle_before"] <= rss["peak"] and rss["idle_after"] <= rss["peak"]
    text = "\n".join(format_burst(burst))
    assert "studies per hour" in text and "p95" in text and "peak" in text


@pytest.mark.peers
def test_a_node_that_cannot_start_fails_the_burst_in_one_line(j2k_study: list[Path], tmp_path: Path) -> None:
    assert bench_burst.unavailable_reason() is None
    burst = run_burst(j2k_study, tmp_path / "no-model", tmp_path, BurstSettings(studies=1))
    assert list(burst) == ["failed"] and "mammonode serve exited" in burst["failed"]
    assert "\n" not in format_burst(burst)[0]
