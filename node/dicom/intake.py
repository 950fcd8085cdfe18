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
import logging
import re
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import (
    DX_MAMMO_FOR_PROCESSING,
    UNKNOWN,
    ImageMeta,
    InputError,
    is_mammogram,
    is_valid_uid,
    read_meta,
    scrub,
)
from node import audit
from node.db.models import Breast, Instance, Study, utcnow
from node.db.states import StudyState, check_transition
from node.dicom import codestream
from node.dicom.received import Received, locate, reader
from node.dicom.spool import InvalidUIDError

log = logging.getLogger(__name__)

ACTOR = "scp"
RECEIVING = StudyState.RECEIVING
FOR_PROCESSING_REASON = "For Processing image (raw detector data) is not scored"
HEADER_DEFER_BYTES = 64 * 1024
"""Elements larger than this (pixel data, big private blobs) are left unread while parsing."""

PIXEL_DATA = Tag("PixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
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
_US_TAGS = frozenset(Tag(k) for k in ("SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored"))
"""Image Pixel attributes the checks compute with; they must arrive as one US value."""
_REQUIRED_TAGS = (
    frozenset(
        Tag(k)
        for k in (*_UID_KEYWORDS, "SpecificCharacterSet", "PhotometricInterpretation", "NumberOfFrames")
    )
    | _US_TAGS
)
"""Elements the node cannot do without: unreadable, the instance is refused (MALFORMED_ELEMENT)."""
_IDENTIFYING_TAGS = tuple(
    Tag(k)
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "ReferringPhysicianName",
    )
)
"""Values scrubbed from every log line about the instance (design invariant 10)."""
_NAME_PARTS = re.compile(r"[\\^=]+")
_MIN_KNOWN_CHARS = 3


class SOPClassMismatchError(InputError):
    """The dataset's SOP Class UID differs from the presentation context's abstract syntax."""


class PixelDataError(InputError):
    """Pixel data missing, truncated, not encapsulated as its transfer syntax requires, or with
    absurd dimensions."""


class ImageTooLargeError(PixelDataError):
    """Rows x Columns exceeds the configured ``max_image_pixels``."""


class MalformedElementError(InputError):
    """An element the node needs is encoded wrongly (wrong VR, impossible length, unconvertible)."""


@dataclass
class Receipt:
    """What :func:`examine` learned about one received instance, filled in as checks pass."""

    known: tuple[str, ...] = ()
    """Identifying values as received: scrubbed from log lines and audit reasons."""
    patient_id: str | None = None
    uids: InstanceUIDs | None = None
    info: InstanceInfo | None = None
    ignored: tuple[str, ...] = field(default=())
    """Tags of unreadable elements the node does not need, left out of the header."""


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


def examine(
    data: Received,
    *,
    transfer_syntax: str,
    context_sop_class: str,
    affected_sop_instance: str,
    max_pixels: int,
    receipt: Receipt | None = None,
) -> Receipt:
    """Every receipt check of one received instance, in the order the SCP runs them.

    Parses the bytes (pixel data left unread), reads the header, checks the UIDs, the SOP class
    against the presentation context and the C-STORE request, the pixel data against the bytes
    and the code stream against the header, then classifies. Pass ``receipt`` to keep what was
    learned before a check failed (the patient ID for the audit entry, the values to scrub from
    log lines); it is filled in as the checks pass and returned. Raises an :class:`InputError`
    subclass (a named status) for anything unusable; nothing is decoded.
    """
    receipt = Receipt() if receipt is None else receipt
    ds = parse_encoded(data)
    receipt.known = identifying_values(ds)
    read = read_header(ds, data)
    receipt.ignored = read.ignored
    header = read.dataset
    receipt.patient_id = tag_text(header, "PatientID")[:64] or None
    uids = check_uids(header)
    receipt.uids = uids
    check_sop_class(uids, context_sop_class)
    if affected_sop_instance != uids.sop_instance:
        raise InputError("SOP Instance UID differs from the C-STORE request's Affected SOP Instance UID")
    check_pixel_data(ds, header, data, transfer_syntax, max_pixels=max_pixels)
    receipt.info = classify(header)
    return receipt


