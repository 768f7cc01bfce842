"""The web console: the playground at ``/`` and the API docs at ``/docs``, from files shipped in the package.

Everything the pages load comes from ``r1serve/static`` (the vendored Swagger UI included, see
scripts/vendor-console.py), so the pages work on a machine without internet and nothing needs node.
Assets are served under content-hashed names (``/assets/console.3f2a9c1b0d4e.js``), cached for a year;
the HTML pages, which name them, are never cached, so an upgrade is picked up on the next load.

Every response here carries a strict Content-Security-Policy: scripts, styles and fetches from this origin
only, no inline script or style, images from here or ``data:``. The pages render model output, which is
untrusted; the policy is the second line behind rendering it as text.

There is no ReDoc page: its bundle (2.5 and 3.0, tried) loads its logo from its CDN, runs search in a
``blob:`` worker, injects ``<style>`` elements (3.0 ignores the nonce option) and 3.0 needs ``eval``; it
cannot run under this policy offline.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from r1serve.api.auth import api_is_open, live_session
from r1serve.errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_IMMUTABLE = "public, max-age=31536000, immutable"
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# In a page template, {{asset:console.js}} becomes that asset's hashed URL.
_ASSET_REF = re.compile(r"\{\{asset:([\w./-]+)\}\}")
_PAGES = {
    "/": "index.html",
    "/docs": "docs.html",
    "/console/signin": "signin.html",
    "/console/usage": "usage.html",
    "/console/keys": "keys.html",
    "/console/models": "models.html",
    "/console/deployments": "deployments.html",
    "denied": "denied.html",
}
# Dashboard pages: signed in, or an open server. The keys and deployments pages also need an admin key.
_SIGNED_IN = frozenset({"/console/usage", "/console/keys", "/console/models", "/console/deployments"})
_ADMIN = frozenset({"/console/keys", "/console/deployments"})


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str


class Console:
    """The static files, read and hashed once: assets by hashed name, and the pages with their links filled."""

    def __init__(self, root: Path = STATIC) -> None:
        self.assets: dict[str, Asset] = {}
        self.urls: dict[str, str] = {}  # logical name (vendor/swagger-ui.css) -> /assets/swagger-ui.<hash>.css
        for path in sorted(root.rglob("*")):
            media_type = _MEDIA_TYPES.get(path.suffix)
            if not path.is_file() or media_type is None:
                continue
            body = path.read_bytes()
            hashed = f"{path.stem}.{hashlib.sha256(body).hexdigest()[:12]}{path.suffix}"
            self.assets[hashed] = Asset(body, media_type)
            self.urls[path.relative_to(root).as_posix()] = f"/assets/{hashed}"
        # A page naming a missing asset fails here, at startup, not as a broken page.
        self.pages = {
            route: _ASSET_REF.sub(lambda m: self.urls[m[1]], (root / name).read_text()).encode()
            for route, name in _PAGES.items()
        }

    def page(self, route: str, status: int = 200) -> Response:
        return Response(
            self.pages[route],
            status_code=status,
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    def asset(self, name: str) -> Response:
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound(f"No console asset {name!r}.", code="not_found")
        headers = {**SECURITY_HEADERS, "Cache-Control": _IMMUTABLE}
        return Response(asset.body, media_type=asset.media_type, headers=headers)


@cache
def shipped() -> Console:
    """The package's own files, read once per process however many apps are built."""
    return Console()


def console_router(console: Console | None = None) -> APIRouter:
    """The console's routes; the app includes them (FastAPI's own CDN-loading /docs and /redoc are off)."""
    files = console or shipped()
    router = APIRouter(include_in_schema=False)

    async def page(request: Request) -> Response:
        route = request.url.path
        if route in _SIGNED_IN:
            # Only which static page to send is decided here; every call for data is checked on its own.
            session = await live_session(request)
            if session is None and not await api_is_open(request):
                return RedirectResponse("/console/signin", status_code=303, headers=SECURITY_HEADERS)
            if route in _ADMIN and session is not None and not session.caller.admin:
                return files.page("denied", status=403)
        return files.page(route)

    async def asset(name: str) -> Response:
        return files.asset(name)

    for route in _PAGES:
        if route.startswith("/"):
            router.add_api_route(route, page, methods=["GET", "HEAD"])
    router.add_api_route("/assets/{name}", asset, methods=["GET", "HEAD"])
    return router
