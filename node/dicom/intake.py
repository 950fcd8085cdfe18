"""What the C-STORE handler does with one received instance, minus the network.

The handler reads the header of the bytes as received (the pixel data stays a deferred,
unread element), checks UIDs, SOP class and the plausibility of the pixel data, decides whether
the instance is scorable, and after the file is in the spool records it following the study
state contract (design brief):

- upsert the Study by StudyInstanceUID, add or update the Instance row;
- mark the breast of a new scorable image dirty; a new scorable image of a study that is no
  longer ``receiving`` (already queued or scored) sends it back to ``receiving`` (a late
  arrival, re-scored as a new result version);
- audit ``instance.received`` in the same transaction. The caller commits, then answers Success.

Everything here raises named errors the SCP maps to DIMSE statuses; nothing decodes pixels.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import struct
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import ItemTag, Tag
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.dicom_io import DX_MAMMO_FOR_PROCESSING, MAX_PIXELS, is_mammogram, read_meta
from inference.types import UNKNOWN, ImageMeta, InputError
from inference.uids import is_valid_uid
from node import audit
from node.db.models import Breast, Instance, Study, utcnow
from node.dicom.spool import InvalidUIDError

log = logging.getLogger(__name__)

ACTOR = "scp"
RECEIVING = "receiving"
FOR_PROCESSING_REASON = "For Processing image (raw detector data) is not scored"
HEADER_DEFER_BYTES = 64 * 1024
"""Elements larger than this (pixel data, big private blobs) are left unread while parsing."""

PIXEL_DATA = Tag("PixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAG_LE = struct.pack("<HH", ItemTag.group, ItemTag.element)
_ITEM_TAG_BE = struct.pack(">HH", ItemTag.group, ItemTag.element)
TAG_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    UnicodeError,
    struct.error,
    NotImplementedError,
)
"""What pydicom raises when a raw element's bytes cannot be converted to a value."""
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class SOPClassMismatchError(InputError):
    """The dataset's SOP Class UID differs from the presentation context's abstract syntax."""


class PixelDataError(InputError):
    """Pixel data missing, truncated, not encapsulated as its transfer syntax requires, or with
    absurd dimensions."""


@dataclass(frozen=True)
class InstanceUIDs:
    sop_class: str
    sop_instance: str
    study: str
    series: str


@dataclass(frozen=True)
class InstanceInfo:
    """What the node records about a received instance, from its header alone."""

    meta: ImageMeta
    scorable: bool
    reason: str
    """Why it is scored (e.g. its SOP class) or why it is skipped."""
    accession_number: str | None = None

    @property
    def skip_reason(self) -> str | None:
        return None if self.scorable else self.reason


@dataclass(frozen=True)
class Registration:
    """The outcome of :func:`register_instance`."""

    instance: Instance
    study: Study
    new: bool
    """First receipt of this SOP Instance UID (False: a resend, ``received_count`` bumped)."""
    late: bool
    """It sent an already queued/scored study back to ``receiving``."""


