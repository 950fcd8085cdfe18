"""Named DIMSE status codes and association-reject reasons of the node.

Every status the SCP answers and every status the sender interprets is named here; no other module
writes a bare hex code. The node's own failure codes sit inside the ranges PS3.4 B.2.3 reserves
for each meaning (A7xx out of resources, A9xx data set does not match SOP class, Cxxx cannot
understand), so any SCU classifies them correctly, while the exact code still tells an operator
which check refused the instance.
"""

from __future__ import annotations

from enum import IntEnum


class DimseStatus(IntEnum):
    """C-ECHO / C-STORE status values the node sends."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """The spool's file system is full (ENOSPC/EDQUOT): the SCU should retry later."""
    DATABASE_UNAVAILABLE = 0xA701
    """Out of resources: the receipt could not be committed (database down or locked)."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """The dataset's SOP Class UID is not the presentation context's."""
    CANNOT_UNDERSTAND = 0xC000
    """The header cannot be parsed, or required attributes are missing or malformed."""
    INVALID_UID = 0xC001
    """Cannot understand: a Study/Series/SOP UID is not a valid DICOM UID (e.g. ``../../x``)."""
    UNUSABLE_PIXEL_DATA = 0xC002
    """Cannot understand: pixel data missing, cut short (its value or its fragments run past the
    received bytes, no sequence delimiter, no fragment) or with an impossible layout."""
    CODESTREAM_MISMATCH = 0xC003
    """Cannot understand: the compressed frame is not a code stream of its transfer syntax, or its
    header disagrees with Rows, Columns, Samples per Pixel or Bits Allocated."""
    IMAGE_TOO_LARGE = 0xC004
    """Cannot understand: Rows x Columns exceeds the node's ``max_image_pixels``."""
    MALFORMED_ELEMENT = 0xC005
    """Cannot understand: an element the node needs (a UID, an Image Pixel attribute) is encoded
    wrongly: a wrong VR (Rows as DS) or a length its VR cannot have."""
    PROCESSING_FAILURE = 0x0110
    """An unexpected error inside the node (logged); the instance was not stored."""
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """Refused: the SOP class is not one the node stores."""


# Statuses a peer may answer to our C-STORE (PS3.4 B.2.3, PS3.7 C); ranges by their first code.
SUCCESS = 0x0000
WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATASET_DOES_NOT_MATCH = 0xB007
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)
CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)
PROCESSING_FAILURE = 0x0110
RESOURCE_LIMITATION = 0x0213
WARNINGS = frozenset({WARNING_COERCION, WARNING_ELEMENTS_DISCARDED, WARNING_DATASET_DOES_NOT_MATCH})
TRANSIENT_FAILURES = frozenset({PROCESSING_FAILURE, RESOURCE_LIMITATION})
"""Failures outside the out-of-resources range that are worth retrying later."""


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostic when the source is the service user (PS3.8 9.3.4)."""

    NO_REASON = 0x01
    APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
    CALLING_AE_NOT_RECOGNISED = 0x03
    CALLED_AE_NOT_RECOGNISED = 0x07


def is_success(code: int) -> bool:
    """Success or a warning: the peer stored the instance."""
    return code == SUCCESS or code in WARNINGS


def is_transient_failure(code: int) -> bool:
    """A failure the peer may get over (out of resources, processing failure): retry later.

    Everything else (data set does not match, cannot understand, SOP class refused, not
    authorised...) will fail again on every resend, so the sender treats it as permanent.
    """
    return code in OUT_OF_RESOURCES_RANGE or code in TRANSIENT_FAILURES


def status_name(code: int) -> str:
    """A readable name for a status code, ours or a peer's (``OUT_OF_RESOURCES``,
    ``Cannot Understand (0xC123)``...), for audit details, logs and the CLI."""
    try:
        return DimseStatus(code).name
    except ValueError:
        pass
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Unknown", "unknown status"))
    label = text or category
    return f"{label} (0x{code:04X})"
