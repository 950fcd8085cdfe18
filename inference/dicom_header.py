"""Reading untrusted DICOM files: the dataset and its identifying tags.

Pixels are decoded by :mod:`inference.dicom_pixels`.

Everything the node receives is untrusted (design invariant 2), so every failure here becomes an
:class:`~inference.types.InputError` with a one-line reason the node can put in an audit entry,
never a traceback from deep inside pydicom. Tags are read without touching Pixel Data, so the
node can file an instance cheaply; pixels are decoded only when the image is scored.

Training reads its DICOM files through the same functions (design invariant 4).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from inference.phi import scrub
from inference.types import UNKNOWN, ImageMeta, InputError
from inference.uids import is_valid_uid

logger = logging.getLogger(__name__)

DX_MAMMO_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation
DX_MAMMO_FOR_PROCESSING = DigitalMammographyXRayImageStorageForProcessing
BREAST_PROJECTION_FOR_PRESENTATION = BreastProjectionXRayImageStorageForPresentation
BREAST_PROJECTION_FOR_PROCESSING = BreastProjectionXRayImageStorageForProcessing
BREAST_TOMOSYNTHESIS = BreastTomosynthesisImageStorage
SECONDARY_CAPTURE_PREFIX = SecondaryCaptureImageStorage  # SC and the multi-frame SC classes
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

_MAMMO_SOP_CLASSES: dict[str, str] = {
    DX_MAMMO_FOR_PRESENTATION: "Digital Mammography X-Ray Image - For Presentation",
    DX_MAMMO_FOR_PROCESSING: "Digital Mammography X-Ray Image - For Processing",
    BREAST_PROJECTION_FOR_PRESENTATION: "Breast Projection X-Ray Image - For Presentation",
    BREAST_PROJECTION_FOR_PROCESSING: "Breast Projection X-Ray Image - For Processing",
}
_INTENT_BY_SOP_CLASS: dict[str, str] = {
    DX_MAMMO_FOR_PRESENTATION: "FOR PRESENTATION",
    DX_MAMMO_FOR_PROCESSING: "FOR PROCESSING",
    BREAST_PROJECTION_FOR_PRESENTATION: "FOR PRESENTATION",
    BREAST_PROJECTION_FOR_PROCESSING: "FOR PROCESSING",
}

# DICOM CID 4014 "View for Mammography": SCT codes and their legacy SNOMED-RT (SRT) equivalents.
VIEW_CODES: dict[str, str] = {
    "399162004": "CC",
    "399368009": "MLO",
    "399260004": "ML",
    "399352003": "LM",
    "399192008": "XCCL",
    "399101009": "XCCM",
    "399099002": "LMO",
    "399196006": "FB",
    "399188001": "SIO",
    "441555000": "ISO",
    "127457009": "SPECIMEN",
    "R-10242": "CC",
    "R-10226": "MLO",
    "R-10224": "ML",
    "R-10228": "LM",
    "R-1024A": "XCCL",
    "R-1024B": "XCCM",
    "R-10230": "LMO",
    "R-10244": "FB",
    "R-102D0": "SIO",
    "R-40AAA": "ISO",
    "G-8310": "SPECIMEN",
}
KNOWN_VIEWS = frozenset(VIEW_CODES.values()) | {"AT", "CV"}

# Free-text phrases for views, matched on the text upper-cased with everything but letters
# removed ("Medio-lateral oblique" -> "MEDIOLATERALOBLIQUE"); the more specific ones first.
_VIEW_PHRASES: tuple[tuple[str, str], ...] = (
    ("EXAGGERATEDLATERAL", "XCCL"),
    ("LATERALLYEXAGGERATED", "XCCL"),
    ("EXAGGERATEDMEDIAL", "XCCM"),
    ("MEDIALLYEXAGGERATED", "XCCM"),
    ("MEDIOLATERALOBLIQUE", "MLO"),
    ("MEDIALLATERALOBLIQUE", "MLO"),
    ("LATEROMEDIALOBLIQUE", "LMO"),
    ("SUPEROLATERALTOINFEROMEDIAL", "SIO"),
    ("INFEROMEDIALTOSUPEROLATERAL", "ISO"),
    ("CAUDOCRANIAL", "FB"),
    ("CRANIOCAUDAL", "CC"),
    ("MEDIOLATERAL", "ML"),
    ("MEDIALLATERAL", "ML"),
    ("LATEROMEDIAL", "LM"),
)
_SIDE_WORDS = {"L": "L", "LT": "L", "LEFT": "L", "R": "R", "RT": "R", "RIGHT": "R"}
_TOKEN_SPLIT = re.compile(r"[^A-Z0-9]+")
_RULE_OUT = re.compile(r"\bR/O\b")  # "rule out", not "right"

# Descriptive tags searched, in this order, when no coded laterality or view exists.
_TEXT_KEYWORDS = (
    "SeriesDescription",
    "ProtocolName",
    "ImageComments",
    "AcquisitionDeviceProcessingDescription",
    "PerformedProcedureStepDescription",
    "StudyDescription",
)
# What pydicom raises when a raw element's bytes cannot be converted to a value.
_TAG_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, struct.error)
_REQUIRED_UIDS = (
    ("SOPInstanceUID", "(0008,0018)"),
    ("SOPClassUID", "(0008,0016)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM Part 10 file (or a bare dataset without preamble) from ``path``.

    A file without the ``DICM`` preamble is accepted only if it starts like a bare dataset and
    parses into one that carries a SOP Class UID, so random bytes are not mistaken for DICOM.
    Truncation is detected where it can be: a file that yields no elements, or whose last
    element is shorter than its declared length (with ``stop_before_pixels`` a cut inside the
    pixel data cannot be seen; :func:`inference.dicom_pixels.decode_pixels` catches it later).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"not a readable file: {path.name}")
    ds: Dataset
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = _read_bare_dataset(path, stop_before_pixels)
    except Exception as exc:
        raise InputError(f"cannot parse DICOM file {path.name}: {brief(exc)}") from exc
    _check_complete(ds, path)
    parse_elements(ds)
    return ds


def _read_bare_dataset(path: Path, stop_before_pixels: bool) -> Dataset:
    """Parse a dataset written without preamble and file meta (old ACR-NEMA style exports)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if len(head) < 4 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        raise InputError(f"not a DICOM file (no DICM preamble): {path.name}")
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        sop_class = ds.get("SOPClassUID")
    except Exception as exc:
        raise InputError(f"not a DICOM file (no DICM preamble): {path.name}") from exc
    if not sop_class:
        raise InputError(f"not a DICOM file (no DICM preamble, no SOP Class UID): {path.name}")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if little is False:
            raise InputError(f"big endian bare dataset is not supported: {path.name}")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def parse_elements(ds: Dataset) -> None:
    """Convert every element (recursing into sequences) now, so a corrupt one is reported here
    as an InputError naming its tag, instead of failing later wherever it happens to be read.

    pydicom converts raw elements lazily; a flipped VR byte or an odd-length value would
    otherwise raise NotImplementedError or BytesLengthException from an innocent attribute
    access. Converted elements are cached, so calling this again is cheap.
    """
    tag = None
    try:
        for elem in ds.iterall():
            tag = elem.tag
    except Exception as exc:
        where = f"after element {tag}" if tag is not None else "at the first element"
        raise InputError(f"corrupt DICOM element {where}: {brief(exc)}") from exc