def parse_encoded(data: bytes) -> Dataset:
    """Parse a received DICOM Part 10 stream, leaving large values (pixel data) unread.

    The returned dataset keeps its buffer, so a deferred element can still be read on purpose;
    :func:`header_of` gives the part before the pixel data that the node looks at.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=HEADER_DEFER_BYTES)
    except Exception as exc:
        raise InputError(f"cannot parse the received dataset: {_brief(exc)}") from exc
    if not len(ds):
        raise InputError("the received dataset has no data elements")
    return ds


def header_of(ds: Dataset) -> Dataset:
    """The elements before Pixel Data, with the file meta: stop-before-pixels semantics."""
    header = ds[:PIXEL_DATA]
    header.file_meta = ds.file_meta
    return header


def check_uids(header: Dataset) -> InstanceUIDs:
    """The four UIDs the node keys on; a missing one is :class:`InputError`, an invalid one
    (``../../x``) :class:`InvalidUIDError`, whose message does not echo the value."""
    values: dict[str, str] = {}
    for keyword in _UID_KEYWORDS:
        try:
            raw = header.get(keyword)
        except Exception as exc:
            raise InputError(f"unreadable {keyword}: {_brief(exc)}") from exc
        text = "" if raw is None else str(raw).strip().strip("\x00").strip()
        if not text:
            raise InputError(f"missing {keyword}")
        if not is_valid_uid(text):
            raise InvalidUIDError(f"invalid {keyword}: not a DICOM UID")
        values[keyword] = text
    return InstanceUIDs(
        values["SOPClassUID"],
        values["SOPInstanceUID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
    )


def check_sop_class(uids: InstanceUIDs, context_sop_class: str) -> None:
    if uids.sop_class != str(context_sop_class):
        raise SOPClassMismatchError(
            f"dataset SOP class {uids.sop_class} is not the presentation context's {context_sop_class}"
        )


def check_pixel_data(ds: Dataset, data: bytes, transfer_syntax: str) -> None:
    """Cheap plausibility of the image without decoding it.

    Native pixel data must hold every frame the header announces; compressed pixel data must be
    encapsulated (undefined length, starting with an item). Dimensions and layout must be ones a
    mammogram can have, so a hostile header is refused here rather than when it is scored.
    """
    ts = UID(transfer_syntax)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    samples, bits = _int(ds, "SamplesPerPixel") or 1, _int(ds, "BitsAllocated")
    frames = _int(ds, "NumberOfFrames") or 1
    if rows <= 0 or cols <= 0:
        raise PixelDataError(f"invalid image size {rows}x{cols}")
    if rows * cols > MAX_PIXELS:
        raise PixelDataError(f"image too large: {rows}x{cols} exceeds {MAX_PIXELS} pixels")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise PixelDataError(f"unsupported pixel layout: {samples} samples of {bits} bits")
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise PixelDataError("no pixel data (7FE0,0010)")
    if isinstance(elem, RawDataElement):
        length, head = elem.length, _head(elem, data)
    else:
        value = elem.value if isinstance(elem.value, bytes) else b""
        length = UNDEFINED_LENGTH if elem.is_undefined_length else len(value)
        head = value[:4]
    if ts.is_compressed:
        if length != UNDEFINED_LENGTH or head not in (_ITEM_TAG_LE, _ITEM_TAG_BE):
            raise PixelDataError(f"pixel data is not encapsulated as {ts.name} requires")
        return
    frame_bytes = (rows * cols * samples * bits + 7) // 8
    if length == UNDEFINED_LENGTH or length < frame_bytes * frames:
        raise PixelDataError(
            f"native pixel data is truncated: {length} bytes, {frames} frame(s) need {frame_bytes * frames}"
        )


def _head(elem: RawDataElement, data: bytes) -> bytes:
    """The first four bytes of an element's value, read from the received stream if deferred."""
    if elem.value is not None:
        return bytes(elem.value[:4])
    return data[elem.value_tell : elem.value_tell + 4]


def classify(header: Dataset) -> InstanceInfo:
    """Read the tags the node needs and decide scorable or skipped.

    Scored: Digital Mammography For Presentation, and Secondary Captures (or other image
    classes) whose Modality is MG. Recorded but skipped: For Processing images and anything
    that is not a 2-D mammogram, with the reason.
    """
    meta = read_meta(header)
    accession = tag_text(header, "AccessionNumber")[:64] or None
    if meta.sop_class_uid == DX_MAMMO_FOR_PROCESSING or meta.presentation_intent == "FOR PROCESSING":
        return InstanceInfo(meta, False, FOR_PROCESSING_REASON, accession)
    ok, reason = is_mammogram(header, meta)
    return InstanceInfo(meta, ok, reason, accession)


def side_code(laterality: str) -> str:
    """The database's one-letter laterality: ``L``, ``R`` or ``U`` (unknown)."""
    return laterality if laterality in ("L", "R") else "U"


