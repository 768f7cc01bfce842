"""The markers' guards (conftest.py): an unmarked test that loads the model or leaves loopback fails."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def test_unmarked_model_load_and_remote_connection_fail(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(
        test_guarded="""
import socket
import pytest
from conftest import LiveServer

def test_starts_a_server(tmp_path):
    LiveServer(tmp_path, "x", {})

def test_leaves_loopback():
    with socket.socket() as s:
        s.settimeout(0.01)
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed

@pytest.mark.network
def test_marked_may_try():
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(0.01)
        s.connect(("192.0.2.1", 9))

def test_loopback_is_fine():
    with socket.socket() as s, pytest.raises(OSError):
        s.connect(("127.0.0.1", 9))
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*starts a live server with the real model: mark it @pytest.mark.slow*",
            "*connects to 192.0.2.1, beyond loopback: mark it @pytest.mark.network*",
        ]
    )