def _check_complete(ds: Dataset, path: Path) -> None:
    """Refuse an empty dataset or one whose last element was cut short by the end of file."""
    tags = list(ds.keys())
    if not tags:
        raise InputError(f"DICOM file is truncated or empty (no data elements): {path.name}")
    try:
        raw = ds.get_item(max(tags))
    except Exception as exc:
        raise InputError(f"corrupt DICOM element {max(tags)}: {brief(exc)}") from exc
    if (
        isinstance(raw, RawDataElement)
        and isinstance(raw.value, bytes)
        and raw.length != 0xFFFFFFFF
        and len(raw.value) < raw.length
    ):
        raise InputError(
            f"DICOM file is truncated: element {raw.tag} has {len(raw.value)} of {raw.length} bytes"
        )


# --------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------


def read_meta(ds: Dataset) -> ImageMeta:
    """Read the identifying and geometric tags of an image without touching Pixel Data.

    UIDs are validated (they end up in file names and database keys); PatientID is any string
    and is only ever stored as data.
    """
    parse_elements(ds)
    uids = {keyword: _required_uid(ds, keyword, tag) for keyword, tag in _REQUIRED_UIDS}
    patient_id = optional_text(ds, "PatientID")
    transfer_syntax = ""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        ts = optional_text(file_meta, "TransferSyntaxUID")
        transfer_syntax = ts if is_valid_uid(ts) else ""
    return ImageMeta(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        patient_id=patient_id,
        laterality=read_laterality(ds),
        view=read_view(ds),
        modality=optional_text(ds, "Modality").upper() or UNKNOWN,
        rows=optional_int(ds, "Rows"),
        columns=optional_int(ds, "Columns"),
        photometric=optional_text(ds, "PhotometricInterpretation").upper() or UNKNOWN,
        transfer_syntax_uid=transfer_syntax,
        presentation_intent=_presentation_intent(ds, uids["SOPClassUID"]),
    )


