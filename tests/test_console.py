"""The console's files and headers (fast, no model): hashed assets, uncached pages, the security headers,
and every asset a page names is one the server has. The browser tests are in test_console_live.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from browser import open_tab
from fake_upstream import FakeUpstream, Reply

from r1serve.api import create_app
from r1serve.api.console import CSP, STATIC
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings


@pytest.fixture
async def client(tmp_path: Path) -> httpx.AsyncClient:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    app = create_app(settings, registry=ModelRegistry())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c  # type: ignore[misc]


def _linked(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/assets/[^"]+)"', html)


@pytest.mark.parametrize("path", ["/", "/docs"])
async def test_pages_are_uncached_with_strict_headers_and_link_hashed_assets(client: httpx.AsyncClient, path: str):
    page = await client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self';" in CSP and "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    # No inline script or style, no remote resource: everything the page loads is one of ours.
    assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None
    assert "<style" not in page.text and " style=" not in page.text
    assert "http://" not in page.text and "https://" not in page.text and "{{" not in page.text
    links = _linked(page.text)
    assert links
    for url in links:
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert asset.headers["x-content-type-options"] == "nosniff"
        # The name carries the content's hash: a changed file gets a new URL.
        digest = url.rsplit("/", 1)[1].split(".")[-2]
        assert hashlib.sha256(asset.content).hexdigest().startswith(digest)


async def test_docs_load_the_vendored_swagger_ui_and_the_cdn_pages_are_off(client: httpx.AsyncClient):
    docs = (await client.get("/docs")).text
    bundle = (STATIC / "vendor" / "swagger-ui-bundle.js").read_bytes()
    assert any(url.startswith("/assets/swagger-ui-bundle.") for url in _linked(docs))
    served = [(await client.get(u)).content for u in _linked(docs)]
    assert bundle in served
    assert (await client.get("/redoc")).status_code == 404  # FastAPI's CDN page is off


async def test_unknown_asset_is_an_openai_style_404(client: httpx.AsyncClient):
    resp = await client.get("/assets/console.000000000000.js")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_static_files_are_package_data() -> None:
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"static/*"' in text and '"static/vendor/*"' in text


# ----------------------------------------------------------------------------- hostile model output, in Chromium
# The exact bytes must be hostile, which no real model can be made to write on demand: a real
# `r1serve serve --upstream` fronts a fake upstream on loopback (tests/fake_upstream.py) that streams them,
# split into 5-character chunks so that every tag arrives in pieces.

HOSTILE = (
    '<img src=x onerror=alert(1)> <script>alert(2)</script> ![pixel](https://evil.example/p.png) '
    '<img src="https://evil.example/i.png"> <a href="javascript:alert(3)">link</a> '
    '<svg onload=alert(4)></svg> <iframe src="https://evil.example/"></iframe> '
    '<link rel=stylesheet href="https://evil.example/s.css"> <style>body{display:none}</style>'
)


@contextmanager
def _hostile_server(tmp_path: Path) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    reply = Reply(fields=[("reasoning_content", "Thinking: " + HOSTILE), ("content", HOSTILE)])
    upstream = FakeUpstream(default=reply)
    asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1serve", "serve", "--upstream", upstream.base_url, "--port", str(port),
         "--reasoning-dialect", "reasoning_content"],
        cwd=tmp_path, env={**base, "R1SERVE_DATA_DIR": str(tmp_path / "data")},
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        asyncio.run_coroutine_threadsafe(upstream.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_hostile_model_output_renders_as_inert_text(browser: object, tmp_path: Path, screenshots: Path) -> None:
    with _hostile_server(tmp_path) as url:
        tab = open_tab(browser, url)
        page = tab.page
        page.goto(url)  # type: ignore[attr-defined]
        page.wait_for_function("document.querySelector('#model').options.length > 0")  # type: ignore[attr-defined]
        page.fill("#prompt", "Say something dangerous.")  # type: ignore[attr-defined]
        page.click("#send")  # type: ignore[attr-defined]
        message = page.locator('li.msg.assistant[data-state="done"]')  # type: ignore[attr-defined]
        message.wait_for(timeout=60_000)
        # Every byte arrived and is shown as text; nothing became an element.
        assert message.locator(".answer").text_content() == HOSTILE
        assert message.locator(".reasoning-text").text_content() == "Thinking: " + HOSTILE
        for tag in ("img", "script", "svg", "iframe", "a", "link", "style"):
            assert page.locator(f"#messages {tag}").count() == 0, tag  # type: ignore[attr-defined]
        assert page.locator("body").is_visible()  # type: ignore[attr-defined]
        message.locator("details.reasoning summary").click()  # open the panel: its text is inert too
        page.screenshot(path=str(screenshots / "playground-hostile-output.png"))  # type: ignore[attr-defined]
        tab.assert_clean()  # no dialog, no request beyond the origin, no CSP violation, no console error
