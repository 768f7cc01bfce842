"""Console sign-in over HTTP (fast, no model): a key exchanged for a session cookie that holds no key, the
cookie honoured only for the console's own calls (header + origin), sign-out and key revocation ending
it, admin pages for admin keys only, and the usage series the dashboard charts (one grouped query).
The same flows in real Chromium are in test_console_dashboard_live.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from r1serve.accounts import Accounts, Principal
from r1serve.api import create_app
from r1serve.api.sessions import COOKIE
from r1serve.engines.base import EngineUsage
from r1serve.models.catalog import Prices
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings

ORIGIN = "http://localhost"
CONSOLE = {"X-R1serve-Console": "1", "Origin": ORIGIN}


def _settings(tmp_path: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "key_secret": "test-secret-0123456789abcdef",
        "keys_refresh_interval": 0.1,
    }
    return Settings(_env_file=None, **{**values, **extra})  # type: ignore[call-arg]


@pytest.fixture
def accounts(tmp_path: Path) -> AsyncIterator[Accounts]:
    acc = Accounts.open(_settings(tmp_path))
    acc.start()
    yield acc  # type: ignore[misc]
    acc.close()


@pytest.fixture
async def client(tmp_path: Path, accounts: Accounts) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_settings(tmp_path), registry=ModelRegistry(), accounts=accounts)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as c:
        yield c


async def _sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/console/session", headers={**CONSOLE, "Authorization": f"Bearer {key}"})


async def test_open_server_console_is_open(client: httpx.AsyncClient) -> None:
    who = (await client.get("/console/session")).json()
    assert who["open"] is True and who["signed_in"] is False
    assert (await client.get("/console/usage")).status_code == 200
    refused = await client.post("/console/session", headers={**CONSOLE, "Authorization": "Bearer anything"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "auth_off"


async def test_sign_in_sets_an_httponly_strict_cookie_with_no_key_in_it(
    client: httpx.AsyncClient, accounts: Accounts
) -> None:
    key, info = accounts.store.create("alice")
    assert (await client.get("/console/session")).json() == {
        "open": False, "signed_in": False, "admin": False, "name": None, "key": None,
    }  # fmt: skip
    # Pages that show data send a signed-out browser to the sign-in page.
    page = await client.get("/console/usage")
    assert page.status_code == 303 and page.headers["location"] == "/console/signin"

    resp = await _sign_in(client, key)
    assert resp.status_code == 200 and resp.json()["name"] == "alice"
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    value = client.cookies[COOKIE]
    assert key not in cookie and key[3:] not in value and info.prefix not in value
    assert len(value) >= 40  # 32 random bytes

    who = (await client.get("/console/session")).json()
    assert who["signed_in"] and who["name"] == "alice" and who["admin"] is False and key not in str(who)
    assert (await client.get("/console/usage")).status_code == 200


async def test_a_wrong_key_does_not_sign_in(client: httpx.AsyncClient, accounts: Accounts) -> None:
    accounts.store.create("someone")
    resp = await _sign_in(client, "r1-not-a-key")
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert COOKIE not in client.cookies
    missing = await client.post("/console/session", headers=CONSOLE)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "key"


async def test_the_cookie_alone_authorises_nothing(client: httpx.AsyncClient, accounts: Accounts) -> None:
    key, _ = accounts.store.create("bob")
    await _sign_in(client, key)
    # With the console's header, from the console's origin: the session is the caller.
    assert (await client.get("/v1/models", headers={"X-R1serve-Console": "1"})).status_code == 200
    assert (await client.get("/v1/usage", headers=CONSOLE)).status_code == 200
    # The cookie without the header (what a cross-site form or <img> would send): no caller at all.
    plain = await client.get("/v1/models")
    assert plain.status_code == 401 and plain.json()["error"]["type"] == "authentication_error"
    posted = await client.post(
        "/v1/chat/completions", headers={"Origin": ORIGIN, "Content-Type": "application/json"},
        content=b'{"messages": [{"role": "user", "content": "spend"}]}',
    )  # fmt: skip
    assert posted.status_code == 401
    # A state change must name the console's origin; a foreign one is refused before anything runs.
    no_origin = await client.post(
        "/v1/chat/completions", headers={"X-R1serve-Console": "1", "Content-Type": "application/json"},
        content=b'{"messages": [{"role": "user", "content": "spend"}]}',
    )  # fmt: skip
    assert no_origin.status_code == 401
    foreign = await client.get("/v1/models", headers={"X-R1serve-Console": "1", "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    cross = await client.get("/v1/models", headers={"X-R1serve-Console": "1", "Sec-Fetch-Site": "same-site"})
    assert cross.status_code == 401
    # Sign-in and sign-out are state changes: the header and the origin are required.
    assert (await client.delete("/console/session")).status_code == 403
    assert (await client.delete("/console/session", headers={"X-R1serve-Console": "1"})).status_code == 403
    assert (await client.get("/v1/models", headers={"X-R1serve-Console": "1"})).status_code == 200


async def test_sign_out_ends_the_session_on_the_server(client: httpx.AsyncClient, accounts: Accounts) -> None:
    key, _ = accounts.store.create("carol")
    await _sign_in(client, key)
    value = client.cookies[COOKIE]
    out = await client.delete("/console/session", headers=CONSOLE)
    assert out.status_code == 200 and out.json()["ended"] is True
    assert 'r1serve_session=""' in out.headers["set-cookie"] and "Max-Age=0" in out.headers["set-cookie"]
    # The old cookie, replayed: the session is gone on the server.
    client.cookies.set(COOKIE, value)
    replay = await client.get("/v1/models", headers={"X-R1serve-Console": "1"})
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "session_expired"
    assert (await client.get("/console/session")).json()["signed_in"] is False


async def test_revoking_the_key_ends_its_sessions(client: httpx.AsyncClient, accounts: Accounts) -> None:
    key, info = accounts.store.create("dave")
    await _sign_in(client, key)
    assert (await client.get("/v1/models", headers={"X-R1serve-Console": "1"})).status_code == 200
    accounts.store.revoke(info.id)
    resp = await client.get("/v1/models", headers={"X-R1serve-Console": "1"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "session_expired"
    assert (await client.get("/console/session")).json()["signed_in"] is False


async def test_admin_pages_for_admin_keys_only(client: httpx.AsyncClient, accounts: Accounts) -> None:
    user, _ = accounts.store.create("user")
    admin, _ = accounts.store.create("root", admin=True)
    await _sign_in(client, user)
    for path in ("/console/keys", "/console/deployments"):
        page = await client.get(path)
        assert page.status_code == 403 and "needs an admin API key" in page.text
        assert page.headers["content-security-policy"]
    api = await client.get("/v1/admin/keys", headers={"X-R1serve-Console": "1"})
    assert api.status_code == 403 and api.json()["error"]["code"] == "admin_required"
    await _sign_in(client, admin)  # replaces the user's session
    assert (await client.get("/console/keys")).status_code == 200
    assert (await client.get("/console/deployments")).status_code == 200
    created = await client.post("/v1/admin/keys", headers=CONSOLE, json={"name": "from-the-ui", "rpm": 5})
    assert created.status_code == 200 and created.json()["key"].startswith("r1-")


async def test_usage_series_is_one_grouped_query_by_key_and_by_model(
    client: httpx.AsyncClient, accounts: Accounts
) -> None:
    k1, i1 = accounts.store.create("one")
    k2, _ = accounts.store.create("two")
    admin, _ = accounts.store.create("root", admin=True)
    price = accounts.price("m", Prices(input=1.0, output=2.0))
    n = 0
    for key, model, count in ((k1, "m-a", 3), (k1, "m-b", 2), (k2, "m-a", 4)):
        p: Principal = accounts.authenticate(key)
        for _ in range(count):
            n += 1
            usage = EngineUsage(prompt_tokens=10, completion_tokens=7, reasoning_tokens=3)
            accounts.finish(None, response_id=f"s-{n}", principal=p, model_served=model, usage=usage, price=price)
    await _sign_in(client, admin)
    by_model = (await client.get("/v1/usage/series?by=model", headers={"X-R1serve-Console": "1"})).json()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    rows = {r["model"]: r for r in by_model["data"]}
    assert set(rows) == {"m-a", "m-b"} and rows["m-a"]["requests"] == 7 and rows["m-b"]["requests"] == 2
    assert rows["m-a"]["date"] == today and rows["m-a"]["reasoning_tokens"] == 21 and rows["m-a"]["answer_tokens"] == 28
    by_key = (await client.get("/v1/usage/series?by=key", headers={"X-R1serve-Console": "1"})).json()
    keys = {r["key_name"]: r for r in by_key["data"]}
    assert keys["one"]["requests"] == 5 and keys["two"]["requests"] == 4
    assert keys["one"]["key_prefix"].startswith("r1-") and keys["one"]["key"] == i1.id
    # A key that is not admin sees its own usage only.
    own = await client.get("/v1/usage/series?by=key", headers={"Authorization": f"Bearer {k1}"})
    assert [r["key_name"] for r in own.json()["data"]] == ["one"]
    bad = await client.get("/v1/usage/series?by=day", headers={"Authorization": f"Bearer {k1}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"


def test_session_store_caps_and_expires() -> None:
    from r1serve.api.auth import Caller
    from r1serve.api.sessions import SessionStore

    store = SessionStore(ttl=3600, max_sessions=2)
    a = store.create(Caller(key_id="a"), name="a", key=None)
    b = store.create(Caller(key_id="b"), name="b", key=None)
    c = store.create(Caller(key_id="c"), name="c", key=None)
    assert store.get(a) is None and store.get(b) is not None and store.get(c) is not None  # the oldest ended
    expired = SessionStore(ttl=0.0, max_sessions=2)
    assert expired.get(expired.create(Caller(key_id="x"), name="x", key=None)) is None
    assert len(expired) == 0
    idle = SessionStore(ttl=3600, max_sessions=2, idle=0.0)  # unused for its idle time: ended
    assert idle.get(idle.create(Caller(key_id="x"), name="x", key=None)) is None


def test_one_key_signing_in_over_and_over_cannot_sign_others_out() -> None:
    # Found by review: the table's cap ended the oldest sessions, whoever they were, and sign-in has no
    # limit, so any user key could end an admin's session by signing in a few thousand times.
    from r1serve.api.auth import Caller
    from r1serve.api.sessions import MAX_PER_KEY, SessionStore

    store = SessionStore(ttl=3600, max_sessions=MAX_PER_KEY + 2)
    admin = store.create(Caller(key_id="admin", admin=True), name="admin", key=None)
    other = store.create(Caller(key_id="bob"), name="bob", key=None)
    mallory = [store.create(Caller(key_id="mallory"), name="m", key=None) for _ in range(10 * MAX_PER_KEY)]
    assert store.get(admin) is not None and store.get(other) is not None
    assert sum(store.get(m) is not None for m in mallory) == MAX_PER_KEY  # the newest ones
    assert len(store) == MAX_PER_KEY + 2
    # The global cap ends the least recently used: bob's session, used last, outlives the admin's.
    assert store.get(other) is not None
    store.create(Caller(key_id="carol"), name="carol", key=None)
    assert store.get(admin) is None and store.get(other) is not None


async def test_the_cookie_is_secure_when_the_page_came_over_https(
    client: httpx.AsyncClient, accounts: Accounts
) -> None:
    # Found by review: behind a TLS-terminating proxy the request is http, so the cookie lacked Secure and a
    # typed http:// address would send it in the clear. The sign-in's Origin says how the page came.
    key, _ = accounts.store.create("alice")
    plain = await _sign_in(client, key)
    assert "Secure" not in plain.headers["set-cookie"]
    https = ORIGIN.replace("http://", "https://")
    resp = await client.post("/console/session", headers={**CONSOLE, "Origin": https, "Authorization": f"Bearer {key}"})
    assert resp.status_code == 200 and "Secure" in resp.headers["set-cookie"]
