"""The ``r1serve`` command as a user runs it (``serve`` itself is what conftest's live server runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1serve.models.catalog import DEFAULT_MODEL_ID


def _r1serve(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "r1serve", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"COLUMNS": "200", **os.environ},
    )


def test_models_lists_the_catalog() -> None:
    result = _r1serve("models")
    assert result.returncode == 0, result.stderr
    assert DEFAULT_MODEL_ID in result.stdout
    assert "deepseek-r1-distill-qwen-7b" in result.stdout


@pytest.mark.slow
def test_pull_prints_the_verified_path() -> None:
    result = _r1serve("pull")  # the default model; conftest's servers need it anyway
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".gguf"


def test_pull_unknown_model_fails_clearly() -> None:
    result = _r1serve("pull", "no-such-model-anywhere")
    assert result.returncode == 1
    assert "unknown model" in result.stderr


@pytest.mark.slow
def test_chat_streams_answers_and_keeps_history(server_url: str) -> None:
    result = _r1serve("chat", "--url", server_url, stdin="Say hello.\nNow say goodbye.\n")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) >= 2
    # One usage line per turn: both turns got an answer.
    assert result.stderr.count("completion tokens") == 2


@pytest.mark.slow
def test_chat_reports_errors_and_goes_on(auth_server_url: str) -> None:
    result = _r1serve("chat", "--url", auth_server_url, "--api-key", "sk-wrong", stdin="hi\n")
    assert result.returncode == 0
    assert "401" in result.stderr
