"""The accounts CLI (`r1serve db upgrade`, `keys create|list|revoke`, `usage`) run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1serve.accounts.db import head_revision


@pytest.fixture
def run(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    env.update({"R1SERVE_DATA_DIR": str(tmp_path), "COLUMNS": "200"})

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "r1serve", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    return _run


def test_keys_lifecycle_and_usage(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    upgraded = run("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert head_revision() in upgraded.stdout + upgraded.stderr  # migrated to the newest revision

    created = run("keys", "create", "--name", "alice", "--rpm", "5", "--budget", "2")
    assert created.returncode == 0, created.stderr
    key = next(tok for tok in created.stdout.split() if tok.startswith("r1-"))
    prefix = key.split("_")[0]

    listed = run("keys", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout, "a key is shown only when it is created"
    # Stored as a keyed hash only: the secret is nowhere in the data directory.
    secret = key.split("_", 1)[1].encode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path

    revoked = run("keys", "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in run("keys", "list").stdout

    usage = run("usage", "--key", prefix)
    assert usage.returncode == 0, usage.stderr


def test_bad_input_is_a_clear_error(run) -> None:  # type: ignore[no-untyped-def]
    bad = run("keys", "create", "--name", "bob", "--expires", "not-a-date")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr + bad.stdout
    missing = run("keys", "revoke", "r1-nosuchkey")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr + missing.stdout


def test_serve_that_cannot_listen_creates_no_admin_key(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Beyond loopback with no key, start-up creates an admin key; an address the server cannot bind must
    fail before that, or the key would switch on auth for every server sharing the data directory."""
    failed = run("serve", "--upstream", "http://127.0.0.1:9/v1", "--host", "192.0.2.1", "--port", "8139")
    assert failed.returncode != 0
    out = failed.stderr + failed.stdout
    assert "cannot listen on 192.0.2.1:8139" in out and "Traceback" not in out, out
    assert "admin key" not in out, out
    listed = run("keys", "list")
    assert listed.returncode == 0 and "r1-" not in listed.stdout, listed.stdout


def test_the_listen_check_binds_as_uvicorn_will() -> None:
    import socket

    from r1serve.cli import _cannot_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _cannot_listen("127.0.0.1", port)  # in use
        assert _cannot_listen("0.0.0.0", port)  # overlaps it
    assert _cannot_listen("127.0.0.1", port) is None  # free again
    assert _cannot_listen("0.0.0.0", port) is None
    assert _cannot_listen("", port) is None  # uvicorn's "every address"
    assert _cannot_listen("localhost", port) is None
    assert _cannot_listen("192.0.2.1", port)  # not an address of this machine
