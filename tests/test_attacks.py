"""Attacks found by probing r1serve as an attacker would (the hardening issue), one regression test each.

Sections follow the issue's numbering. Each test fails on the code before its fix. The in-process tests
drive the real app (httpx's ASGI transport, base URL http://localhost: a loopback name, as a browser on
the same machine would send); the server tests run a real ``r1serve serve --upstream`` process in front
of a fake upstream on loopback, and talk to it over TCP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream, Reply

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.gateway import GatewayOptions, build_from_config, load_gateway_config
from r1serve.routing.build import close_registry
from r1serve.settings import Settings

ADMIN = "sk-admin-attacks-0123456789"
HELLO = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **extra)  # type: ignore[call-arg]


@asynccontextmanager
async def app_client(
    tmp_path: Path, upstream: FakeUpstream, *, accounts: bool = False, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in front of ``upstream`` (one provider), with the accounts layer when asked."""
    text = f'[providers.fake]\nbase_url = "{upstream.base_url}"\nmodel = "fake-r1"\ndialect = "reasoning_content"\n'
    path = tmp_path / "providers.toml"
    path.write_text(text + "\n[gateway]\nretries = 0\n")
    config = load_gateway_config(GatewayOptions(providers_file=path, env_file=None, health_interval=0), env={})
    assert config is not None
    registry = await build_from_config(config)
    s = _settings(tmp_path, admin_key=ADMIN if accounts else None, key_secret="attacks-secret-0123456789", **settings)
    acc = Accounts.open(s) if accounts else None
    if acc is not None:
        acc.start()
    app = create_app(s, registry=registry, accounts=acc)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            yield client
    finally:
        await close_registry(registry)
        if acc is not None:
            acc.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def gateway_process(tmp_path: Path, upstream: FakeUpstream, **env: str) -> AsyncIterator[tuple[str, Path]]:
    """``r1serve serve --upstream`` as a user starts it, as a child process; yields its URL and log file."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "r1serve", "serve", "--upstream", upstream.base_url, "--port", str(port),
            cwd=tmp_path, env={**base, "R1SERVE_DATA_DIR": str(tmp_path / "data"), **env},
            stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                if proc.returncode is not None:
                    raise RuntimeError(f"r1serve exited: {log_path.read_text()}")
                try:
                    if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"r1serve did not start: {log_path.read_text()}")
        yield url, log_path
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


# ----------------------------------------------------------------------------- 3. upstream error text

LEAKY_500 = (
    "Traceback (most recent call last):\n  File \"/srv/inference/app/handlers.py\", line 88, in chat\n"
    "sqlalchemy.exc.OperationalError: could not connect to postgresql://svc:hunter2@10.1.2.3:5432/billing"
)


async def test_upstream_error_body_reaches_neither_the_client_nor_public_health(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    leaky = Reply(kind="status", status=500, body=LEAKY_500)
    async with FakeUpstream(default=leaky) as up, app_client(tmp_path, up, accounts=True) as client:
        error = _error(
            await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=_auth(ADMIN)), 502
        )
        assert "HTTP 500" in error["message"] and "fake" in error["message"]
        for secret in ("hunter2", "Traceback", "/srv/inference", "10.1.2.3"):
            assert secret not in error["message"]

        public = (await client.get("/health")).text
        for private in ("hunter2", "Traceback", "last_error", "base_url", str(up.port)):
            assert private not in public
        target = (await client.get("/health")).json()["engines"][0]["targets"][0]
        assert target["failures"] == 1 and target["status"]  # the state is still shown

        admin = (await client.get("/health", headers=_auth(ADMIN))).json()["engines"][0]["targets"][0]
        assert admin["base_url"] == up.base_url and admin["last_error"] == "upstream fake failed (HTTP 500)"
        # A wrong key on the public page is no error, and no admin either.
        wrong = await client.get("/health", headers=_auth("sk-wrong-0123456789"))
        assert wrong.status_code == 200 and "base_url" not in wrong.text
    # The operator's log has the upstream's words, with the password scrubbed.
    assert "OperationalError" in caplog.text and "hunter2" not in caplog.text
    assert "postgresql://[redacted]@10.1.2.3" in caplog.text


# ----------------------------------------------------------------------------- 4. web pages driving the open server


async def test_json_endpoints_refuse_simple_content_types(tmp_path: Path) -> None:
    body = json.dumps({"messages": HELLO})
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": kind} if kind else {}
            resp = await client.post("/v1/chat/completions", content=body, headers=headers)
            assert _error(resp, 415)["code"] == "unsupported_media_type", kind
        assert len(up.requests) == 0  # nothing reached the model
        ok = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200, ok.text
        # The R tutorial's forms still work on /deepseek_chat.
        assert (await client.post("/deepseek_chat", data={"prompt": "hi"})).status_code == 200
        assert (await client.post("/deepseek_chat?prompt=hi")).status_code == 200


async def test_foreign_host_is_refused_on_loopback(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
            resp = await client.post("/v1/chat/completions", json={"messages": HELLO}, headers={"host": host})
            assert _error(resp, 403)["code"] == "host_not_allowed", host
        assert _error(await client.get("/v1/models", headers={"host": "evil.example"}), 403)
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"):
            assert (await client.get("/v1/models", headers={"host": host})).status_code == 200, host
    async with FakeUpstream() as up, app_client(tmp_path, up, allowed_hosts=["gpu-box.lan"]) as client:
        assert (await client.get("/v1/models", headers={"host": "gpu-box.lan:8000"})).status_code == 200
        assert (await client.get("/v1/models", headers={"host": "evil.example"})).status_code == 403
    # Beyond loopback the server is reached by names it cannot know (keys protect it there).
    async with FakeUpstream() as up, app_client(tmp_path, up, host="0.0.0.0") as client:
        assert (await client.get("/v1/models", headers={"host": "r1.example.com"})).status_code == 200


async def test_foreign_origin_and_cross_site_requests_are_refused(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        foreign = {"origin": "http://evil.example"}
        assert _error(await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=foreign), 403)[
            "code"
        ] == "origin_not_allowed"
        assert _error(await client.post("/deepseek_chat", data={"prompt": "hi"}, headers=foreign), 403)
        assert _error(await client.post("/deepseek_chat", data={"prompt": "hi"}, headers={"origin": "null"}), 403)
        # An <img src> or a no-cors fetch sends no Origin, but says where it comes from.
        no_cors = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
        assert _error(await client.post("/deepseek_chat?prompt=hi", headers=no_cors), 403)
        assert len(up.requests) == 0
        # The server's own pages (same origin), and a user following a link, still work.
        same = {"origin": "http://localhost", "sec-fetch-site": "same-origin"}
        assert (await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=same)).status_code == 200
        link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
        assert (await client.get("/docs", headers=link)).status_code == 200
    async with FakeUpstream() as up, app_client(tmp_path, up, allowed_origins=["https://app.example"]) as client:
        allowed = {"origin": "https://app.example"}
        assert (await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=allowed)).status_code == 200


# ----------------------------------------------------------------------------- 5. an empty model list


async def test_empty_model_list_never_means_every_model(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up, accounts=True) as client:
        admin = _auth(ADMIN)
        error = _error(await client.post("/v1/admin/keys", json={"name": "u", "models": []}, headers=admin), 400)
        assert error["param"] == "models"
        created = await client.post("/v1/admin/keys", json={"name": "u", "models": ["fake-r1"]}, headers=admin)
        assert created.status_code == 200, created.text
        ident = created.json()["id"]
        error = _error(await client.patch(f"/v1/admin/keys/{ident}", json={"models": []}, headers=admin), 400)
        assert error["param"] == "models"
        assert (await client.get(f"/v1/admin/keys/{ident}", headers=admin)).json()["models"] == ["fake-r1"]
        # Null (or leaving it out) still means all, on purpose.
        widened = await client.patch(f"/v1/admin/keys/{ident}", json={"models": None}, headers=admin)
        assert widened.json()["models"] is None


async def test_admin_key_bodies_are_bounded(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up, accounts=True) as client:
        admin = _auth(ADMIN)
        for field, value in (("budget_usd", 1e300), ("rpm", 10**22), ("tpm", 10**22), ("budget_usd", -1)):
            resp = await client.post("/v1/admin/keys", json={"name": "big", field: value}, headers=admin)
            assert _error(resp, 400)["param"] == field, (field, value)
        resp = await client.post("/v1/admin/keys", json={"name": "p", "budget_period": "week"}, headers=admin)
        assert _error(resp, 400)["param"] == "budget_period"
        assert (await client.get("/v1/admin/keys", headers=admin)).json()["data"] == []
        error = _error(await client.get("/v1/admin/keys/nope", headers=admin), 404)
        assert error["type"] == "invalid_request_error" and error["code"] == "key_not_found"


# ----------------------------------------------------------------------------- 6. forged log lines


async def test_log_lines_cannot_be_forged(tmp_path: Path) -> None:
    async with (
        FakeUpstream() as up,
        gateway_process(tmp_path, up, R1SERVE_ADMIN_KEY=ADMIN) as (url, log_path),
        httpx.AsyncClient() as client,
    ):
        await client.get(f"{url}/x%0A06:46:00%20INFO%20%20%20%20r1serve.api%20[-]%20forged%1b[31m")
        name = "mallory\n06:47:00 INFO    r1serve.accounts [-] forged too"
        created = await client.post(f"{url}/v1/admin/keys", json={"name": name}, headers=_auth(ADMIN))
        assert created.status_code == 200, created.text
        await asyncio.sleep(1.0)  # the access log's batch is written every 0.5 s
    lines = log_path.read_text().splitlines()
    assert not [line for line in lines if line.startswith(("06:46:00", "06:47:00"))], lines
    text = "\n".join(lines)
    assert "\x1b" not in text
    assert "/x\\n06:46:00" in text and "mallory\\n06:47:00" in text


# ----------------------------------------------------------------------------- 7. smaller ones


async def test_slow_clients_cannot_hold_the_servers_sockets(tmp_path: Path) -> None:
    env = {"R1SERVE_HEADER_TIMEOUT": "1", "R1SERVE_MAX_CONNECTIONS": "8"}
    async with FakeUpstream() as up, gateway_process(tmp_path, up, **env) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")  # and never the rest
            await writer.drain()
            slow.append((reader, writer))
        # Past the cap, a new connection is answered 503 at once, not left hanging.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await asyncio.wait_for(reader.read(), timeout=30)
        assert head.startswith(b"HTTP/1.1 503"), head
        writer.close()
        # The slow ones are closed by the server once their headers are late.
        for reader, writer in slow:
            assert await asyncio.wait_for(reader.read(), timeout=30) == b""
            writer.close()
        async with httpx.AsyncClient() as client:
            ok = await client.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=30)
            assert ok.status_code == 200, ok.text


async def test_unknown_fields_header_is_capped(tmp_path: Path) -> None:
    body: dict[str, Any] = {"messages": HELLO, **{f"field_{i:05d}": 1 for i in range(20_000)}}
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        header = resp.headers["x-r1serve-unknown-fields"]
        assert len(header) <= 2100 and header.startswith("field_00000,field_00001,")
        shown = header.count(",")  # the names, then "...N more"
        assert header.endswith(f",...{20_000 - shown} more")


async def test_strict_wire_types_and_huge_numbers(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for field, value in (("max_tokens", "4"), ("max_tokens", True), ("max_tokens", 2.0), ("temperature", "0.5"),
                             ("stream", "true"), ("max_tokens", 10**25)):  # fmt: skip
            resp = await client.post("/v1/chat/completions", json={"messages": HELLO, field: value})
            assert _error(resp, 400)["param"] == field, (field, value)
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
        error = _error(await client.post("/v1/chat/completions", content=raw, headers=JSON), 400)
        assert "digits" in error["message"] and "sys." not in error["message"], error
        assert len(up.requests) == 0
        assert (await client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 1})).status_code == 200


async def test_upstream_redirects_are_not_followed(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        loop = Reply(kind="status", status=307, headers={"Location": f"{up.base_url}/chat/completions"})
        up.default = loop
        async with app_client(tmp_path, up) as client:
            error = _error(await client.post("/v1/chat/completions", json={"messages": HELLO}), 502)
            assert "redirect" in error["message"] and "HTTP 307" in error["message"]
        assert len(up.requests) == 1  # the prompt went out once, not once per hop


async def test_deepseek_chat_honours_max_tokens(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        assert (await client.post("/deepseek_chat", json={"prompt": "hi", "max_tokens": 500})).status_code == 200
        assert (await client.post("/deepseek_chat", data={"prompt": "hi", "max_tokens": "7"})).status_code == 200
        assert (await client.post("/deepseek_chat?prompt=hi&max_tokens=9")).status_code == 200
        assert [r["body"]["max_tokens"] for r in up.requests] == [500, 7, 9]
        for bad in ("0", "many", -1, 1.5):
            resp = await client.post("/deepseek_chat", json={"prompt": "hi", "max_tokens": bad})
            assert _error(resp, 400)["param"] == "max_tokens", bad
