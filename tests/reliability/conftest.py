"""Fixtures of this package come from ``node_fixtures`` (registered in tests/conftest.py); the
end-to-end reliability tests add a served node (``harness.ServedNode``) that is always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from harness import ServedNode, ServeFactory, write_config
from node_fixtures import one_torch_thread


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def serve_node(tmp_path: Path) -> Iterator[ServeFactory]:
    """Make `mammonode serve` subprocesses for this test from settings (harness.node_settings);
    each is killed, with whatever children it left, at teardown (its logs stay in tmp_path)."""
    made: list[ServedNode] = []

    def make(settings: dict[str, Any], *, echo_ae: str, pythonpath: Sequence[Path] = ()) -> ServedNode:
        workdir = tmp_path / f"node-{len(made)}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = write_config(workdir / "node.toml", settings)
        node = ServedNode(config, int(settings["port"]), workdir, echo_ae=echo_ae, pythonpath=pythonpath)
        made.append(node)
        return node

    yield make
    for node in made:
        node.cleanup()