def read_laterality(ds: Dataset) -> str:
    """``L``, ``R`` or ``unknown``: ImageLaterality, Laterality, FrameLaterality, then free text."""
    for value in (
        optional_text(ds, "ImageLaterality"),
        optional_text(ds, "Laterality"),
        _frame_laterality(ds),
    ):
        side = value.upper()
        if side in ("L", "R"):
            return side
    for text in _descriptive_texts(ds):
        side = laterality_from_text(text)
        if side != UNKNOWN:
            return side
    return UNKNOWN


def read_view(ds: Dataset) -> str:
    """The mammographic view: ViewPosition, then ViewCodeSequence (CID 4014), then free text."""
    position = view_from_text(optional_text(ds, "ViewPosition"))
    if position != UNKNOWN:
        return position
    for item in _sequence_items(ds, "ViewCodeSequence"):
        code = optional_text(item, "CodeValue")
        if code in VIEW_CODES:
            return VIEW_CODES[code]
    for text in _descriptive_texts(ds):
        view = view_from_text(text)
        if view != UNKNOWN:
            return view
    return UNKNOWN


def laterality_from_text(text: str) -> str:
    """Find the breast side in free text such as ``"R MLO"``, ``"LCC"`` or ``"Left breast"``.

    Text naming both sides (``"L + R"``) is ambiguous and gives ``unknown``.
    """
    sides = {side for side, _ in _side_view_tokens(text) if side}
    return sides.pop() if len(sides) == 1 else UNKNOWN


def view_from_text(text: str) -> str:
    """Find the view in free text: tokens (``CC``, ``RMLO``, ``L-XCCL``) or phrases
    (``cranio-caudal``, ``medio-lateral oblique``)."""
    views = [view for _, view in _side_view_tokens(text) if view]
    if views:
        return views[0]
    letters = re.sub(r"[^A-Z]", "", text.upper())
    for phrase, view in _VIEW_PHRASES:
        if phrase in letters:
            return view
    return UNKNOWN


def _side_view_tokens(text: str) -> Iterator[tuple[str, str]]:
    """Yield (side, view) for each token that names a side and/or a view."""
    cleaned = _RULE_OUT.sub(" ", text.upper())
    for token in _TOKEN_SPLIT.split(cleaned):
        if not token:
            continue
        if token in KNOWN_VIEWS:
            yield "", token
        elif token in _SIDE_WORDS:
            yield _SIDE_WORDS[token], ""
        else:
            for word, side in _SIDE_WORDS.items():
                if token.startswith(word) and token[len(word) :] in KNOWN_VIEWS:
                    yield side, token[len(word) :]
                    break


def _descriptive_texts(ds: Dataset) -> Iterator[str]:
    for keyword in _TEXT_KEYWORDS:
        text = optional_text(ds, keyword)
        if text:
            yield text
    for item in _sequence_items(ds, "ViewCodeSequence"):
        text = optional_text(item, "CodeMeaning")
        if text:
            yield text


