"""Scrub exception texts before they reach a log line, a job error or CLI output (invariant 10).

Decoders, pydicom and highdicom quote the offending value in their messages (``Invalid value for
VR DA: 'PHIPROBE-DOB'``, ``could not convert string to float: 'DOE^JANE'``), and a DICOM value may
be a patient's name or birth date. Every quoted or bytes-literal run is therefore replaced by
``<value>``, and values the caller knows to be identifying (the instance's own patient
attributes) are removed wherever they stand, quoted or not. UIDs stay: they are not PHI here and
operators need them.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable
from pathlib import Path

REDACTED = "<value>"
MAX_CHARS = 500

_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
_MIN_KNOWN = 3
"""Known values shorter than this are not hunted for (``F``, ``M``: they would shred the text)."""


def scrub(text: str, known: Iterable[str] = (), *, limit: int = MAX_CHARS) -> str:
    """``text`` with quoted values and every one of ``known`` replaced, on one line, cut to ``limit``."""
    out = _QUOTED.sub(REDACTED, str(text))
    for value in sorted({str(v).strip() for v in known}, key=len, reverse=True):
        if len(value) >= _MIN_KNOWN:
            out = out.replace(value, REDACTED)
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def describe(exc: BaseException, known: Iterable[str] = (), *, limit: int = MAX_CHARS) -> str:
    """``Type: message`` of an exception, scrubbed (the message alone when it is empty)."""
    message = scrub(str(exc), known, limit=limit)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


class ScrubFilter(logging.Filter):
    """A handler filter that scrubs the messages of libraries that quote DICOM values.

    pydicom logs invalid values it reads (``Invalid value for VR DA: '...'``) and highdicom and
    pynetdicom narrate datasets; the node's own messages carry UIDs and row IDs only, but a
    library's text is scrubbed before any handler writes it.
    """

    PREFIXES = ("pydicom", "highdicom", "pynetdicom", "py.warnings")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.PREFIXES):
            record.msg = scrub(record.getMessage(), limit=2000)
            record.args = None
        return True


def scrub_library_logs() -> None:
    """Install :class:`ScrubFilter` where library records pass: on the ``pydicom`` logger itself
    (it logs under that one name, so its records are scrubbed whatever handler takes them) and
    on the root logger's handlers (highdicom and pynetdicom log under module names). Idempotent;
    the CLI, the node and the SCP call it at start."""
    targets: list[logging.Filterer] = [logging.getLogger("pydicom"), *logging.getLogger().handlers]
    for target in targets:
        if not any(isinstance(f, ScrubFilter) for f in target.filters):
            target.addFilter(ScrubFilter())


def quiet_value_checks() -> None:
    """Read DICOM without pydicom's per-value validation warnings, which quote the value.

    Untrusted values are checked where they matter instead
    (:func:`inference.writers.common.copyable_header`), without echoing them. Called by the CLI and
    by every pixel-work child process.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def where(exc: BaseException) -> str:
    """Where an exception was raised, frame by frame (file, line, function), for a debug log:
    locations only, no source text and no message, so nothing of the data can appear."""
    frames = traceback.extract_tb(exc.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
