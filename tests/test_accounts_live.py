"""Accounts through the real HTTP API: real ``r1serve serve`` processes with the real default model.

* SQLite (the embedded default in the server's data dir): the admin API, scopes, budgets under 50
  parallel requests, a stream cut by the client, /v1/usage, and no key in the log or the database.
* Two server processes on one PostgreSQL share a key's limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import DEFAULT_MODEL, LiveServer
from pg import PostgresServer, postgres  # noqa: F401 - the fixture

from r1serve.accounts import db as accounts_db
from r1serve.accounts.ledger import ledger_rows
from r1serve.settings import Settings

pytestmark = pytest.mark.slow

ADMIN = "sk-admin-live-test-0123456789"
SECRET = "live-test-key-secret-0123456789"
# Output at $1 per token, input free: a request with max_tokens=5 that hits the limit costs exactly $5.
PRICES = json.dumps({DEFAULT_MODEL: {"input": 0, "output": 1_000_000}})
COUNTING = [{"role": "user", "content": "Count from 1 to 200, separated by commas. Only the numbers."}]


def _env(**extra: str) -> dict[str, str]:
    return {"R1SERVE_ADMIN_KEY": ADMIN, "R1SERVE_KEY_SECRET": SECRET, "R1SERVE_PRICES": PRICES, **extra}


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str]) -> LiveServer:
    server = LiveServer(tmp_path_factory.mktemp(name), name, env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = _start(tmp_path_factory, "accounts", _env())
    try:
        yield s
    finally:
        s.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(url: str, **body: object) -> str:
    r = httpx.post(f"{url}/v1/admin/keys", json=body, headers=_auth(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["key"].startswith("r1-")
    return str(r.json()["key"])


def chat(url: str, key: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": COUNTING, "max_tokens": 5, "temperature": 0, **body},
        headers=_auth(key),
        timeout=300,
    )


def _ledger(server: LiveServer) -> list[dict[str, object]]:
    data_dir = server.log_path.parent / "data"
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(data_dir=data_dir)))
    try:
        return ledger_rows(engine)
    finally:
        engine.dispose()


def test_auth_scopes_and_admin_api(server: LiveServer) -> None:
    url = server.url
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": COUNTING}, timeout=30).status_code == 401
    user = create_key(url, name="scoped", models=["some-other-model"])
    r = chat(url, user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert httpx.get(f"{url}/v1/admin/keys", headers=_auth(user), timeout=30).status_code == 403

    listed = httpx.get(f"{url}/v1/admin/keys", headers=_auth(ADMIN), timeout=30).json()["data"]
    mine = next(k for k in listed if k["name"] == "scoped")
    assert "key" not in mine and mine["prefix"] == user[: len("r1-") + 8] + "…"
    r = httpx.patch(f"{url}/v1/admin/keys/{mine['id']}", json={"models": None}, headers=_auth(ADMIN), timeout=30)
    assert r.status_code == 200 and r.json()["models"] is None
    ok = chat(url, user)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["estimated_cost"] == pytest.approx(ok.json()["usage"]["completion_tokens"] * 1.0)

    assert httpx.delete(f"{url}/v1/admin/keys/{mine['id']}", headers=_auth(ADMIN), timeout=30).status_code == 200
    r = chat(url, user)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert user.split("_", 1)[1] not in r.text


async def test_fifty_parallel_requests_budget_admits_ten(server: LiveServer) -> None:
    key = create_key(server.url, name="budget", budget_usd=50)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one() -> httpx.Response:
            return await client.post(
                f"{server.url}/v1/chat/completions",
                json={"messages": COUNTING, "max_tokens": 5, "temperature": 0},
                headers=_auth(key),
            )

        responses = await asyncio.gather(*(one() for _ in range(50)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10, codes
    assert codes.count(429) == 40
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] in ("rate_limit_exceeded", "insufficient_quota")
    assert {r.json()["usage"]["estimated_cost"] for r in responses if r.status_code == 200} == {5.0}
    # Spent now: exactly the budget; the next one is out of quota.
    time.sleep(1.5)  # the ledger writer settles
    r = chat(server.url, key)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    usage = httpx.get(f"{server.url}/v1/usage", headers=_auth(key), timeout=30).json()
    assert usage["totals"]["requests"] == 10 and usage["totals"]["cost_usd"] == pytest.approx(50.0)
    assert usage["data"][0]["model"] == DEFAULT_MODEL


def test_stream_cut_by_client_is_billed_for_what_it_received(server: LiveServer) -> None:
    key = create_key(server.url, name="cutter")
    received = 0
    text = ""
    with (
        httpx.Client(timeout=300) as client,
        client.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={"messages": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True},
            headers=_auth(key),
        ) as resp,
    ):
        assert resp.status_code == 200
        response_id = None
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            response_id = chunk["id"]
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if delta.get("content"):
                received += 1
                text += delta["content"]
            if received >= 12:
                break  # hang up mid-stream
    assert response_id is not None
    deadline = time.monotonic() + 30
    row = None
    while time.monotonic() < deadline and row is None:
        row = next((r for r in _ledger(server) if r["response_id"] == response_id), None)
        time.sleep(0.5)
    assert row is not None, "no ledger row for the cut stream"
    assert row["status"] == "cancelled"
    # Billed for the prompt and about the tokens handed over (a few more may have been in flight).
    assert received - 1 <= int(row["completion_tokens"]) <= received + 8, (received, row)  # type: ignore[call-overload]
    assert int(row["prompt_tokens"]) > 10  # type: ignore[call-overload]
    assert int(row["cost_nanos"]) == int(row["completion_tokens"]) * 1_000_000_000  # type: ignore[call-overload]
    usage = httpx.get(f"{server.url}/v1/usage", headers=_auth(key), timeout=30).json()
    assert usage["totals"]["completion_tokens"] == row["completion_tokens"]


def test_keys_never_in_plain_text(server: LiveServer) -> None:
    key = create_key(server.url, name="secretive", rpm=1000)
    assert chat(server.url, key).status_code == 200
    wrong = key[:-3] + "xyz"
    r = chat(server.url, wrong)
    assert r.status_code == 401 and key not in r.text and wrong not in r.text
    time.sleep(1.5)
    log = server.log_tail(100_000)
    data_dir = server.log_path.parent / "data"
    stored = "".join(p.read_bytes().decode("latin-1") for p in data_dir.iterdir() if p.is_file())
    for secret in (key, key.split("_", 1)[1], wrong.split("_", 1)[1], ADMIN):
        assert secret not in log
        assert secret not in stored
    assert key[len("r1-") : len("r1-") + 8] in stored  # the visible prefix is stored: the dump is real


def test_two_processes_on_one_postgres_share_limits(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresServer,  # noqa: F811
) -> None:
    url = postgres.create_database()
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(database_url=url)))
    accounts_db.upgrade(engine)  # `r1serve db upgrade`
    engine.dispose()
    env = _env(R1SERVE_DATABASE_URL=url)
    a = _start(tmp_path_factory, "pg-a", env)
    try:
        b = _start(tmp_path_factory, "pg-b", env)
        try:
            rpm_key = create_key(a.url, name="rpm", rpm=6)
            budget_key = create_key(b.url, name="budget", budget_usd=25)
            time.sleep(3)  # each server's key cache polls the database every 2 s

            async def burst(key: str, n: int) -> list[int]:
                async with httpx.AsyncClient(timeout=600) as client:
                    rs = await asyncio.gather(
                        *(
                            client.post(
                                f"{(a if i % 2 else b).url}/v1/chat/completions",
                                json={"messages": COUNTING, "max_tokens": 5, "temperature": 0},
                                headers=_auth(key),
                            )
                            for i in range(n)
                        )
                    )
                return [r.status_code for r in rs]

            codes = asyncio.run(burst(rpm_key, 16))
            assert codes.count(200) == 6 and codes.count(429) == 10, codes
            codes = asyncio.run(burst(budget_key, 20))
            assert codes.count(200) == 5 and codes.count(429) == 15, codes
            time.sleep(1.5)
            both = [
                httpx.get(f"{s.url}/v1/usage", headers=_auth(budget_key), timeout=30).json()["totals"] for s in (a, b)
            ]
            assert both[0] == both[1] and both[0]["requests"] == 5 and both[0]["cost_usd"] == pytest.approx(25.0)
        finally:
            b.stop()
    finally:
        a.stop()
    assert "sk-admin" not in Path(a.log_path).read_text()