def register_instance(
    session: Session,
    info: InstanceInfo,
    *,
    spool_path: str,
    size_bytes: int,
    transfer_syntax_uid: str,
    association_id: int | None = None,
    calling_ae: str | None = None,
    peer: str | None = None,
    now: dt.datetime | None = None,
) -> Registration:
    """Record a spooled instance per the study state contract, in ``session`` (caller commits).

    A resend of a known SOP Instance UID updates its row (the file was rewritten in place) and
    bumps ``received_count``; it marks nothing dirty unless it turns a skipped row scorable.
    Concurrent associations may race on the same new study: the unique constraints make the
    loser's flush fail with IntegrityError, and the caller retries the whole transaction.
    """
    now = now or utcnow()
    meta = info.meta
    study = session.scalar(select(Study).where(Study.study_uid == meta.study_instance_uid))
    if study is None:
        study = Study(
            study_uid=meta.study_instance_uid,
            patient_id=meta.patient_id[:64],
            accession_number=info.accession_number,
            state=RECEIVING,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(study)
        session.flush()
    else:
        study.last_received_at = now
        if meta.patient_id[:64] != study.patient_id:
            log.warning(
                "instance %s names another patient than its study %s", meta.sop_instance_uid, study.study_uid
            )
    laterality = side_code(meta.laterality)
    view = meta.view or UNKNOWN
    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid))
    new = instance is None
    fresh_scorable = info.scorable and (instance is None or not instance.scorable)
    if instance is None:
        instance = Instance(sop_instance_uid=meta.sop_instance_uid, received_at=now, received_count=1)
        session.add(instance)
    else:
        instance.received_count += 1
        if instance.study_id != study.id:
            log.warning(
                "instance %s was resent under another study %s", meta.sop_instance_uid, study.study_uid
            )
    instance.study_id = study.id
    instance.sop_class_uid = meta.sop_class_uid
    instance.series_uid = meta.series_instance_uid
    instance.transfer_syntax_uid = transfer_syntax_uid
    instance.laterality = laterality
    instance.view = view[:16]
    instance.scorable = info.scorable
    instance.skip_reason = None if info.scorable else info.reason[:255]
    instance.spool_path = spool_path
    instance.size_bytes = size_bytes
    instance.association_id = association_id
    late = False
    if fresh_scorable:
        _mark_dirty(session, study, laterality)
        if study.state != RECEIVING:
            late = True
            study.state = RECEIVING
    session.flush()
    audit.record(
        session,
        audit.INSTANCE_RECEIVED,
        ACTOR,
        patient_id=meta.patient_id,
        study_uid=meta.study_instance_uid,
        sop_instance_uid=meta.sop_instance_uid,
        calling_ae=calling_ae,
        peer=peer,
        details={
            "sop_class_uid": meta.sop_class_uid,
            "series_uid": meta.series_instance_uid,
            "transfer_syntax_uid": transfer_syntax_uid,
            "laterality": laterality,
            "view": view,
            "scorable": info.scorable,
            "reason": info.reason,
            "size_bytes": size_bytes,
            "received_count": instance.received_count,
            "duplicate": not new,
            "late_arrival": late,
        },
    )
    return Registration(instance, study, new, late)


def _mark_dirty(session: Session, study: Study, laterality: str) -> None:
    breast = session.scalar(
        select(Breast).where(Breast.study_id == study.id, Breast.laterality == laterality)
    )
    if breast is None:
        session.add(Breast(study_id=study.id, laterality=laterality, dirty=True))
    else:
        breast.dirty = True


def tag_text(ds: Dataset, keyword: str) -> str:
    """A tag's value as stripped text; ``""`` when absent or unreadable (corrupt raw bytes)."""
    try:
        value = ds.get(keyword)
    except TAG_ERRORS:
        return ""
    return "" if value is None else str(value).strip().strip("\x00").strip()


def _int(ds: Dataset, keyword: str) -> int:
    text = tag_text(ds, keyword)
    try:
        return int(text) if text else 0
    except ValueError as exc:
        raise PixelDataError(f"invalid {keyword}: {text[:32]!r}") from exc


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
