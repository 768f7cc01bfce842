"""The console's files and headers (fast, no model): hashed assets, uncached pages, the security headers,
and every asset a page names is one the server has. The browser tests are in test_console_browser.py (hostile
output, no model) and test_console_live.py (the real model)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import pytest

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


@pytest.mark.parametrize(
    "path",
    ["/", "/docs", "/console/signin", "/console/usage", "/console/keys", "/console/models", "/console/deployments"],
)
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
    assert "http://" not in page.text and "https://" not in page.text and "{" not in page.text
    assert (await client.head(path)).status_code == 200
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


def test_vendored_files_match_their_recorded_checksums() -> None:
    """Offline half of scripts/vendor-console.py: every shipped vendor file is the one its record pins
    (the script itself re-fetches the pinned versions from npm and compares)."""
    import json

    record = json.loads((STATIC / "vendor" / "VENDOR.json").read_text())
    assert {"swagger-ui-dist", "marked", "dompurify", "@highlightjs/cdn-assets"} <= set(record)
    for package in record.values():
        assert package["version"] and package["integrity"].startswith("sha512-")
        for name, digest in package["files"].items():
            assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name
