"""Small things a new user hits on the command line: one readable line instead of a traceback or
of silence, and the shared size parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from node.commands import app as cli
from node.commands._args import parse_size
from node.commands._progress import Bar
from node.commands.dicom import failure_lines
from node.dicom.sender import SendOutcome

MAMMONODE = Path(sys.executable).with_name("mammonode")


def _mammonode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    return subprocess.run(
        [str(MAMMONODE), *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


@pytest.mark.parametrize(
    ("text", "size"), [("1024x768", (1024, 768)), ("32X8192", (32, 8192)), (" 64x64 ", (64, 64))]
)
def test_parse_size_reads_rows_by_columns(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1024", "1024x", "x768", "10x20x30", "-64x64", "+64x64", "6.4x64", "²x64"])
def test_parse_size_refuses_what_is_not_rows_x_columns(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="expected HxW"):
        parse_size(text)


@pytest.mark.parametrize("text", ["31x64", "64x31", "8193x64", "0x0"])
def test_parse_size_refuses_sizes_out_of_range(text: str) -> None:
    with pytest.raises(typer.BadParameter, match=r"out of range 32\.\.8192"):
        parse_size(text)


def test_synth_into_a_non_empty_folder_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("an earlier run", encoding="utf-8")
    proc = _mammonode("synth", str(tmp_path), "--patients", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} exists and is not an empty folder: give a new or empty one"
    ]


def test_train_refuses_a_non_empty_out_unless_resume_or_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run")
    proc = _mammonode("train", str(tmp_path / "data"), "--out", str(out))
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {out} is not empty") and "--overwrite" in line
    assert (out / "last.pt").read_bytes() == b"an earlier run"

    import training.dispatch

    calls: list[Any] = []

    def fake_train(request: Any) -> Path:
        calls.append(request)
        return out / "model"

    monkeypatch.setattr(training.dispatch, "run_train", fake_train)
    for extra in (["--overwrite"], ["--resume", str(out / "last.pt")]):
        result = CliRunner().invoke(
            cli.app, ["train", str(tmp_path / "data"), "--out", str(out), *extra], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
    assert len(calls) == 2


def test_serve_without_destinations_warns_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.service

    class FakeNode:
        def __init__(self, config: Any) -> None:
            pass

        def serve_forever(self) -> None:
            pass

    monkeypatch.setattr(node.service, "Node", FakeNode)
    env = {"MAMMONODE_DATA_DIR": str(tmp_path), "MAMMONODE_DESTINATIONS": ""}
    result = CliRunner().invoke(cli.app, ["serve"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning: no destinations configured: results stay in the outbox" in result.stderr.splitlines()

    env["MAMMONODE_DESTINATIONS"] = "PACS@127.0.0.1:11112"
    result = CliRunner().invoke(cli.app, ["serve"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_send_to_a_closed_port_is_one_line_with_the_count(tmp_path: Path) -> None:
    import socket

    from peers import LOOPBACK

    from training.synth.synthesise import synthesise_studies

    files = [str(p) for study in synthesise_studies(tmp_path / "in", seed=1) for p in study.files]
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]  # bound, not listening: the connection is refused
        proc = _mammonode("send", *files, "--to", f"PACS@{LOOPBACK}:{port}")
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: PACS@{LOOPBACK}:{port}: ")
    assert line.endswith(f"({len(files)} files not sent)")
    assert f"sent 0 of {len(files)} file(s)" in proc.stdout


def test_failure_lines_keep_one_line_per_file_for_their_own_failures() -> None:
    outcomes = [
        SendOutcome(Path("a.dcm"), 0x0000, "Success"),
        SendOutcome(Path("b.dcm"), 0xA700, "Out of resources", permanent=False),
        SendOutcome(Path("c.dcm"), None, "not sent: c.dcm is not DICOM", permanent=True),
        SendOutcome(Path("d.dcm"), None, "association lost before this file was sent"),
        SendOutcome(Path("e.dcm"), None, "association lost before this file was sent"),
    ]
    assert failure_lines(outcomes, "PACS@h:1") == [
        "error: b.dcm: Out of resources",
        "error: c.dcm: not sent: c.dcm is not DICOM",
        "error: PACS@h:1: association lost before this file was sent (2 files not sent)",
    ]


def test_progress_bar_only_when_enabled_and_counts_files(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = Bar("score", enabled=False)
    quiet.start(3)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().err == ""

    shown = Bar("score", enabled=True)
    shown.start(3)
    for _ in range(3):
        shown.update()
    shown.close()
    assert "3/3" in capsys.readouterr().err


def test_progress_bar_without_tqdm_is_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = Bar("score", enabled=True)
    bar.start(2)
    bar.update()
    bar.close()


def test_export_defaults_agree_with_the_exporters() -> None:
    from inference.backends import tensorrt_build as export_tensorrt
    from node.commands import export
    from training import onnx_export

    assert export.DEFAULT_OPSET == onnx_export.DEFAULT_OPSET
    assert export.DEFAULT_MAX_BATCH == export_tensorrt.DEFAULT_MAX_BATCH
    assert export.DEFAULT_CALIBRATION_IMAGES == export_tensorrt.DEFAULT_CALIBRATION_IMAGES
