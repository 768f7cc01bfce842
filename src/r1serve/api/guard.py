"""Requests a browser sends on behalf of another site: refused before anything runs.

An open server (loopback, no keys) answers whoever can reach it, and a web page the user has open can:
a cross-site form post or a ``fetch`` with a "simple" content type needs no CORS pre-flight, and DNS
rebinding gives a page a host name that resolves to 127.0.0.1 so that it can read the answers too.
Three checks close that (checked in the request-context middleware, for every request):

* ``Host`` must name this server when it listens on loopback (any name a rebinding page uses is foreign),
  or be in ``R1SERVE_ALLOWED_HOSTS``;
* a foreign ``Origin`` (not the server's own, not in ``R1SERVE_ALLOWED_ORIGINS``) is refused, and so is a
  browser's cross-site request without one (``Sec-Fetch-Site``) other than a plain navigation;
* JSON endpoints take only JSON content types (``text/plain`` is how pages dodge the pre-flight);
  ``/deepseek_chat`` also takes the form and query forms the R Plumber tutorial uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address

from starlette.types import Scope

from r1serve.api.context import scope_header
from r1serve.errors import InvalidRequest, PermissionDenied, R1ServeError

# Endpoints whose bodies may be forms (the R tutorial posts prompt=... with curl -d).
FORM_PATHS = frozenset({"/deepseek_chat"})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


def is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """``Host`` without its port, lower-cased (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class BrowserGuard:
    """The three checks above, configured from the listen address and the two allow-lists."""

    def __init__(self, listen_host: str, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()):
        hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        # *.localhost names resolve to loopback only (RFC 6761): accepted in the default set, not past an
        # explicit list.
        self.any_localhost = not hosts
        if "*" in hosts:
            self.hosts: frozenset[str] | None = None
        elif hosts:
            self.hosts = frozenset(hosts)
        elif is_loopback(listen_host):
            self.hosts = frozenset(_LOOPBACK_NAMES | {listen_host.lower()})
        else:
            # Listening beyond loopback, the server is reached by names it cannot know; keys protect it there.
            self.hosts = None
        origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        # Verdicts on the raw Host and Content-Type values seen: a server sees a handful of each, and a
        # dict look-up is cheaper than parsing them on every request (bench/gateway/count.py).
        self._hosts_seen: dict[bytes, bool] = {}
        self._types_seen: dict[bytes, bool] = {}

    def refusal(self, scope: Scope) -> R1ServeError | None:
        """Why this request is refused before it runs, or None."""
        raw_host = scope_header(scope, b"host")
        # No Host at all is no browser (every browser sends one): HTTP/1.0 tools, raw ASGI callers.
        if self.hosts is not None and raw_host is not None:
            ok = self._hosts_seen.get(raw_host)
            if ok is None:
                name = host_name(raw_host.decode("latin-1"))
                ok = name in self.hosts or (self.any_localhost and name.endswith(".localhost"))
                _remember(self._hosts_seen, raw_host, ok)
            if not ok:
                return PermissionDenied(
                    f"Host {host_name(raw_host.decode('latin-1'))!r} is not a name of this server. Add it to "
                    "R1SERVE_ALLOWED_HOSTS to serve it.",
                    code="host_not_allowed",
                )
        origin = scope_header(scope, b"origin")
        if origin is not None:
            host = raw_host.decode("latin-1") if raw_host is not None else ""
            text = origin.decode("latin-1").strip().rstrip("/").lower()
            if not (self.any_origin or text in self.origins or same_origin(text, host)):
                return PermissionDenied(
                    f"Requests from the web origin {text!r} are refused; R1SERVE_ALLOWED_ORIGINS can allow it.",
                    code="origin_not_allowed",
                )
        elif scope_header(scope, b"sec-fetch-site") == b"cross-site" and not _navigation(scope):
            return PermissionDenied(
                "Cross-site requests from web pages are refused (set R1SERVE_ALLOWED_ORIGINS to allow a site).",
                code="origin_not_allowed",
            )
        return None

    def media_refusal(self, scope: Scope, body: bytes) -> R1ServeError | None:
        """A non-empty body on a JSON endpoint must say it is JSON."""
        if not body or scope["path"] in FORM_PATHS:
            return None
        raw = scope_header(scope, b"content-type") or b""
        ok = self._types_seen.get(raw)
        if ok is None:
            ok = _is_json(_media_type(raw))
            _remember(self._types_seen, raw, ok)
        if ok:
            return None
        kind = _media_type(raw)
        return UnsupportedMediaType(
            f"This endpoint takes a JSON body: send it with Content-Type: application/json (got {kind or 'none'!r}; "
            "with curl: -H 'Content-Type: application/json').",
            param="content-type",
        )


_REMEMBERED = 64  # distinct values kept per verdict table: a client sending new ones each time gains nothing


def _remember(table: dict[bytes, bool], raw: bytes, verdict: bool) -> None:
    if len(table) < _REMEMBERED:
        table[raw] = verdict


def _media_type(raw: bytes) -> str:
    return raw.decode("latin-1").split(";", 1)[0].strip().lower()


def _is_json(kind: str) -> bool:
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def same_origin(origin: str, host: str) -> bool:
    _, sep, rest = origin.partition("://")
    return bool(sep) and rest == host.strip().lower()


def _navigation(scope: Scope) -> bool:
    return scope["method"] in ("GET", "HEAD") and scope_header(scope, b"sec-fetch-mode") == b"navigate"
