"""`mammonode echo` and `mammonode send`, run as the real command against real SCPs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_helpers import NODE_AE, load, mammogram
from peers import LOOPBACK, free_port, storage_scp

PACS_AE = "PACS"


def mammonode(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAMMONODE_AE_TITLE": "CLINODE"}
    return subprocess.run(
        [sys.executable, "-m", "node.commands.app", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_echo(tmp_path: Path) -> None:
    with storage_scp(PACS_AE) as pacs:
        ok = mammonode("echo", LOOPBACK, str(pacs.port), "--aec", PACS_AE, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "SUCCESS" in ok.stdout

    down = mammonode("echo", LOOPBACK, str(free_port()), "--aec", PACS_AE, cwd=tmp_path)
    assert down.returncode == 1
    assert (
        down.stderr.strip().startswith("error: C-ECHO to PACS@")
        and len(down.stderr.strip().splitlines()) == 1
    )


@pytest.mark.slow
def test_send_folder_with_a_stray_file(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    nested = folder / "nested"
    nested.mkdir(parents=True)
    files = [
        mammogram(folder, "lcc", transfer_syntax="jpeg2000"),
        mammogram(nested, "rcc", laterality="R", number=2),
    ]
    (folder / "notes.txt").write_text("not DICOM", encoding="utf-8")
    with storage_scp(PACS_AE) as pacs:
        run = mammonode("send", str(folder), "--to", f"{PACS_AE}@{LOOPBACK}:{pacs.port}", cwd=tmp_path)
        received = pacs.wait_for(2)
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and "notes.txt" in line
    assert "sent 2 of 3 file(s)" in run.stdout
    assert {r.dataset.SOPInstanceUID for r in received} == {load(f).SOPInstanceUID for f in files}
    assert {r.calling_ae for r in received} == {"CLINODE"}  # the config's AE title (environment)

    with storage_scp(PACS_AE) as pacs:
        run = mammonode(
            "send", str(files[0]), "--to", f"{PACS_AE}@{LOOPBACK}:{pacs.port}", "--aet", NODE_AE, cwd=tmp_path
        )
        [one] = pacs.wait_for(1)
    assert run.returncode == 0, run.stderr
    assert one.calling_ae == NODE_AE
