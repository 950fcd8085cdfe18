"""Log lines: an ISO-8601 UTC timestamp, or one JSON object per line (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from node.logs import JsonFormatter, UtcTextFormatter, utc_timestamp

MAMMONODE = Path(sys.executable).with_name("mammonode")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR|DEBUG) [\w.]+: ")


def _record(message: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    record = logging.LogRecord("node.worker", logging.INFO, __file__, 1, message, args, None)
    record.created = 1796271911.123456  # 2026-12-03T04:25:11.123Z
    return record


def test_utc_timestamp_has_milliseconds_and_z() -> None:
    assert utc_timestamp(1796271911.123456) == "2026-12-03T04:25:11.123Z"
    assert utc_timestamp(0.0) == "1970-01-01T00:00:00.000Z"


def test_text_lines_start_with_the_utc_time() -> None:
    assert UtcTextFormatter().format(_record()) == "2026-12-03T04:25:11.123Z INFO node.worker: hello world"


def test_json_lines_are_one_object_each() -> None:
    line = JsonFormatter().format(_record("two\nlines %d", (2,)))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-12-03T04:25:11.123Z",
        "level": "INFO",
        "logger": "node.worker",
        "message": "two\nlines 2",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed" and "ValueError: boom" in entry["exception"]


LOGGING_CLI = """
import logging, sys
from node.commands import app

@app.app.command("say-hello")
def say_hello() -> None:
    logging.getLogger("node.worker").warning("hello %s", "there")

sys.argv = ["mammonode", *sys.argv[1:]]
app.main()
"""


def _logged(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``main()`` with one extra command that logs a warning."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    return subprocess.run(
        [sys.executable, "-c", LOGGING_CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def test_the_cli_logs_utc_text_or_json_lines() -> None:
    text = _logged("say-hello")
    assert text.returncode == 0, text.stderr
    [line] = text.stderr.splitlines()
    assert TEXT_LINE.match(line) and line.endswith("WARNING node.worker: hello there"), line

    for args, env in ((["--log-format", "json"], {}), ([], {"MAMMONODE_LOG_FORMAT": "json"})):
        run = _logged(*args, "say-hello", env=env)
        assert run.returncode == 0, run.stderr
        [entry] = [json.loads(line) for line in run.stderr.splitlines()]
        assert set(entry) == {"time", "level", "logger", "message"}
        assert entry["time"].endswith("Z") and entry["level"] == "WARNING"
        assert (entry["logger"], entry["message"]) == ("node.worker", "hello there")


def test_an_unknown_log_format_is_a_usage_error() -> None:
    run = _logged("--log-format", "xml", "say-hello")
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error:")
