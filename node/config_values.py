"""ConfigError and the checks of single values that every settings module shares.

:mod:`node.config` (the node's settings) and :mod:`node.peer_settings` (destinations and the
allow-list) both raise :class:`ConfigError` with the same one-line messages; keeping these here
lets the peer settings live in a module of their own without an import circle.
:mod:`node.config` re-exports every name, which is where callers take them from.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, TypeVar

from inference import MammoNodeError

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash


class ConfigError(MammoNodeError):
    """The configuration file or an environment variable is invalid."""


E = TypeVar("E", bound=StrEnum)


def parse_option(option: type[E], value: Any, what: str) -> E:
    """``value`` (a member or its word) as a member of ``option``; a one-line :class:`ConfigError`
    naming ``what`` and the allowed words otherwise."""
    try:
        return option(value)
    except ValueError:
        allowed = ", ".join(option)
        raise ConfigError(f"{what} must be one of {allowed}, not {value!r}") from None


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """An AE title as PS3.5 allows it (1-16 printable characters, no backslash), stripped."""
    text = str(value).strip()
    if not text or not AE_TITLE_RE.match(text):
        raise ConfigError(f"{what} {value!r} is not a valid AE title (1-16 printable characters)")
    return text


def validate_port(value: Any, what: str = "port") -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what} {port} is outside 1-65535")
    return port


def parse_boolean(value: Any, what: str) -> bool:
    """A TOML boolean, or one of the words 1/true/yes/on and 0/false/no/off (environment)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def split_list(value: Any) -> list[str]:
    """The non-empty items of a comma-separated setting (``MAMMONODE_ALLOWED_AES=A,B``)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def mask_url(url: str) -> str:
    """``scheme://user:***@host/db``: the database URL without its password."""
    return re.sub(r"(?<=://)([^:/@]+):[^@]*@", r"\1:***@", url)
