"""Fixtures of the DICOM networking tests: the node's SCP on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicom_helpers import NODE_AE, NodeFactory, RunningNode
from peers import LOOPBACK, free_port
from sqlalchemy.orm import Session, sessionmaker

from node.config import NodeConfig


@pytest.fixture
def node_scp(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[NodeFactory]:
    """``node_scp(**config overrides) -> RunningNode``: start_scp on loopback, stopped at teardown."""
    from node.dicom.scp import start_scp, stop_scp

    started: list[RunningNode] = []

    def start(**overrides: Any) -> RunningNode:
        values: dict[str, Any] = {
            "ae_title": NODE_AE,
            "port": free_port(),
            "bind_address": LOOPBACK,
            "data_dir": tmp_path / f"node-{len(started)}",
        }
        values.update(overrides)
        config = NodeConfig(**values)
        node = RunningNode(config, start_scp(config, sessions), sessions)
        started.append(node)
        return node

    yield start
    for node in started:
        stop_scp(node.server)  # association handlers finish before the database goes
