"""A throwaway PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a temporary folder.

No system service is used or touched: the cluster lives in its own folder, listens on a free
loopback port (TCP only, trust authentication, fsync off) and is removed at the end of the session.
``initdb`` refuses to run as root, and CI runs as root, so there the server commands run as the
``postgres`` system user (which the Debian package creates) in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from peers import free_port
from psycopg import sql

SERVER_SETTINGS = """
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 200
"""


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, from ``pg_config``, or the newest
    Debian-style ``/usr/lib/postgresql/<major>/bin``; None when the server is not installed."""
    candidates: list[Path] = []
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))

    def major(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    candidates.append(Path("/usr/local/pgsql/bin"))
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


@dataclass(frozen=True)
class PostgresCluster:
    """A running server; every database on it belongs to the superuser ``postgres``."""

    root: Path
    bin_dir: Path
    port: int
    prefix: tuple[str, ...]
    """Prepended to server commands: ``runuser -u postgres --`` when running as root."""

    def url(self, dbname: str, password: str | None = None) -> str:
        """A SQLAlchemy URL (psycopg 3); trust authentication ignores ``password``."""
        user = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        )

    def create_database(self, name: str, template: str | None = None) -> None:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(query)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection a test left open (FORCE from PostgreSQL 13)."""
        with self._admin() as conn:
            if conn.info.server_version >= 130000:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                return
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(
            [*self.prefix, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args],
            cwd=self.root,
            check=check,
        )


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _server_user_prefix(root: Path) -> tuple[str, ...]:
    """Run as ourselves, or as ``postgres`` (owning ``root``) when we are root."""
    if os.geteuid() != 0:
        return ()
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root needs the 'postgres' system user for initdb") from None
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    os.chown(root, user.pw_uid, user.pw_gid)
    return (runuser, "-u", "postgres", "--")


@contextlib.contextmanager
def running_cluster(bin_dir: Path, attempts: int = 3) -> Iterator[PostgresCluster]:
    """Create, start, yield, then stop and delete a cluster."""
    # As root the folder is handed to ``postgres``, which must reach it: $TMPDIR may be private.
    root = Path(tempfile.mkdtemp(prefix="mammonode-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    cluster: PostgresCluster | None = None
    try:
        prefix = _server_user_prefix(root)
        _run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=root,
        )
        with (root / "data" / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(SERVER_SETTINGS + f"unix_socket_directories = '{root}'\n")
        for attempt in range(attempts):  # a free port can be taken between probe and bind
            candidate = PostgresCluster(root, bin_dir, free_port(), prefix)
            started = candidate.pg_ctl(
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {candidate.port}",
                "start",
                check=False,
            )
            if started.returncode == 0:
                cluster = candidate
                break
            log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
            if attempt == attempts - 1:
                raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()}\n{log[-2000:]}")
        assert cluster is not None
        yield cluster
    finally:
        if cluster is not None:
            cluster.pg_ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
