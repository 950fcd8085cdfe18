"""The node's admin and service commands, one module per area, each with ``register(app)``.

``node/cli.py`` mounts every module listed in :data:`MODULES`. A module imports nothing heavy at
import time (no torch, no pynetdicom, no SQLAlchemy engine): `mammonode --help` must start fast.
"""

from __future__ import annotations

# Add one line per command module; node/cli.py registers them in this order.
MODULES: tuple[str, ...] = (
    "service",
    "dicom",
    "db",
    "audit",
    "queue",
    "model",
    "retrain",
    "bench",
)
