"""A progress bar on stderr for the long commands (score, evaluate): tqdm when it is installed
(the ``train`` extra) and stderr is a terminal; otherwise, or with ``--quiet``, no bar.

Not a command module (no ``register``); tqdm is imported when a bar is made, not at CLI start.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Bar:
    """A bar whose total is set once known; does nothing without tqdm or a terminal."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self._desc = desc
        self._enabled = enabled
        self._bar: Any = None

    def start(self, total: int) -> None:
        if not self._enabled or self._bar is not None:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # a serving install without the train extra: no bar
            return
        self._bar = tqdm(total=total, desc=self._desc, unit="file", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wanted(quiet: bool) -> bool:
    """Show a bar: not asked to be quiet, and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(desc: str, *, quiet: bool = False) -> Iterator[Bar]:
    """A :class:`Bar` closed on exit (also when the command fails)."""
    bar = Bar(desc, wanted(quiet))
    try:
        yield bar
    finally:
        bar.close()
