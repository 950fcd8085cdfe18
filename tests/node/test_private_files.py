"""Owner-only data: whatever umask `mammonode serve` is started with, its data folder, spool,
outbox, database and the database's WAL and SHM files are 0700 / 0600, and so is every folder
and file it writes there."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from peers import free_port, storescu, write_study
from serve_helpers import port_open, serve_env, wait_until

from inference.uids import derive_uid
from node.private_files import private_dir, private_file

MAMMONODE = Path(sys.executable).with_name("mammonode")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _open_umask() -> None:
    os.umask(0o022)  # what a shell or a container gives a process by default


def test_private_dir_and_file_are_made_owner_only_and_tighten_what_is_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        folder = private_dir(tmp_path / "a" / "b")
        made = private_file(folder / "db.sqlite")
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        (loose / "f").write_bytes(b"x")
        (loose / "f").chmod(0o644)
        private_dir(loose)
        private_file(loose / "f")
    finally:
        os.umask(old)
    assert (_mode(folder), _mode(made), made.stat().st_size) == (0o700, 0o600, 0)
    assert (_mode(loose), _mode(loose / "f")) == (0o700, 0o600)
    assert (loose / "f").read_bytes() == b"x"  # tightened, not truncated


@pytest.mark.slow
def test_serve_keeps_every_folder_and_file_of_its_data_owner_only(
    tmp_path: Path, onnx_test_model: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # an existing folder left open (an older release, a careless mkdir)
    port = free_port()
    env = serve_env(
        MAMMONODE_DATA_DIR=str(data),
        MAMMONODE_PORT=str(port),
        MAMMONODE_BIND_ADDRESS="127.0.0.1",
        MAMMONODE_MODEL_DIR=str(onnx_test_model),
        MAMMONODE_POLL_SECONDS="0.1",
        MAMMONODE_GRACE_SECONDS="0",
    )
    study = derive_uid("tests", "private-files")
    files = write_study(tmp_path / "study", patient_id="PRIVATE-1", study_uid=study)
    proc = subprocess.Popen(
        [MAMMONODE, "serve"],
        env=env,
        preexec_fn=_open_umask,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 120, "node did not start")
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-2000:]
        assert storescu(files, port).returncode == 0
        outbox = data / "outbox" / study
        wait_until(lambda: outbox.is_dir() and len(list(outbox.iterdir())) >= 6, 120, "no results")
        database = data / "mammonode.sqlite"
        named = [
            data,
            data / "spool",
            data / "outbox",
            database,
            Path(f"{database}-wal"),
            Path(f"{database}-shm"),
        ]
        written = sorted(p for p in data.rglob("*") if p not in named)
        assert written, "nothing was spooled or written"
        modes = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in named + written}
        expected = {
            str(p.relative_to(tmp_path)): oct(0o700 if p.is_dir() else 0o600) for p in named + written
        }
        assert modes == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
