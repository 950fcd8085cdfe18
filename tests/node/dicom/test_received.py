"""A received instance reaches the checks and the spool without copies (node.dicom.received): as
a file pynetdicom wrote while receiving, moved into the spool, or as head and dataset in memory,
written with one writev; either way the spooled file holds the dataset exactly as sent."""

from __future__ import annotations

import errno
import io
import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from dicom_helpers import NodeFactory, instances, mammogram, scu_store
from peers import LOOPBACK
from pynetdicom import _config as pynetdicom_config

from node.dicom import intake, spool
from node.dicom.received import IncomingFile, Part10, ReceivedFile, receipt_failure
from node.dicom.status import DimseStatus

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def _split(path: Path) -> tuple[bytes, bytes]:
    """A Part 10 file's head (preamble, DICM, file meta) and its dataset."""
    data = path.read_bytes()
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]  # (0002,0000) UL, explicit VR LE
    end = 132 + 12 + group_length
    return data[:end], data[end:]


def _receipt(data: intake.Received, sop_instance: str) -> intake.Receipt:
    return intake.examine(
        data,
        transfer_syntax="1.2.840.10008.1.2.4.90",
        context_sop_class="1.2.840.10008.5.1.4.1.1.1.2",
        affected_sop_instance=sop_instance,
        max_pixels=10**7,
    )


def test_the_checks_read_head_and_dataset_or_a_file_as_they_read_the_joined_bytes(tmp_path: Path) -> None:
    path = mammogram(tmp_path, "a", transfer_syntax="jpeg2000")
    head, body = _split(path)
    whole = _receipt(path.read_bytes(), _sop(path))
    parts = _receipt(Part10(head, body), _sop(path))
    received = ReceivedFile.at(path)
    try:
        from_file = _receipt(received, _sop(path))
    finally:
        received.close()
    for receipt in (parts, from_file):
        assert receipt.uids == whole.uids and receipt.known == whole.known
        assert receipt.info is not None and whole.info is not None
        assert receipt.info.meta == whole.info.meta and receipt.info.scorable == whole.info.scorable
    assert len(Part10(head, body)) == len(received) == path.stat().st_size


def test_a_cut_file_is_refused_as_cut_pixel_data_whatever_its_form(tmp_path: Path) -> None:
    path = mammogram(tmp_path, "a", transfer_syntax="jpeg2000")
    head, body = _split(path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(head + body[: len(body) - 500])
    for data in (cut.read_bytes(), Part10(head, body[: len(body) - 500]), ReceivedFile.at(cut)):
        with pytest.raises(intake.PixelDataError):
            _receipt(data, _sop(path))


def test_head_and_dataset_are_written_as_one_file(tmp_path: Path) -> None:
    rel = spool.write_instance(tmp_path, STUDY, SERIES, SOP, Part10(b"HEAD", b"DATASET" * 1000))
    stored = tmp_path / rel
    assert stored.read_bytes() == b"HEAD" + b"DATASET" * 1000
    assert stored.stat().st_mode & 0o777 == 0o600


def test_a_received_file_is_synced_then_moved_into_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "incoming.dcm"
    source.write_bytes(b"DICOM BYTES")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(f"/proc/self/fd/{fd}").resolve().name)
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", fsync)
    rel = spool.write_instance(tmp_path / "spool", STUDY, SERIES, SOP, ReceivedFile.at(source))
    stored = tmp_path / "spool" / rel
    assert stored.read_bytes() == b"DICOM BYTES" and not source.exists()
    assert stored.stat().st_mode & 0o777 == 0o600
    # the file's data before it takes its name, then the folder that now names it
    assert synced[-2:] == ["incoming.dcm", SERIES]


def test_across_file_systems_a_received_file_is_copied_through_a_synced_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "incoming.dcm"
    source.write_bytes(b"X" * 100_000)
    real_replace = Path.replace

    def replace(self: Path, target: Path) -> Path:
        if self == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    rel = spool.write_instance(tmp_path / "spool", STUDY, SERIES, SOP, ReceivedFile.at(source))
    stored = tmp_path / "spool" / rel
    assert stored.read_bytes() == b"X" * 100_000
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temp file left
    assert source.exists()  # pynetdicom removes its own temporary file after the handler


