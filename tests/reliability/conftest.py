"""Fixtures of this package come from ``node_fixtures`` (registered in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from node_fixtures import one_torch_thread


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield
