"""Live servers for the API tests: the real ``r1serve serve`` on loopback with the real default model.

Each server is a subprocess started once per session (loading the 0.5B model takes a second or two;
if it is not in the cache yet, the first start fetches it, which ``scripts/setup.sh`` normally did).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from r1serve.models.catalog import DEFAULT_MODEL_ID

DEFAULT_MODEL = DEFAULT_MODEL_ID
API_KEYS = ("sk-test-9f8e7d6c5b4a", "sk-second-key-0000")
_START_TIMEOUT = float(os.environ.get("R1SERVE_TEST_START_TIMEOUT", "900"))


# ----------------------------------------------------------------------------- markers, enforced
# `pytest -m "not slow"` must be fast and offline: a test that loads the real model (a live server or
# the embedded engine) must be marked slow, and one that reaches beyond loopback must be marked network.
# The guards below fail an unmarked test at the moment it does either, fixtures of any scope included
# (they run while the test that needs them is being set up), so the markers cannot drift.

_current: pytest.Item | None = None
_LOOPBACK = ("127.", "::1", "localhost")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _current
    _current = item


def require_marker(name: str, doing: str) -> None:
    """Fail the running test unless it carries marker ``name`` (it is ``doing`` something only such
    tests may)."""
    if _current is not None and _current.get_closest_marker(name) is None:
        pytest.fail(f"{_current.nodeid} {doing}: mark it @pytest.mark.{name}", pytrace=False)


def _guard_model_loads() -> None:
    try:
        from r1serve.engines.llama.engine import LlamaEngine
    except ImportError:  # llama-cpp-python missing: nothing can load the model anyway
        return
    start = LlamaEngine.start

    async def guarded_start(self: LlamaEngine) -> None:
        require_marker("slow", "loads the real model")
        await start(self)

    LlamaEngine.start = guarded_start  # type: ignore[method-assign]


def _guard_connections() -> None:
    connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: object) -> None:
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not host.startswith(_LOOPBACK):
            require_marker("network", f"connects to {host}, beyond loopback")
        connect(sock, address)  # type: ignore[arg-type]

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]


_guard_model_loads()
_guard_connections()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, workdir: Path, name: str, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        require_marker("slow", "starts a live server with the real model")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        # Only what the test needs from the developer's environment: where the models are cached.
        for key in ("R1SERVE_MODELS_DIR", "R1SERVE_N_THREADS"):
            if key in os.environ:
                base_env[key] = os.environ[key]
        cmd = [
            sys.executable, "-m", "r1serve", "serve",
            "--model", DEFAULT_MODEL,
            "--port", str(self.port),
            "--parallel", "4",
            "--ctx", "4096",
            *args,
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the server's whole life
        # cwd: a fresh directory, so a developer's .env cannot change the server under test.
        self.proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            # Its own data dir: the accounts database and key secret never touch the developer's.
            env={**base_env, "R1SERVE_DATA_DIR": str(workdir / "data"), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"r1serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"r1serve did not become healthy in {_START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _serve(
    tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str], args: tuple[str, ...] = ()
) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp(name), name, env, args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """An open server (no API keys)."""
    yield from _serve(tmp_path_factory, "open", {})


@pytest.fixture(scope="session")
def server_url(live_server: LiveServer) -> str:
    return live_server.url


@pytest.fixture(scope="session")
def api_keys() -> tuple[str, ...]:
    return API_KEYS


@pytest.fixture(scope="session")
def auth_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that requires ``Authorization: Bearer KEY`` with one of ``api_keys``."""
    for server in _serve(tmp_path_factory, "auth", {"R1SERVE_API_KEYS": ",".join(API_KEYS)}):
        yield server.url


# A ChatML template that opens <think> at the end of the prompt, as newer DeepSeek-R1 templates do:
# with it, the real default model's output is reasoning until </think>, which the thinking budget
# (or the model) writes. It puts the whole reasoning path through a real model over HTTP.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)


@pytest.fixture(scope="session")
def reasoning_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default model served as an R1-format model with a template that opens the reasoning."""
    env = {"R1SERVE_CHAT_TEMPLATE": THINKING_TEMPLATE, "R1SERVE_REASONING_FORMAT": "deepseek_r1"}
    for server in _serve(tmp_path_factory, "reasoning", env):
        yield server.url


@pytest.fixture(scope="session")
def fronting_server_url(tmp_path_factory: pytest.TempPathFactory, reasoning_server_url: str) -> Iterator[str]:
    """``r1serve serve --upstream``: a second r1serve fronting the reasoning server as its upstream, the
    way a user fronts their own vLLM or llama-server. The upstream's key comes from the environment."""
    args = (
        "--upstream", f"{reasoning_server_url}/v1",
        "--upstream-key-env", "FRONTED_KEY",
        "--reasoning-dialect", "reasoning_content",
    )  # fmt: skip
    for server in _serve(tmp_path_factory, "fronting", {"FRONTED_KEY": "sk-upstream-secret"}, args):
        yield server.url


ADMIN_KEY = "sk-admin-console-5e4d3c2b1a09"


@pytest.fixture(scope="session")
def admin_key() -> str:
    return ADMIN_KEY


@pytest.fixture(scope="session")
def admin_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose one key at the start is ``R1SERVE_ADMIN_KEY`` (an admin): keys created through the
    admin API (the console's keys page) are managed keys of its accounts database."""
    for server in _serve(tmp_path_factory, "admin", {"R1SERVE_ADMIN_KEY": ADMIN_KEY}):
        yield server.url
