"""Loopback addresses for the node's own peers (the demo's node and stand-in PACS, the tests' peers)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (the OS picks it).

    There is a small window before the caller binds it; a caller whose startup finds it taken
    retries with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
