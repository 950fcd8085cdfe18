"""The durable spool: ``spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

Paths are built only from validated UIDs (digits and dots), so hostile tag text such as
``../../x`` can never name a file outside the spool. A file is written through a temporary file
in its final folder, synced, renamed into place and the folder synced (a file the SCP received
into is synced where it is and renamed, or copied so across file systems), so once the SCP
commits the instance's row and answers Success the bytes survive a crash or power loss
(invariant 1).
A resend of the same instance rewrites the same path atomically, so duplicates are idempotent.
The worker reads files back through :func:`read_spooled`, which checks each is the one its row
names; :func:`read_and_prepare` is that read plus preprocessing, run in a pixel-pool child.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path, PurePosixPath

from pydicom.dataset import Dataset

from inference import (
    ImageMeta,
    InputError,
    MammoNodeError,
    PreparedImage,
    PreprocessConfig,
    is_valid_uid,
    prepare_image,
    read_dataset,
    read_meta,
)
from inference import atomic_write_bytes as atomic_write_one
from node.config import NodeConfig
from node.dicom.received import Part10, Received, ReceivedFile
from node.private_files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE

log = logging.getLogger(__name__)

SUFFIX = ".dcm"
_TEMP_GLOB = ".*.tmp"  # what atomic_write_bytes leaves behind if the process dies mid-write
_INCOMING = ".incoming"  # where the SCP receives datasets, its files named like _TEMP_GLOB
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP})


class SpoolError(MammoNodeError):
    """An instance cannot be put into the spool."""


class InvalidUIDError(SpoolError):
    """A UID meant for a spool path is not a valid DICOM UID (hostile or corrupt tag text)."""


class SpoolFullError(SpoolError):
    """The spool's file system is full or over quota; the SCP answers Out of Resources."""


