"""A throwaway PostgreSQL server on loopback for tests (Debian's ``postgresql`` package).

``scripts/install-test-services.sh`` installs the package; if it is missing the tests fail (they are
never skipped: CI installs it). The server runs as the ``postgres`` user when the tests run as root
(initdb refuses root), listens on 127.0.0.1 on a free port and on a socket in its own temp dir, and
is stopped at the end of the session.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: run scripts/install-test-services.sh (apt-get install postgresql)"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``fsync=False`` (the tests' choice: they kill r1serve, never the machine) makes commits cheaper than a
    real server's; the gateway benchmark runs one with ``fsync=True``, as PostgreSQL ships."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="r1serve-pg-"))
        self.datadir = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", opts, "-l", str(self.root / "log"), "-w", "start",
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not accept connections")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def dump(self, url: str) -> str:
        """pg_dump of a database as text (to grep for secrets)."""
        database = url.rsplit("/", 1)[1]
        return self._run(
            str(self.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database
        ).stdout

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
