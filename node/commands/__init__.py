"""The whole `mammonode` command line, one module per area, each with ``register(app)``.

:mod:`node.commands.app` holds the Typer app and ``main()`` and mounts every module listed in
:data:`MODULES`. A module imports nothing heavy at import time (no torch, no pynetdicom, no
SQLAlchemy engine, no ``training``): `mammonode --help` must start fast and work in a serving
install without the training extra. Commands parse arguments, call library functions and print;
the training and export commands import ``training`` inside their functions only. Modules whose
name starts with ``_`` are shared helpers, not command modules. A command module shares its name
with the library module it is the command line of (``bench``, ``demo``, ``queue``, ``retrain``,
``registry``, ``service``), never with an unrelated one.
"""

from __future__ import annotations

# Add one line per command module; node/commands/app.py registers them in this order.
MODULES: tuple[str, ...] = (
    "score",
    "demo",
    "training",
    "export",
    "service",
    "dicom",
    "db",
    "audit",
    "queue",
    "registry",
    "retrain",
    "bench",
)
