"""The usage ledger through real ``r1serve serve --upstream URL`` processes (accounts on, as a user starts
it), in front of a fake upstream on loopback (tests/fake_upstream.py): no model is loaded.

* ``kill -9`` under concurrent load, then a restart: every response a client received (its own list of
  response ids) is in the ledger, none twice, and the daily roll-ups agree with the rows. SQLite (the
  default) and PostgreSQL.
* ``/v1/usage`` shows a request as soon as its response has ended (JSON and streams).
* A stream the client cuts is billed once, for what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream, Reply
from pg import PostgresServer, postgres  # noqa: F401 - the fixture

from r1serve.accounts import db as accounts_db
from r1serve.accounts.ledger import ledger_rows
from r1serve.settings import Settings

KEYS = ("sk-ledger-crash-0", "sk-ledger-usage-1", "sk-ledger-stream-2", "sk-ledger-cut-3")
SECRET = "ledger-test-key-secret-0123456789"
BODY = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64}


class ThreadedUpstream:
    """A :class:`FakeUpstream` on its own event loop in a thread, so blocking test code can drive it."""

    def __init__(self, default: Reply) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeUpstream(default=default)
        self.url = asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """``r1serve serve --upstream URL`` as a user starts it: defaults, accounts on, keys from the env."""

    def __init__(self, workdir: Path, upstream: str, database_url: str | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.database_url = database_url
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        env |= {"R1SERVE_DATA_DIR": str(self.data_dir), "R1SERVE_API_KEYS": ",".join(KEYS),
                "R1SERVE_KEY_SECRET": SECRET}  # fmt: skip
        if database_url:
            env["R1SERVE_DATABASE_URL"] = database_url
        self.log = open(workdir / f"r1serve-{self.port}.log", "wb")  # noqa: SIM115 - the server's whole life
        cmd = [sys.executable, "-m", "r1serve", "serve", "--upstream", upstream, "--reasoning-dialect",
               "reasoning_content", "--port", str(self.port)]  # fmt: skip
        # cwd: a fresh directory, so a developer's .env cannot change the server under test.
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"r1serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"r1serve did not become healthy:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.workdir / f"r1serve-{self.port}.log").read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def ledger(self) -> list[dict[str, Any]]:
        url = accounts_db.database_url(Settings(_env_file=None, data_dir=self.data_dir, database_url=self.database_url))  # type: ignore[call-arg]
        engine = accounts_db.make_engine(url)
        try:
            return ledger_rows(engine, limit=1_000_000)
        finally:
            engine.dispose()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def usage_totals(server: Gateway, key: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/usage", headers=_auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["totals"])


# ----------------------------------------------------------------------------- kill -9 under load


async def _load(server: Gateway, received: list[str], enough: int) -> None:
    """16 clients, half streaming, until ``enough`` responses were received; then kill -9 the server
    while they keep going. A response counts as received when the client has all of it: a JSON body
    read to its end, or a stream read to ``[DONE]``."""

    async def client(i: int, http: httpx.AsyncClient) -> None:
        stream = i % 2 == 0
        while True:
            try:
                if stream:
                    async with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                        rid, done = None, False
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                rid = json.loads(line[len("data: ") :]).get("id", rid)
                            done = done or line == "data: [DONE]"
                        if r.status_code == 200 and done and rid is not None:
                            received.append(rid)
                else:
                    r = await http.post("/v1/chat/completions", json=BODY)
                    if r.status_code == 200:
                        received.append(r.json()["id"])
            except (httpx.HTTPError, json.JSONDecodeError):
                return  # the server is gone

    async with httpx.AsyncClient(base_url=server.url, headers=_auth(KEYS[0]), timeout=30) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(16)]
        while len(received) < enough and not all(t.done() for t in tasks):
            await asyncio.sleep(0.005)
        server.kill()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_keeps_every_received_response(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database_url = None
    if backend == "postgresql":
        pg: PostgresServer = request.getfixturevalue("postgres")
        database_url = pg.create_database()
        engine = accounts_db.make_engine(accounts_db.database_url(Settings(_env_file=None, database_url=database_url)))  # type: ignore[call-arg]
        accounts_db.upgrade(engine)  # `r1serve db upgrade`
        engine.dispose()
    # Streams that take a few milliseconds: at any moment several are mid-way when the kill comes.
    up = ThreadedUpstream(Reply(fields=[("reasoning_content", "Thinking it over."), ("content", "Hi there.")],
                                chunk=4, chunk_delay=0.001))  # fmt: skip
    try:
        server = Gateway(tmp_path, up.url, database_url)
        received: list[str] = []
        try:
            asyncio.run(_load(server, received, enough=400))
        finally:
            server.stop()
        assert len(received) >= 400 and len(set(received)) == len(received)
        # Restart on the same database: it opens (SQLite recovers its WAL), serves, and counts.
        again = Gateway(tmp_path, up.url, database_url)
        try:
            rows = again.ledger()
            totals = usage_totals(again, KEYS[0])
        finally:
            again.stop()
    finally:
        up.close()
    ids = [str(r["response_id"]) for r in rows if r["key_id"] == "static-0"]
    assert len(ids) == len(set(ids)), "a response was recorded twice"
    missing = set(received) - set(ids)
    assert not missing, f"{len(missing)} of {len(received)} received responses are not in the ledger"
    # The roll-ups /v1/usage reads were committed with the rows: no row counted twice or missed.
    assert totals["requests"] == len(ids)


# ----------------------------------------------------------------------------- usage right after a response


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    up = ThreadedUpstream(Reply())
    try:
        yield up
    finally:
        up.close()


@pytest.fixture(scope="module")
def gateway(upstream: ThreadedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = Gateway(tmp_path_factory.mktemp("ledger"), upstream.url)
    try:
        yield server
    finally:
        server.stop()


def test_usage_shows_a_request_as_soon_as_its_response_ended(gateway: Gateway) -> None:
    key = KEYS[1]
    completion = 0
    with httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=30) as http:
        for i in range(20):
            if i % 2:
                with http.stream("POST", "/v1/chat/completions",
                                 json={**BODY, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
                    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                completion += json.loads(lines[-2][len("data: ") :])["usage"]["completion_tokens"]
            else:
                r = http.post("/v1/chat/completions", json=BODY)
                assert r.status_code == 200, r.text
                completion += r.json()["usage"]["completion_tokens"]
            # The very next request, on the same connection: no waiting for a batch.
            totals = usage_totals(gateway, key)
            assert totals["requests"] == i + 1
            assert totals["completion_tokens"] == completion


def test_cut_stream_is_billed_once_for_what_was_sent(gateway: Gateway, upstream: ThreadedUpstream) -> None:
    key = KEYS[3]
    # 100 pieces of 4 characters (one token each by the gateway's estimate), 20 ms apart: 2 s in all.
    upstream.fake.push(Reply(fields=[("content", "abcd" * 100)], chunk=4, chunk_delay=0.02))
    pieces, response_id = 0, None
    with (
        httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                response_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    pieces += 1
            if pieces == 10:
                break  # hang up mid-stream
    assert response_id is not None
    deadline = time.monotonic() + 30
    while usage_totals(gateway, key)["requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the hang-up on its next write or its disconnect watch
    time.sleep(2.5)  # past the whole reply: had the stream gone on to its end, it would be billed by now
    rows = [r for r in gateway.ledger() if r["response_id"] == response_id]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["status"] == "cancelled"
    assert pieces <= row["completion_tokens"] < 100, row  # what was sent (a few were in flight), not the whole
    totals = usage_totals(gateway, key)
    assert totals["requests"] == 1 and totals["completion_tokens"] == row["completion_tokens"]