def spool_relpath(study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
    """The path of an instance relative to the spool folder (what ``Instance.spool_path`` stores).

    Raises :class:`InvalidUIDError` naming the first invalid UID; its value is not echoed, since
    it may be arbitrary text from the network.
    """
    for name, uid in (
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
        ("SOPInstanceUID", sop_uid),
    ):
        if not is_valid_uid(uid):
            raise InvalidUIDError(f"invalid {name}: not a DICOM UID")
    return PurePosixPath(study_uid, series_uid, sop_uid + SUFFIX)


def spool_root(config_or_root: NodeConfig | Path) -> Path:
    return config_or_root.spool_dir if isinstance(config_or_root, NodeConfig) else Path(config_or_root)


def incoming_dir(config_or_root: NodeConfig | Path) -> Path:
    """The folder, inside the spool (one file system: files are renamed into place), where the SCP
    receives datasets (:func:`node.dicom.received.receive_into`); created private."""
    folder = spool_root(config_or_root) / _INCOMING
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    return folder


def spool_path(config_or_root: NodeConfig | Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """The absolute file of an instance in the spool of ``config_or_root`` (a config or a folder)."""
    return spool_root(config_or_root) / spool_relpath(study_uid, series_uid, sop_uid)


def write_instance(
    config_or_root: NodeConfig | Path, study_uid: str, series_uid: str, sop_uid: str, data: Received
) -> PurePosixPath:
    """Write ``data`` (a DICOM Part 10 file: bytes, its head and dataset, or a received file, which
    is moved) durably to its spool path.

    Returns the path relative to the spool. Raises :class:`InvalidUIDError` for a bad UID,
    :class:`SpoolFullError` when the disk is full or over quota; other OS errors propagate. An
    existing file of the same instance is replaced atomically (a resend).
    """
    root = spool_root(config_or_root)
    rel = spool_relpath(study_uid, series_uid, sop_uid)
    path = root.joinpath(*rel.parts)
    try:
        _make_dirs_durably(root, path.parent)
        atomic_write_bytes(path, data, mode=PRIVATE_FILE_MODE)  # patient data
        fsync_dir(path.parent)
    except OSError as exc:
        raise spool_error(exc) from exc
    return rel


def spool_error(exc: OSError) -> Exception:
    """What a failed write into the spool's file system raises: :class:`SpoolFullError` when the
    disk is full or over quota (the SCP answers Out of Resources), else the OS error itself."""
    if exc.errno in _DISK_FULL:
        return SpoolFullError(f"spool file system is full: {os.strerror(exc.errno or 0)}")
    return exc


def write_in_background(
    config_or_root: NodeConfig | Path, study_uid: str, series_uid: str, sop_uid: str, data: Received
) -> Future[PurePosixPath]:
    """:func:`write_instance` in a new thread; its result or exception arrives in the future.

    The SCP records the instance meanwhile and commits once the file is durable, so the write and
    fsync overlap the database work. A thread per call (about 0.1 ms next to a multi-megabyte
    write and fsync) rather than a pool, which would outlive the server or bound the
    associations writing at once.
    """
    future: Future[PurePosixPath] = Future()

    def run() -> None:
        try:
            future.set_result(write_instance(config_or_root, study_uid, series_uid, sop_uid, data))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler
            future.set_exception(exc)

    threading.Thread(target=run, name="mammonode-spool-write", daemon=True).start()
    return future


def atomic_write_bytes(path: Path, data: Received, *, mode: int) -> None:
    """Write via a synced temp file in the same folder and a rename (as
    :func:`inference.atomic_write_bytes`); a :class:`Part10` goes out in one ``writev`` of its
    pieces, so the received dataset is never copied to join it to its head, and a
    :class:`ReceivedFile` is moved (:func:`_adopt`)."""
    if isinstance(data, ReceivedFile):
        _adopt(data.path, path, mode)
        return
    if not isinstance(data, Part10):
        atomic_write_one(path, data, mode=mode)
        return
    parts = data.parts

    def write(fd: int) -> None:
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        while views:  # writev may write less than asked (signals, > 2 GiB)
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if views:
                views[0] = views[0][written:]

    _replace_durably(path, mode, write)


def _adopt(source: Path, path: Path, mode: int) -> None:
    """Move ``source`` to ``path`` durably: synced first, then renamed on the same file system, so
    ``path`` never names a file whose data are not on disk (it may name a good earlier copy, a
    resend's); across file systems copied through a synced temp file in ``path``'s folder."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        source.replace(path)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise

    def copy(fd: int) -> None:
        with source.open("rb") as src:
            while os.sendfile(fd, src.fileno(), None, 1 << 30):
                pass

    _replace_durably(path, mode, copy)


def _replace_durably(path: Path, mode: int, write: Callable[[int], None]) -> None:
    """Make ``path`` by ``write`` into a synced temp file in its folder, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        write(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    os.close(fd)
    Path(tmp).replace(path)


def _make_dirs_durably(root: Path, folder: Path) -> None:
    """Create ``folder`` (below ``root``) level by level, syncing each parent after a creation,
    so the new directory entries are on disk before a file in them is acknowledged."""
    root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    missing: list[Path] = []
    current = folder
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for level in reversed(missing):
        try:
            level.mkdir(mode=PRIVATE_DIR_MODE)  # patient data
        except FileExistsError:
            continue  # another association created it meanwhile
        fsync_dir(level.parent)


def fsync_dir(folder: Path) -> None:
    """Make the directory entries of ``folder`` durable (a rename or creation in it).

    I/O errors propagate: a spool whose directory cannot be synced cannot promise durability, so
    the SCP must not answer Success. File systems that do not support syncing a directory at all
    (EINVAL) are accepted; there the file's own fsync is all there is.
    """
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def remove_stale_temp_files(config_or_root: NodeConfig | Path) -> int:
    """Delete temporary files left by writes interrupted by a crash, and datasets whose receipt it
    cut off (:func:`incoming_dir`); returns how many.

    Call at start, before the SCP listens: a temp file is never referenced by a row, and a
    running write's temp file must not be removed.
    """
    root = spool_root(config_or_root)
    if not root.is_dir():
        return 0
    count = 0
    for tmp in root.rglob(_TEMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            count += 1
    if count:
        log.info("removed %d interrupted spool write(s)", count)
    return count


def read_spooled(source: tuple[Path, str], study_uid: str) -> tuple[Dataset, ImageMeta]:
    """Read a spooled file (``(path, SOP Instance UID)``) and check it is the one its row names."""
    path, sop_instance_uid = source
    ds = read_dataset(path)
    meta = read_meta(ds)
    if meta.sop_instance_uid != sop_instance_uid or meta.study_instance_uid != study_uid:
        raise InputError("spooled file does not match its database row")
    return ds, meta


def read_and_prepare(source: tuple[Path, str], study_uid: str, config: PreprocessConfig) -> PreparedImage:
    """The decode workers' task for one instance: :meth:`Pipeline.prepare` of the spooled file."""
    return prepare_image(*read_spooled(source, study_uid), config)