def parse_encoded(data: Received) -> Dataset:
    """Parse a received DICOM Part 10 stream, leaving large values (pixel data) unread.

    The returned dataset keeps its buffer (or its file's name), so a deferred element can still
    be read on purpose; :func:`read_header` gives the part before the pixel data that the node
    looks at.
    """
    try:
        ds = pydicom.dcmread(reader(data), defer_size=HEADER_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types on hostile bytes; all mean unparsable
        _refuse_cut_pixel_data(data)
        raise InputError(f"cannot parse the received dataset: {scrub(str(exc), limit=200)}") from exc
    if not len(ds):
        _refuse_cut_pixel_data(data)
        raise InputError("the received dataset has no data elements")
    return ds


def _refuse_cut_pixel_data(data: Received) -> None:
    """PixelDataError when the header parses and only what follows does not.

    pydicom gives up on the whole dataset when encapsulated pixel data ends before its
    sequence delimiter (a file cut inside a fragment); the header read alone tells that case
    apart from bytes that are not a dataset at all.
    """
    try:
        header = pydicom.dcmread(reader(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the header is unparsable too: the caller's error stands
        return
    if len(header):
        raise PixelDataError("the pixel data cannot be parsed: the received bytes end inside it")


def identifying_values(ds: Dataset) -> tuple[str, ...]:
    """The patient's identifying values as received (raw bytes decoded as text, their name parts
    too), for :func:`inference.phi.scrub`: read before any conversion, so an element with a
    hostile VR (a PatientName sent as FD) is still known and never reaches a log line."""
    found: set[str] = set()
    for tag in _IDENTIFYING_TAGS:
        elem = ds.get_item(tag, keep_deferred=True)
        value = None if elem is None else elem.value
        if value is None:
            continue
        texts = (
            {value.decode("latin-1"), value.decode("utf-8", "replace")}
            if isinstance(value, bytes)
            else {str(value)}
        )
        for text in texts:
            text = text.strip(" \x00")
            found.add(text)
            found.update(_NAME_PARTS.split(text))
    return tuple(sorted(v.strip(" \x00") for v in found if len(v.strip(" \x00")) >= _MIN_KNOWN_CHARS))


@dataclass(frozen=True)
class Header:
    """The readable elements before Pixel Data (with the file meta), and what was left out."""

    dataset: Dataset
    ignored: tuple[str, ...]
    """Tags of elements that could not be converted and that the node does not need."""


def read_header(ds: Dataset, data: Received) -> Header:
    """The elements before Pixel Data, converted now, so nothing fails later when read lazily.

    Every element's value must lie inside the received bytes. The Image Pixel attributes the
    checks rely on must be US of one value (Rows sent as DS is refused, not coerced). An element
    that cannot be converted (a PatientName with VR FD, an odd-length US) is refused when the node
    needs it (UIDs, Image Pixel attributes, the character set: :class:`MalformedElementError`)
    and otherwise left out of the header: the image is still usable, and the spooled file keeps
    the bytes as received. Values larger than the defer size (big private blobs) are not read.
    """
    header = Dataset()
    ignored: list[str] = []
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement):
            _check_inside(elem, data)
        if tag >= PIXEL_DATA:
            continue
        if isinstance(elem, RawDataElement):
            if tag in _US_TAGS:
                _check_us(elem)
            if elem.value is None:  # deferred: too big to be anything the node reads
                if tag in _REQUIRED_TAGS:
                    raise MalformedElementError(f"{_tag_name(tag)} has an implausible length {elem.length}")
                continue
        try:
            header.add(_converted(ds, tag))
        except Exception as exc:  # pydicom raises many types on hostile values; judged below
            what = f"unreadable {_tag_name(tag)}: {scrub(str(exc), limit=160)}"
            if tag in _REQUIRED_TAGS:
                raise MalformedElementError(what) from exc
            log.debug("leaving out %s", _tag_name(tag))
            ignored.append(str(tag))
    header.file_meta = ds.file_meta
    return Header(header, tuple(ignored))


def _converted(ds: Dataset, tag: BaseTag) -> DataElement:
    """The element at ``tag`` converted (items of a sequence too, recursively)."""
    elem = ds[tag]
    if elem.VR == "SQ":
        for item in elem.value:
            for _ in item.iterall():
                pass
    return elem


def _check_inside(elem: RawDataElement, data: Received) -> None:
    """A defined-length value must lie inside the received bytes (the declared length alone
    proves nothing: pydicom seeks past a deferred value without reading it)."""
    if elem.length == UNDEFINED_LENGTH:
        return
    short = elem.value_tell + elem.length > len(data) if elem.value is None else len(elem.value) < elem.length
    if short:
        error = PixelDataError if elem.tag == PIXEL_DATA else MalformedElementError
        raise error(f"the received bytes end inside {_tag_name(elem.tag)} ({elem.length} bytes declared)")


def _check_us(elem: RawDataElement) -> None:
    """Explicit VR: the VR must be US and the length 2; implicit VR: the length must be 2."""
    if elem.VR not in (None, "US") or elem.length != 2:
        vr = elem.VR if elem.VR is not None and elem.VR.isalpha() else "implicit"
        raise MalformedElementError(
            f"{_tag_name(elem.tag)} must be one US value, got VR {vr[:2]} of length {elem.length}"
        )


def _tag_name(tag: BaseTag) -> str:
    keyword = keyword_for_tag(tag)
    return f"{keyword} {tag}" if keyword else str(tag)


def header_of(ds: Dataset, data: Received) -> Dataset:
    """:func:`read_header`'s dataset alone (the elements the node reads)."""
    return read_header(ds, data).dataset


def check_uids(header: Dataset) -> InstanceUIDs:
    """The four UIDs the node keys on; a missing one is :class:`InputError`, an invalid one
    (``../../x``) :class:`InvalidUIDError`, whose message does not echo the value."""
    values: dict[str, str] = {}
    for keyword in _UID_KEYWORDS:
        try:
            raw = header.get(keyword)
        except Exception as exc:  # a header not made by read_header may hold raw values
            raise InputError(f"unreadable {keyword}: {type(exc).__name__}") from exc
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


def check_pixel_data(
    ds: Dataset, header: Dataset, data: Received, transfer_syntax: str, *, max_pixels: int
) -> None:
    """The image is usable, checked cheaply from the bytes received, without decoding.

    Dimensions and layout must be ones the worker decodes, within ``max_pixels``. Native pixel
    data must lie inside the received bytes and hold every frame the header announces.
    Compressed pixel data must be a complete item/fragment sequence, and the first frame's
    code-stream header must agree with Rows, Columns, Samples per Pixel and Bits Allocated
    (:mod:`node.dicom.codestream`): a 2.5 KB JPEG 2000 claiming 16384 x 16384 is refused here,
    not when the worker tries to allocate it.
    """
    ts = UID(transfer_syntax)
    rows, cols = _int(header, "Rows"), _int(header, "Columns")
    samples, bits = _int(header, "SamplesPerPixel") or 1, _int(header, "BitsAllocated")
    frames = _int(header, "NumberOfFrames") or 1
    if rows <= 0 or cols <= 0:
        raise PixelDataError(f"invalid image size {rows}x{cols}")
    if rows * cols > max_pixels:
        raise ImageTooLargeError(f"image too large: {rows}x{cols} exceeds {max_pixels} pixels")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32) or frames < 1:
        raise PixelDataError(f"unsupported pixel layout: {samples} samples of {bits} bits, {frames} frame(s)")
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise PixelDataError("no pixel data (7FE0,0010)")
    if isinstance(elem, RawDataElement):
        (buffer, start), length = locate(data, elem.value_tell), elem.length
    else:  # converted by someone: its value is all there is
        buffer = elem.value if isinstance(elem.value, bytes) else b""
        start, length = 0, UNDEFINED_LENGTH if elem.is_undefined_length else len(buffer)
    if ts.is_compressed:
        if length != UNDEFINED_LENGTH:
            raise PixelDataError(f"pixel data is not encapsulated as {ts.name} requires")
        enc = codestream.parse_encapsulated(buffer, start)
        fragments = codestream.first_frame_fragments(enc, frames)
        codestream.check_frame(
            ts,
            codestream.frame_head(buffer, fragments),
            fragments[0][1],
            rows=rows,
            columns=cols,
            samples=samples,
            bits_allocated=bits,
        )
        return
    if length == UNDEFINED_LENGTH:
        raise PixelDataError(f"pixel data is encapsulated, but {ts.name} is a native transfer syntax")
    if start + length > len(buffer):
        raise PixelDataError(f"the received bytes end inside the pixel data ({length} bytes declared)")
    frame_bytes = (rows * cols * samples * bits + 7) // 8
    if length < frame_bytes * frames:
        raise PixelDataError(
            f"native pixel data is truncated: {length} bytes, {frames} frame(s) need {frame_bytes * frames}"
        )


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


def _study_of(session: Session, info: InstanceInfo, now: dt.datetime) -> Study:
    """The instance's study row, created (``receiving``) on its first image."""
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
        return study
    study.last_received_at = now
    if meta.patient_id[:64] != study.patient_id:
        log.warning(
            "instance %s names another patient than its study %s", meta.sop_instance_uid, study.study_uid
        )
    return study


def _audit_received(
    session: Session,
    info: InstanceInfo,
    instance: Instance,
    *,
    calling_ae: str | None,
    peer: str | None,
    duplicate: bool,
    late: bool,
) -> None:
    meta = info.meta
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
            "transfer_syntax_uid": instance.transfer_syntax_uid,
            "laterality": instance.laterality,
            "view": meta.view or UNKNOWN,
            "scorable": info.scorable,
            "reason": info.reason,
            "size_bytes": instance.size_bytes,
            "received_count": instance.received_count,
            "duplicate": duplicate,
            "late_arrival": late,
        },
    )


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
    study = _study_of(session, info, now)
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
            study.state = check_transition(study.state, RECEIVING)
    session.flush()
    _audit_received(session, info, instance, calling_ae=calling_ae, peer=peer, duplicate=not new, late=late)
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