def _frame_laterality(ds: Dataset) -> str:
    """FrameLaterality of the shared functional groups (enhanced / breast projection objects)."""
    for group in _sequence_items(ds, "SharedFunctionalGroupsSequence"):
        for anatomy in _sequence_items(group, "FrameAnatomySequence"):
            return optional_text(anatomy, "FrameLaterality")
    return ""


def _presentation_intent(ds: Dataset, sop_class_uid: str) -> str:
    intent = optional_text(ds, "PresentationIntentType").upper()
    if intent in ("FOR PRESENTATION", "FOR PROCESSING"):
        return intent
    return _INTENT_BY_SOP_CLASS.get(sop_class_uid, UNKNOWN)


def is_mammogram(ds: Dataset, meta: ImageMeta) -> tuple[bool, str]:
    """Whether the node should score this instance, and why (the reason goes to the audit log).

    The mammography SOP classes always are; any other single-frame image class (Secondary
    Capture, DX, CR) is when its Modality is MG. Tomosynthesis volumes, multi-frame captures
    and non-image objects are not.
    """
    sop_class = meta.sop_class_uid
    if sop_class in _MAMMO_SOP_CLASSES:
        return True, f"SOP class {_MAMMO_SOP_CLASSES[sop_class]}"
    if sop_class == BREAST_TOMOSYNTHESIS:
        return False, "breast tomosynthesis volume, not a 2-D mammogram"
    if sop_class.startswith(_SR_PREFIX) or meta.rows <= 0 or meta.columns <= 0:
        return False, f"SOP class {sop_class} is not an image"
    if meta.modality != "MG":
        return False, f"modality {meta.modality} is not mammography"
    if _is_processing_result(ds):
        # A CAM capture (MammoNode's own, which says Modality MG so hanging protocols place it,
        # or another CAD's): scoring it would score a picture of a result, and a PACS routing
        # MG back to the node would loop.
        return False, "derived image made by image processing of another image, not a mammogram"
    frames = optional_int(ds, "NumberOfFrames") or 1
    if frames > 1:
        return False, f"multi-frame object ({frames} frames) is not a 2-D mammogram"
    kind = "secondary capture" if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) else "image"
    return True, f"{kind} (SOP class {sop_class}) with modality MG"


_PROCESSING_SOURCE = "121322"  # DCM "Source image for image processing operation"


def _is_processing_result(ds: Dataset) -> bool:
    """Whether the image references a source image as the input of an image processing operation
    (how a CAM capture names the mammogram it was computed from)."""
    for item in _sequence_items(ds, "SourceImageSequence"):
        for purpose in _sequence_items(item, "PurposeOfReferenceCodeSequence"):
            if optional_text(purpose, "CodeValue") == _PROCESSING_SOURCE:
                return True
    return False


def _required_uid(ds: Dataset, keyword: str, tag: str) -> str:
    value = optional_text(ds, keyword)
    if not value:
        raise InputError(f"missing {keyword} {tag}")
    if not is_valid_uid(value):
        raise InputError(f"invalid {keyword} {tag}: {value[:64]!r}")
    return value


def optional_text(ds: Dataset, keyword: str) -> str:
    """A tag's value as stripped text, ``""`` when absent or unreadable (first value if many)."""
    try:
        value = ds.get(keyword)
    except _TAG_ERRORS as exc:
        logger.warning("ignoring unreadable %s: %s", keyword, brief(exc))
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else ""
    return str(value).strip().strip("\x00").strip()


def optional_int(ds: Dataset, keyword: str) -> int:
    text = optional_text(ds, keyword)
    try:
        return int(text) if text else 0
    except ValueError as exc:
        raise InputError(f"invalid {keyword}: {text[:32]!r}") from exc


def _sequence_items(ds: Dataset, keyword: str) -> list[Dataset]:
    try:
        value = ds.get(keyword)
    except _TAG_ERRORS as exc:
        logger.warning("ignoring unreadable %s: %s", keyword, brief(exc))
        return []
    if not value:
        return []
    try:
        return [item for item in value if isinstance(item, Dataset)]
    except TypeError:
        return []


def brief(exc: BaseException) -> str:
    """One line, bounded and scrubbed of quoted values, for messages built from library
    exceptions (they quote DICOM values, which may be patient data)."""
    return scrub(str(exc), limit=200) or type(exc).__name__
