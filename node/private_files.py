"""Owner-only data: the node's folders are 0700 and its files 0600, whoever started it and how.

The data folder holds patient data: spooled images, results in the outbox, and a database whose
rows name patients. A service manager may set a umask (the systemd unit does), a container or a
shell usually leaves 022, which makes all of it readable by every local account. So `mammonode`
sets its own umask at start, and the folders and database files the node relies on are created
with owner-only modes explicitly, tightened when an older release left them open.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_ONLY_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def restrict_umask() -> int:
    """Make everything this process creates from now on owner-only; returns the previous umask."""
    return os.umask(OWNER_ONLY_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` as an existing folder of mode 0700 (made, or tightened if this user owns it)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    _tighten(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """``path`` as an existing file of mode 0600: an empty one is made if missing (SQLite makes its
    ``-wal`` and ``-shm`` files with the mode of the database file, so they follow)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        _tighten(path, PRIVATE_FILE_MODE)
    else:
        os.close(fd)
    return path


def _tighten(path: Path, mode: int) -> None:
    """Remove group and other permissions from ``path`` if they are set and this user owns it;
    a folder someone else owns (a mount point, say) is left as it is, with a warning."""
    info = path.stat()
    if not stat.S_IMODE(info.st_mode) & ~mode & 0o777:
        return
    if info.st_uid != os.geteuid():
        log.warning("%s is readable by others and not owned by this user: left as it is", path)
        return
    path.chmod(mode)
    log.info("%s was readable by others: now %o", path, mode)
