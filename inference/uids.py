"""DICOM UID validation and deterministic derivation.

Validation keeps hostile tag text (``../../x``) out of file paths and databases. Derivation makes
results idempotent (design invariant 6): the same inputs scored by the same model always give the
same SOP Instance UIDs, so a resend never duplicates objects in PACS.
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, max 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def derive_uid(*parts: str) -> str:
    """A UID under the 2.25 root (PS3.5 B.2) from a SHA-256 of ``parts``.

    Only the first 128 bits are used, as a UUID-derived UID would, which keeps it within 64
    characters.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))
