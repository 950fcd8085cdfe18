"""How log lines look: an ISO-8601 UTC timestamp on every line, or one JSON object per line.

``text`` (the default): ``2026-12-03T04:25:11.123Z INFO node.worker: message``.
``json``: ``{"time": "2026-12-03T04:25:11.123Z", "level": "INFO", "logger": "node.worker",
"message": "..."}`` (plus ``exception`` when the record carries one), for log collectors.

The CLI's ``main()`` installs the handler; ``--log-format`` (or ``MAMMONODE_LOG_FORMAT``) picks the
formatter. Only the formatter of the root handlers is swapped, so the filters installed on them
(:func:`inference.phi.scrub_library_logs`) stay in place.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

LOG_FORMATS: tuple[str, ...] = ("text", "json")
ENV_VAR = "MAMMONODE_LOG_FORMAT"


def utc_timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO-8601 UTC with milliseconds and a ``Z``."""
    moment = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class UtcTextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE`` with the time in UTC (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of a log format named in :data:`LOG_FORMATS`."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return UtcTextFormatter()
    raise ValueError(f"unknown log format {kind!r}; choose one of {', '.join(LOG_FORMATS)}")


def configure(kind: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr in format ``kind`` (a root handler is added if there is none)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(level)
    set_format(kind)


def set_format(kind: str) -> None:
    """Give every root handler the formatter of ``kind``; their filters are kept."""
    fmt = formatter(kind)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)