@pytest.mark.parametrize("into_files", [True, False], ids=["received-into-files", "received-in-memory"])
def test_the_spooled_file_holds_the_dataset_as_sent(
    into_files: bool, node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_scp()
    assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET  # start_scp asks pynetdicom for files
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", into_files)
    sent = [
        mammogram(tmp_path, f"{ts}", transfer_syntax=ts, number=n)
        for n, ts in enumerate(("jpeg2000", "explicit"))
    ]
    assert scu_store(node.port, sent) == [DimseStatus.SUCCESS] * 2
    rows = {row.sop_instance_uid: row for row in instances(node.sessions)}
    for path in sent:
        stored = node.config.spool_dir / rows[_sop(path)].spool_path
        assert _split(stored)[1] == _split(path)[1]  # the dataset byte for byte
        assert rows[_sop(path)].size_bytes == stored.stat().st_size
        assert stored.stat().st_mode & 0o777 == 0o600
    assert all(r.association_id is not None for r in rows.values())


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _capture(node_port: int, path: Path) -> bytes:
    """What an SCU sends to store ``path``: a pass-through proxy to the node records it."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        captured = bytearray()

        def relay() -> None:
            client, _ = listener.accept()
            upstream = socket.create_connection((LOOPBACK, node_port))
            back = threading.Thread(target=_pump, args=(upstream, client, None))
            back.start()
            _pump(client, upstream, captured)
            back.join()

        thread = threading.Thread(target=relay)
        thread.start()
        assert scu_store(listener.getsockname()[1], [path]) == [DimseStatus.SUCCESS]
        thread.join(30)
    return bytes(captured)


def _pump(source: socket.socket, sink: socket.socket, keep: bytearray | None) -> None:
    while chunk := source.recv(65536):
        if keep is not None:
            keep.extend(chunk)
        sink.sendall(chunk)
    sink.close()


def test_a_dataset_cut_off_by_a_dropped_connection_leaves_no_file(
    node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_scp()
    big = mammogram(tmp_path, "big", transfer_syntax="explicit")
    stream = _capture(node.port, big)
    incoming = spool.incoming_dir(node.config)  # where the node has pynetdicom receive into
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # the process's temporary folder
    request_length = struct.unpack_from(">I", stream, 2)[0] + 6  # the A-ASSOCIATE-RQ PDU
    with socket.create_connection((LOOPBACK, node.port)) as peer:
        peer.sendall(stream[:request_length])
        assert peer.recv(65536)[0] == 0x02  # A-ASSOCIATE-AC
        peer.sendall(stream[request_length : len(stream) // 2])  # the command and half the dataset
        deadline = time.monotonic() + 10
        while not list(incoming.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.match(".*.tmp") for p in incoming.iterdir()] == [True]  # being received into a file
        assert list(elsewhere.iterdir()) == []
    deadline = time.monotonic() + 10
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(incoming.iterdir()) == [] and list(elsewhere.iterdir()) == []
    assert len(instances(node.sessions)) == 1  # the captured store only


class _FullDisk(io.BytesIO):
    """A temporary file whose disk fills after ``room`` bytes."""

    def __init__(self, name: str, room: int) -> None:
        super().__init__()
        self.name, self.room = name, room

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_dataset_whose_disk_fills_as_it_arrives_is_dropped_and_its_failure_kept_for_the_handler(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".tmpabc.tmp"
    path.write_bytes(b"\x00" * 132)  # what the receipt had written when the disk filled
    incoming = IncomingFile(_FullDisk(str(path), room=200))  # type: ignore[arg-type]
    assert incoming.write(b"\x00" * 128) == 128 and incoming.file.flush() is None
    assert incoming.write(b"x" * 100) == 100  # the disk is full: dropped, not raised into pynetdicom
    assert incoming.failed and not path.exists()  # its space given back at once
    assert incoming.write(b"rest of the dataset") == 19
    incoming.file.flush()
    incoming.close()
    failure = receipt_failure(path)
    assert failure is not None and failure.errno == errno.ENOSPC
    assert receipt_failure(path) is None  # asked once
    assert isinstance(spool.spool_error(failure), spool.SpoolFullError)
    assert spool.spool_error(OSError(errno.EIO, "I/O error")).errno == errno.EIO
