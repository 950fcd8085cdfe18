"""The spool and the header checks of the C-STORE handler, without a network or a database."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest
from dicom_helpers import STUDY, load, mammogram
from pydicom.uid import generate_uid

from inference.types import InputError
from node.config import NodeConfig
from node.dicom import intake, spool
from node.dicom.status import (
    CANNOT_UNDERSTAND_RANGE,
    OUT_OF_RESOURCES_RANGE,
    WARNING_COERCION,
    DimseStatus,
    is_success,
    is_transient_failure,
    status_name,
)

SERIES = "1.2.3.4"
SOP = "1.2.3.4.5"


@pytest.mark.parametrize(
    "uids",
    [
        ("../../x", SERIES, SOP),
        (STUDY, "1.2/../..", SOP),
        (STUDY, SERIES, "/etc/passwd"),
        (STUDY, SERIES, ""),
        (STUDY, SERIES, "1." + "1" * 70),
    ],
)
def test_spool_path_refuses_invalid_uids(uids: tuple[str, str, str], tmp_path: Path) -> None:
    with pytest.raises(spool.InvalidUIDError) as info:
        spool.spool_path(tmp_path, *uids)
    assert "../" not in str(info.value) and "passwd" not in str(info.value)  # the value is not echoed
    with pytest.raises(spool.InvalidUIDError):
        spool.write_instance(tmp_path / "spool", *uids, b"data")
    assert list(tmp_path.rglob("*")) == []


def test_spool_path_from_config_or_folder(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path)
    expected = tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    assert spool.spool_path(config, STUDY, SERIES, SOP) == expected
    assert spool.spool_path(tmp_path / "spool", STUDY, SERIES, SOP) == expected


def test_write_is_durable_and_a_resend_replaces_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = spool.os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(f"/proc/self/fd/{fd}").resolve().name)
        real_fsync(fd)

    monkeypatch.setattr(spool.os, "fsync", fsync)
    rel = spool.write_instance(tmp_path, STUDY, SERIES, SOP, b"first")
    assert str(rel) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert (tmp_path / rel).read_bytes() == b"first"
    # new folders' parents as they are made, the temp file before its rename, the folder after it
    assert synced[:2] == [tmp_path.name, STUDY] and synced[3] == SERIES and len(synced) == 4
    assert synced[2].startswith(f".{SOP}.dcm.") and synced[2].endswith(".tmp")

    spool.write_instance(tmp_path, STUDY, SERIES, SOP, b"second")
    assert (tmp_path / rel).read_bytes() == b"second"
    assert [p.name for p in (tmp_path / STUDY / SERIES).iterdir()] == [f"{SOP}.dcm"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_a_named_error(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(code, "full")

    monkeypatch.setattr(spool, "atomic_write_bytes", full)
    with pytest.raises(spool.SpoolFullError):
        spool.write_instance(tmp_path, STUDY, SERIES, SOP, b"x")


def test_other_os_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool, "atomic_write_bytes", broken)
    with pytest.raises(OSError) as info:
        spool.write_instance(tmp_path, STUDY, SERIES, SOP, b"x")
    assert not isinstance(info.value, spool.SpoolFullError)


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    spool.write_instance(tmp_path, STUDY, SERIES, SOP, b"kept")
    stale = tmp_path / STUDY / SERIES / f".{SOP}.dcm.abc123.tmp"
    stale.write_bytes(b"half")
    cut_off = spool.incoming_dir(tmp_path) / ".tmpk2x9_q.tmp"  # a receipt its process died in
    cut_off.write_bytes(b"half a dataset")
    assert spool.remove_stale_temp_files(tmp_path) == 2
    assert not stale.exists() and not cut_off.exists()
    assert (tmp_path / STUDY / SERIES / f"{SOP}.dcm").exists()


def _encoded(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize("syntax", ["explicit", "jpeg2000", "rle"])
def test_header_is_read_without_loading_pixel_data(syntax: str, tmp_path: Path) -> None:
    path = mammogram(tmp_path, syntax, transfer_syntax=syntax)
    data = _encoded(path)
    ds = intake.parse_encoded(data)
    header = intake.header_of(ds, data)
    assert (
        "PixelData" not in header
        and header.file_meta.TransferSyntaxUID == load(path).file_meta.TransferSyntaxUID
    )
    raw = ds.get_item(intake.PIXEL_DATA, keep_deferred=True)
    if len(data) > 2 * intake.HEADER_DEFER_BYTES:  # big pixel data stays unread (small ones are read)
        assert raw.value is None
    intake.check_pixel_data(ds, header, data, str(header.file_meta.TransferSyntaxUID), max_pixels=10**7)
    info = intake.classify(header)
    assert info.scorable and info.meta.study_instance_uid == STUDY


def test_pixel_checks_refuse_encapsulation_mismatch(tmp_path: Path) -> None:
    data = _encoded(mammogram(tmp_path, "native", transfer_syntax="explicit"))
    ds = intake.parse_encoded(data)
    header = intake.header_of(ds, data)
    with pytest.raises(intake.PixelDataError):  # native bytes announced as JPEG 2000
        intake.check_pixel_data(ds, header, data, "1.2.840.10008.1.2.4.90", max_pixels=10**7)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_check_uids_separates_missing_from_hostile(tmp_path: Path) -> None:
    ds = load(mammogram(tmp_path, "a"))
    del ds.SeriesInstanceUID
    with pytest.raises(InputError) as missing:
        intake.check_uids(ds)
    assert not isinstance(missing.value, spool.InvalidUIDError)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = "1.2.3.abc"
    with pytest.raises(spool.InvalidUIDError):
        intake.check_uids(ds)


def test_unparsable_bytes_are_an_input_error() -> None:
    buffer = io.BytesIO(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(InputError):
        intake.parse_encoded(buffer.getvalue())


def test_status_helpers() -> None:
    assert status_name(DimseStatus.OUT_OF_RESOURCES) == "OUT_OF_RESOURCES"
    peer_code = OUT_OF_RESOURCES_RANGE[-1]  # a peer's own out-of-resources code
    assert "Out of Resources" in status_name(peer_code)
    assert is_success(DimseStatus.SUCCESS) and is_success(WARNING_COERCION)
    assert not is_success(CANNOT_UNDERSTAND_RANGE[5])
    assert is_transient_failure(peer_code) and is_transient_failure(DimseStatus.PROCESSING_FAILURE)
    assert not is_transient_failure(DimseStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    assert not is_transient_failure(DimseStatus.INVALID_UID)


def test_spooled_files_are_private_to_the_service_account(tmp_path: Path) -> None:
    """Patient data: the spool file is readable by the node's user only."""
    from node.dicom.spool import write_instance

    rel = write_instance(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    assert ((tmp_path / rel).stat().st_mode & 0o777) == 0o600
