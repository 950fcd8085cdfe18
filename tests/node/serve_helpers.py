"""Running `mammonode serve` as a process in tests: its environment, a config file, waiting."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path


def serve_env(**values: str) -> dict[str, str]:
    """This environment without MAMMONODE_* settings (the test decides them), plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMONODE_")}
    env.update(values)
    return env


def toml_config(path: Path, **values: object) -> Path:
    """A config file: scalars as ``key = value``, lists of dicts as ``[[key]]`` tables."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables += [f"[[{key}]]", *(f"{k} = {json.dumps(v)}" for k, v in item.items())]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines + tables) + "\n", encoding="utf-8")
    return path


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)
