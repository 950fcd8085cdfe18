"""The node's background loops keep going after a failure and do not flood the log with it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.service import Node


def test_a_repeating_failure_is_logged_once_and_a_new_one_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(NodeConfig(data_dir=tmp_path, poll_seconds=0.01))
    calls = 0

    def round_() -> int:
        nonlocal calls
        calls += 1
        if calls < 30:
            raise RuntimeError("model folder missing")
        if calls < 60:
            raise OSError("database unreachable")
        return 0

    caplog.set_level(logging.ERROR, logger="node.service")
    thread = threading.Thread(target=node._loop, args=("scoring", round_))
    thread.start()
    deadline = time.monotonic() + 10
    while calls < 70 and time.monotonic() < deadline:
        time.sleep(0.01)
    node._stop.set()
    thread.join(5)
    assert not thread.is_alive() and calls >= 70  # it kept polling through both faults
    logged = [r for r in caplog.records if r.name == "node.service"]
    assert len(logged) == 2, [r.getMessage() for r in logged]
    assert [r.getMessage().rsplit(": ", 2)[-2:] for r in logged] == [
        ["RuntimeError", "model folder missing"],
        ["OSError", "database unreachable"],
    ]
    assert not any(r.exc_info for r in logged)  # no traceback text: it could quote a DICOM value


def test_a_failure_quoting_a_value_is_logged_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(NodeConfig(data_dir=tmp_path, poll_seconds=0.01))

    def round_() -> int:
        node._stop.set()
        raise ValueError("Invalid value for VR DA: 'PHIPROBE-DOB'")

    caplog.set_level(logging.DEBUG)
    node._loop("scoring", round_)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Invalid value for VR DA" in text and "PHIPROBE" not in text
