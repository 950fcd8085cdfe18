"""A received instance, as the receipt checks read it and the spool stores it, without copies.

The SCP has pynetdicom write each C-STORE's dataset to a file as its PDUs arrive
(``STORE_RECV_CHUNKED_DATASET``, see :func:`node.dicom.scp.start_scp`): :class:`ReceivedFile`.
The checks parse its header from the file and look at the pixel data's item headers through a
read-only memory map, and the spool renames the file into place (:func:`node.dicom.spool.
write_instance`), so the node never holds the image in its own memory. Received in memory
instead (pynetdicom's default), the dataset sits in one buffer and ``event.encoded_dataset()``
would copy all of it to put the file meta in front; :class:`Part10` keeps the two pieces apart,
and the spool writes both with one ``writev``.

Either way the node touches the image's bytes once, where a naive handler copies an 8 MB
mammogram two or three times: on a 2-core machine the C-STORE receive rate is bound by
that memory traffic (and, in the node's process, whose large allocations are fresh memory maps,
by the page faults it causes).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pynetdicom import dimse_messages
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

from inference import InputError, describe

INCOMING_PREFIX, INCOMING_SUFFIX = ".", ".tmp"
"""How a file being received is named: like the spool's other unfinished writes (``.*.tmp``),
which the node removes at start."""

_incoming: weakref.WeakKeyDictionary[object, Path] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Part10:
    """``head`` (preamble, ``DICM``, file meta) followed by ``body`` (the dataset) is the file."""

    head: bytes
    body: bytes

    def __len__(self) -> int:
        return len(self.head) + len(self.body)

    @property
    def parts(self) -> tuple[bytes, bytes]:
        return self.head, self.body

    def reader(self) -> PartsReader:
        """A seekable binary file over both pieces (what pydicom's ``dcmread`` takes)."""
        return PartsReader(self.parts)

    def locate(self, offset: int) -> tuple[bytes, int]:
        """A buffer holding the file from ``offset`` to its end, and where ``offset`` is in it:
        the body itself for an offset in the dataset (where pixel data always is), without a copy."""
        if offset >= len(self.head):
            return self.body, offset - len(self.head)
        return b"".join(self.parts), offset  # inside the file meta: not pixel data, never big

    def close(self) -> None:
        """Nothing to release (as :meth:`ReceivedFile.close`)."""


@dataclass
class ReceivedFile:
    """A Part 10 file pynetdicom wrote while receiving (its temporary file, until the spool takes
    it). Call :meth:`close` when done: it unmaps what :meth:`locate` mapped."""

    path: Path
    size: int
    _map: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def at(cls, path: Path) -> ReceivedFile:
        return cls(Path(path), Path(path).stat().st_size)

    def __len__(self) -> int:
        return self.size

    def locate(self, offset: int) -> tuple[memoryview | bytes, int]:
        """The file, mapped read-only (pages are read only where looked at), and ``offset``."""
        if self.size == 0:
            return b"", offset
        if self._map is None:
            with self.path.open("rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map), offset

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the map goes with it
                self._map.close()
            self._map = None


def discard_unfinished(assoc: object) -> bool:
    """Remove the file of a dataset whose association ended before the dataset did; True if there
    was one.

    pynetdicom hands a complete dataset's file to the C-STORE handler and removes it afterwards;
    a dataset cut off by an abort or a dropped connection stays in its unfinished message, and
    its file (part of a patient's image) would stay in the temporary folder. Call when the
    connection closes (``EVT_CONN_CLOSE``, from the association's network thread, which no
    longer writes to the file). Reads pynetdicom's message state by name and does nothing if
    that is not there.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    name = getattr(handle, "name", None)
    if handle is None or not isinstance(name, str):
        return False
    receipt_failure(name)
    with contextlib.suppress(OSError):
        handle.close()
        Path(name).unlink(missing_ok=True)
    return True


def receive_into(ae: object, folder: Path) -> None:
    """Have pynetdicom write the datasets that ``ae``'s associations receive into ``folder``.

    pynetdicom opens each file with ``NamedTemporaryFile`` in the process's temporary folder:
    often a RAM-backed ``/tmp``, on another file system than the spool (so every image would be
    copied once more to be spooled), and never cleaned of a dataset whose process was killed
    mid-receive. In a folder inside the spool the file is renamed into place and a leftover is
    removed with the spool's other interrupted writes at the next start. Per AE, so other AEs in
    the process (tests, the bench's peers) keep the default.
    """
    _incoming[ae] = folder
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment]


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes] | IncomingFile:
    """pynetdicom's ``NamedTemporaryFile``: an :class:`IncomingFile` in the receiving AE's folder if
    it has one.

    Called while decoding a PDU, in the association's DUL thread (``thread.assoc``).
    """
    thread = threading.current_thread()
    ae = getattr(getattr(thread, "assoc", thread), "ae", None)
    folder = _incoming.get(ae) if ae is not None else None
    if folder is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # pynetdicom closes and removes it
    kwargs.update(dir=folder, prefix=INCOMING_PREFIX, suffix=INCOMING_SUFFIX)
    return IncomingFile(tempfile.NamedTemporaryFile(*args, **kwargs))


_failures: dict[str, OSError] = {}
_failures_lock = threading.Lock()


class IncomingFile:
    """The file a dataset is received into, in the spool's file system: a write that fails there
    (the disk is full) must not abort the association from inside pynetdicom's PDU decoding,
    where the peer would hear of it only as a dropped connection.

    The first failed write is recorded for the C-STORE handler (:func:`receipt_failure`, which
    answers Out of Resources), the partial file is closed and removed at once (its space is
    what ran out), and the rest of the dataset is dropped as it arrives. pynetdicom writes the
    file meta and the dataset with ``write`` and ``file.flush``, then closes and unlinks it.
    """

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.name: str = inner.name  # a path: ``dir`` was given
        self.failed = False

    @property
    def file(self) -> IncomingFile:
        return self

    def write(self, data: bytes | memoryview) -> int:
        if not self.failed:
            try:
                return self._inner.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._inner.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if not self.failed:
            self._inner.close()

    def _fail(self, exc: OSError) -> None:
        self.failed = True
        with _failures_lock:
            _failures[self.name] = exc
        with contextlib.suppress(OSError):  # the buffer cannot be written either
            self._inner.close()
        Path(self.name).unlink(missing_ok=True)


def receipt_failure(path: Path | str) -> OSError | None:
    """Why the dataset pynetdicom received into ``path`` could not be written (None if it was);
    asked once per dataset, by its C-STORE handler (or when its association ends first)."""
    with _failures_lock:
        return _failures.pop(str(path), None)


def received_instance(event: Event) -> Part10 | ReceivedFile:
    """The instance a C-STORE request brought: the file pynetdicom wrote it to as it arrived
    (:func:`receive_into`), else the dataset in memory behind a file meta pynetdicom builds from
    the request, the bytes ``event.encoded_dataset()`` would give without copying the dataset to
    join them.

    The meta carries the peer's Affected SOP Class/Instance UIDs, so building it can fail on a
    hostile request: that is the peer's bytes being unusable (InputError), not a node failure.
    A dataset whose file could not be written as it arrived raises that write's OSError.
    """
    try:
        path = event.dataset_path
        failure = None if path is None else receipt_failure(path)
        if path is not None and failure is None:
            return ReceivedFile.at(path)
        if path is None:
            head = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))
            return Part10(head, bytes(event.encoded_dataset(include_meta=False)))
    except Exception as exc:  # pynetdicom/pydicom raise many types on hostile command values
        raise InputError(f"cannot read the received dataset: {describe(exc, limit=200)}") from exc
    assert failure is not None
    raise failure  # nothing to read: the disk filled (or failed) while it arrived


Received = bytes | Part10 | ReceivedFile
"""A received instance: one Part 10 byte string, its head and dataset kept apart, or a file."""


def reader(data: Received) -> io.RawIOBase | io.BytesIO | Path:
    """What ``pydicom.dcmread`` reads ``data`` from: a seekable binary file or a path (``io.BytesIO``
    shares a bytes object's buffer)."""
    if isinstance(data, ReceivedFile):
        return data.path
    return data.reader() if isinstance(data, Part10) else io.BytesIO(data)


def locate(data: Received, offset: int) -> tuple[bytes | memoryview, int]:
    """A buffer holding ``data`` from ``offset`` on, and where ``offset`` is in it."""
    if isinstance(data, Part10 | ReceivedFile):
        return data.locate(offset)
    return data, offset


class PartsReader(io.RawIOBase):
    """Read-only, seekable view of consecutive byte strings as one file; nothing is copied until read."""

    def __init__(self, parts: tuple[bytes, ...]) -> None:
        super().__init__()
        self._views = [memoryview(part).cast("B") for part in parts]
        self._starts: list[int] = []
        total = 0
        for view in self._views:
            self._starts.append(total)
            total += len(view)
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        done = 0
        for view, start in zip(self._views, self._starts, strict=True):
            if done == len(out):
                break
            at = self._pos - start
            if at < 0 or at >= len(view):
                continue
            chunk = view[at : at + len(out) - done]
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._pos += len(chunk)
        return done
