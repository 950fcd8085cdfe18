"""Argument parsers the commands share. Not a command module (no ``register``)."""

from __future__ import annotations

import re

import typer

MIN_SIDE = 32
MAX_SIDE = 8192
_SIZE_RE = re.compile(r"([0-9]+)x([0-9]+)")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (rows x columns, e.g. ``1024x768``) into (height, width), each 32..8192."""
    match = _SIZE_RE.fullmatch(text.strip().lower())
    if match is None:
        raise typer.BadParameter(f"expected HxW such as 1024x768, got {text!r}")
    h, w = int(match[1]), int(match[2])
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise typer.BadParameter(f"size {text} out of range {MIN_SIDE}..{MAX_SIDE}")
    return h, w
